"""Selectors: one class per file behind `base.Selector`, built from `conf/selector/*.yaml`."""

from fwsel.selectors.base import EngineNeeds, Needs, Pool, Product, Selection, Selector

__all__ = ["EngineNeeds", "Needs", "Pool", "Product", "Selection", "Selector"]
