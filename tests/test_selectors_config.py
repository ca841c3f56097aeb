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
