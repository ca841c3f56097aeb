"""Every shipped config option composes, passes validation, instantiates its selector, and
documents each of its keys with a comment."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from fwsel.config import validate

CONF = Path(__file__).resolve().parents[1] / "conf"
OPTIONS = sorted((p.parent.name, p.stem) for p in CONF.glob("*/*.yaml"))
NEEDS = {("data", "jsonl"): ["data.files=x.jsonl", "data.target_files=y.jsonl"],
         ("data", "hf"): ["data.name=some/dataset"], ("model", "hf"): ["model.name_or_path=./some-model"]}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_validates_and_instantiates(group, option):
    if group == "hydra":
        pytest.skip("hydra/job_logging is exercised by every CLI test")
    with initialize_config_module(config_module="fwsel.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"{group}={option}", *NEEDS.get((group, option), [])])
    validate(cfg)
    sel = instantiate(cfg.selector, _convert_="all")
    assert sel.name == cfg.selector.name


@pytest.mark.parametrize("path", sorted(CONF.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONF)))
def test_every_key_has_a_comment(path):
    if path.parts[-3:-1] == ("hydra", "job_logging"):
        pytest.skip("a logging dictConfig, documented at its top")
    in_hydra = False  # Hydra's own settings (run dirs, sweeper) are Hydra's documented keys
    for line in path.read_text().splitlines():
        body = line.strip()
        if line and not line.startswith((" ", "#")):
            in_hydra = body.startswith("hydra:")
        if in_hydra or not body or body.startswith(("#", "- ", "defaults:", "_target_:")) or body.endswith(":"):
            continue  # comments, list items, and mapping headers (their keys carry the comments)
        assert "#" in line, f"{path.name}: key without a one-line comment: {line!r}"
