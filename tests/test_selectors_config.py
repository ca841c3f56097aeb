"""Every gradient-selector YAML composes, instantiates its class, and documents each key."""

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
MINE = {
    "ftw": "FTW", "ftw_sgd": "FTW", "ftw_uniform": "FTW", "ftw_topk": "FTW", "tracin": "TracIn",
    "greats": "Greats", "gradnorm": "GradNorm", "maxloss": "MaxLoss", "less": "Less",
}


def selector_cfg(name, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(overrides=[f"+selector={name}", *overrides]).selector


@pytest.mark.parametrize("name", sorted(MINE))
def test_yaml_instantiates_and_comments_every_key(name):
    cfg = selector_cfg(name)
    sel = instantiate(cfg)
    assert type(sel).__name__ == MINE[name] and sel.name == cfg.name == name
    for line in (CONF / "selector" / f"{name}.yaml").read_text().splitlines():
        if line and not line.startswith(("#", " ", "-", "defaults:", "_target_:")):
            assert "#" in line, f"{name}.yaml: key without a comment: {line!r}"


def test_ablation_presets_change_one_choice():
    base = OmegaConf.to_container(selector_cfg("ftw"))
    for preset, change in [("ftw_sgd", {"geometry": "sgd"}), ("ftw_uniform", {"weights": "uniform"}),
                           ("ftw_topk", {"filter": "topk"})]:
        cfg = OmegaConf.to_container(selector_cfg(preset))
        assert cfg == {**base, "name": preset, **change}


def test_every_method_choice_is_a_key_and_overridable():
    keys = set(selector_cfg("ftw"))
    assert {"geometry", "filter", "weights", "metric", "adam_q", "momentum_correction", "alpha", "fill",
            "w_max", "ridge", "omp_tol", "empty_support", "warmup_steps"} <= keys
    sel = instantiate(selector_cfg("ftw_sgd", "selector.filter=topk", "selector.weights=uniform"))
    assert (sel.geometry, sel.filter, sel.weights, sel.metric) == ("sgd", "topk", "uniform", "sgd")
    with pytest.raises(Exception, match=re.escape("selector.filter must be one of omp|greedy|topk")):
        instantiate(selector_cfg("ftw", "selector.filter=bogus"))


def test_a_selector_built_from_a_dict_refuses_unknown_keys():
    """Code that builds a selector itself (no CLI key check) gets the same one-line refusal: a
    misspelt key is never silently ignored. The loop's own key (prefilter_keep) is allowed."""
    from fwsel.config import build_selector
    from fwsel.errors import ConfigError
    from fwsel.selectors.greats import Greats
    from fwsel.selectors.random import RandomSelector

    cfg = OmegaConf.create({**OmegaConf.to_container(selector_cfg("ftw")), "alpah": 2.0, "prefilter_keep": 0.5})
    with pytest.raises(ConfigError, match=r"^selector.alpah is not a key of selector 'ftw' \(keys: adam_q, alpha, "):
        build_selector(cfg)
    with pytest.raises(ValueError, match=r"^selector.interaction_scal is not a key of selector 'g' "):
        Greats(name="g", interaction_scal=2.0)
    assert Greats(name="g", interaction_scale=2.0, prefilter_keep=0.5).gamma == 2.0
    with pytest.raises(ValueError, match=r"selector.bogus is not a key of selector 'r' \(keys: name, prefilter_keep\)"):
        RandomSelector(name="r", bogus=1)
