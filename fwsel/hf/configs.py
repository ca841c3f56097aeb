"""fwsel's selector and engine configs by name, for scripts that build a Trainer themselves."""

from __future__ import annotations

from importlib import resources

from fwsel.errors import ConfigError
from fwsel.selectors.base import Selector


def group_config(group: str, name: str, overrides: dict | None = None):
    """`conf/<group>/<name>.yaml` (its `defaults` merged in) with `overrides` on top."""
    from omegaconf import OmegaConf

    root = resources.files("fwsel.conf") / group
    known = sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))
    if name not in known:
        raise ConfigError(f"{group}={name!r} is not one of fwsel's {group} configs: {', '.join(known)}")
    cfg = OmegaConf.load(str(root / f"{name}.yaml"))
    bases = [group_config(group, d) for d in cfg.pop("defaults", []) if d != "_self_"]
    cfg = OmegaConf.merge(*bases, cfg)
    unknown = sorted(set(overrides or {}) - set(cfg))
    if unknown:
        raise ConfigError(f"{group}_kwargs {unknown} are not keys of {group} {name!r} (keys: {', '.join(cfg)})")
    return OmegaConf.merge(cfg, overrides or {})


def build_selector(selector, selector_kwargs: dict | None = None) -> Selector:
    """A selector instance as is, or one built from fwsel's config of that name."""
    from fwsel.config import build_selector as from_config

    if isinstance(selector, Selector):
        if selector_kwargs:
            raise ConfigError("selector_kwargs only apply to a selector given by name")
        return selector
    return from_config(group_config("selector", str(selector), selector_kwargs))


def engine_config(overrides: dict | None, micro_batch_size: int):
    """`conf/engine/default.yaml`, scoring in micro-batches of the Trainer's per-device batch unless
    `overrides` says otherwise."""
    from fwsel.config import validate_engine

    cfg = group_config("engine", "default", {"micro_batch_size": micro_batch_size, **(overrides or {})})
    validate_engine(cfg)
    return cfg
