"""Selectors: one class per file behind `base.Selector`, built from `conf/selector/*.yaml`."""

from fwsel.selectors.base import Pool, Selection, Selector

__all__ = ["Pool", "Selection", "Selector"]
