"""Every selector end to end through `fwsel train` on `tiny` and the embedded stream."""

import collections
from pathlib import Path

import pytest
from scipy.stats import binomtest

from helpers_runs import train

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


def _picks(tmp_path, sel, seeds=(0, 1, 2), steps=30):
    """Rows selected per source over `seeds` x `steps` at budget 0.25, and the total selected, on the
    addition stream (`data.task=add`: the thresholds below were measured there; on the default key
    task the duplicate rows, copies of target rows, take a larger share of the early picks)."""
    picked = collections.Counter()
    for seed in seeds:
        run = train(tmp_path / f"{sel}-{seed}", f"selector={sel}", f"seed={seed}", f"steps={steps}",
                    f"eval_every={steps}", "target.eval_size=16", "budget=0.25", "data.task=add")
        for row in run["metrics"][1:]:
            picked.update(row["selected_per_source"])
    return picked, sum(picked.values())


@pytest.mark.parametrize("sel", ["ftw", "greats", "tracin"])
def test_gradient_selectors_prefer_the_target_source(tmp_path, sel):
    """Sanity, not correctness (the unit tests carry that); one-sided binomial tests, p < 0.01.

    Random picks each source at its stream share (target 0.1, irrelevant 0.3). Gradient
    selectors take `target` rows at >= 1.5x that rate and `irrelevant` rows at <= 0.5x it.
    Not 2x for `target`: in the first 30 steps the `noisy` rows (target format, reversed
    answers) are as aligned with g_T as target rows, and take ~35% of the picks (measured:
    ftw 0.21, greats 0.19, tracin 0.19 target).
    """
    picked, n = _picks(tmp_path, sel)
    p_target = binomtest(picked["target"], n, 1.5 * 0.1, alternative="greater").pvalue
    p_irrelevant = binomtest(picked["irrelevant"], n, 0.5 * 0.3, alternative="less").pvalue
    assert p_target < 0.01, f"{sel}: {picked['target']}/{n} target rows (p = {p_target:.3g})"
    assert p_irrelevant < 0.01, f"{sel}: {picked['irrelevant']}/{n} irrelevant rows (p = {p_irrelevant:.3g})"


def test_a_selector_may_choose_no_row(tmp_path, monkeypatch):
    """ftw's `empty_support=skip` (no candidate with b_i > 0): that step makes no update and the
    run goes on; it is counted in skipped_steps but never aborts like a non-finite step."""
    import numpy as np

    from fwsel.selectors import ftw
    from fwsel.selectors.base import Selection

    orig = ftw.FTW.select

    def empty_on_odd_steps(self, pool):
        sel = orig(self, pool)
        return Selection([], np.zeros(0), sel.diagnostics) if pool.step % 2 else sel

    monkeypatch.setattr(ftw.FTW, "select", empty_on_odd_steps)
    run = train(tmp_path, "selector=ftw", "selector.empty_support=skip", "steps=8", "eval_every=8",
                "target.eval_size=16", "max_bad_steps=2")
    s = run["summary"]
    assert s["status"] == "ok" and s["steps_done"] == 8 and s["skipped_steps"] == 4
    rows = run["metrics"][1:]
    assert [r["examples_trained"] for r in rows] == [8, 8, 16, 16, 24, 24, 32, 32]
    assert [len(r["ids"]) for r in run["selected"]] == [8, 0, 8, 0, 8, 0, 8, 0]
