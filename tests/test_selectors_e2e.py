"""Every selector end to end through `fwsel train` on `tiny` and the embedded stream."""

from pathlib import Path

import pytest
from helpers_runs import train
from scipy.stats import binomtest

SELECTORS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "selector").glob("*.yaml"))
SHORT = ["steps=6", "eval_every=3", "target.eval_size=16"]


@pytest.mark.parametrize("sel", SELECTORS)
def test_each_selector_runs_through_train(tmp_path, sel):
    run = train(tmp_path, f"selector={sel}", "experiment=smoke", *SHORT)
    s = run["summary"]
    assert s["status"] == "ok" and s["steps_done"] == 6 and s["selector"] == sel
    n = s["pool_size"] if sel == "full" else 8
    for row in run["selected"]:
        assert 0 < len(row["ids"]) <= n and len(set(row["ids"])) == len(row["ids"])
        assert min(row["weights"]) >= 0 and abs(sum(row["weights"]) - len(row["weights"])) < 1e-9
    assert all(r["sec_select"] is not None for r in run["metrics"][1:])


def test_ftw_ablated_to_sgd_topk_uniform_is_tracin(tmp_path):
    common = ["steps=8", "eval_every=8", "target.eval_size=16"]
    a = train(tmp_path / "a", "selector=ftw", "selector.geometry=sgd", "selector.filter=topk",
              "selector.weights=uniform", *common)
    b = train(tmp_path / "b", "selector=tracin", *common)
    assert a["selected"] == b["selected"]


def test_selections_ignore_the_eval_split(tmp_path, monkeypatch):
    """Selectors see `select` only: other eval rows leave every selection unchanged."""
    import fwsel.loop
    from fwsel.data import build_data

    common = ["selector=ftw", "steps=5", "eval_every=5", "target.eval_size=16"]
    a = train(tmp_path / "a", *common)

    def other_eval(cfg):
        data = build_data(cfg)
        data.eval = [{**r, "response": r["response"][::-1] + "7"} for r in data.eval]
        return data

    monkeypatch.setattr(fwsel.loop, "build_data", other_eval)
    b = train(tmp_path / "b", *common)
    assert a["selected"] == b["selected"]
    assert a["summary"]["target_eval_loss"] != b["summary"]["target_eval_loss"]  # the patch took effect


def _target_picks(tmp_path, sel, seeds=(0, 1, 2), steps=30):
    picked = chosen = 0
    for seed in seeds:
        run = train(tmp_path / f"{sel}-{seed}", f"selector={sel}", f"seed={seed}", f"steps={steps}",
                    f"eval_every={steps}", "target.eval_size=16", "budget=0.25")
        for row in run["metrics"][1:]:
            picked += row["selected_per_source"].get("target", 0)
            chosen += sum(row["selected_per_source"].values())
    return picked, chosen


@pytest.mark.parametrize("sel", ["ftw", "greats", "tracin"])
def test_gradient_selectors_prefer_the_target_source(tmp_path, sel):
    """Sanity, not correctness: >= 2x random's rate of `target` rows, one-sided binomial p < 0.01.

    Random's rate is the stream's share of `target` rows (0.1): it picks uniformly from each pool.
    """
    picked, chosen = _target_picks(tmp_path, sel)
    p = binomtest(picked, chosen, 2 * 0.1, alternative="greater").pvalue
    assert p < 0.01, f"{sel}: {picked}/{chosen} target rows (p = {p:.3g} against 2 x 0.1)"
