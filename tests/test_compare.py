"""`fwsel compare` on a hand-made sweep dir whose numbers are computed by hand below."""

import csv
import json
import logging
import math

import pytest
from omegaconf import OmegaConf

from fwsel import compare

STEPS, EVAL_EVERY, SEC_STEP = 10, 2, 0.5  # evals at 0, 2, ..., 10; every step takes 0.5 s
PICKS = {"random": {"target": 2, "noisy": 6}, "ftw": {"target": 6, "noisy": 2}, "full": {"target": 8, "noisy": 24},
         "greats": {"target": 4, "noisy": 4}}

# (selector, budget, seed) -> target eval loss at steps 0, 2, 4, 6, 8, 10
LOSSES = {
    ("random", 0.25, 0): [3.0, 2.5, 2.2, 2.0, 1.9, 1.8],  # random's final = mean(2.0, 1.9, 1.8) = 1.9
    ("random", 0.25, 1): [3.0, 2.6, 2.3, 2.1, 2.0, 1.9],  # -> 2.0
    ("random", 0.25, 2): [3.0, 2.7, 2.4, 2.2, 2.1, 2.0],  # -> 2.1
    ("ftw", 0.25, 0): [3.0, 2.4, 1.95, 1.85, 1.7, 1.6],  # <= 1.9 first at step 6 -> 0.6, 3.0 s
    ("ftw", 0.25, 1): [3.0, 2.3, 2.0, 1.8, 1.7, 1.65],  # <= 2.0 first at step 4 -> 0.4, 2.0 s
    ("ftw", 0.25, 2): [3.0, 2.9, 2.8, 2.7, 2.6, 2.3],  # never <= 2.1 -> inf
    ("random", 0.5, 0): [3.0, 2.0, 1.5, 1.2, 1.1, 1.0],
    ("full", 0.5, 0): [3.0, 2.9, 2.8, 2.7, 2.6, 2.5],  # never reaches random's 1.1
}


def write_job(path, selector, budget, seed, losses=None, status="ok", eval_every=EVAL_EVERY, error=None,
              steps=STEPS, first_rows=0):
    """One run dir following the output contract; `first_rows`: metrics lines of a job that failed later."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(
        {"selector": {"name": selector}, "budget": budget, "seed": seed, "steps": steps, "eval_every": eval_every})))
    rows = [{"step": 0, "examples_seen": 0, "target_eval_loss": 3.0}] * first_rows
    for step in range(steps + 1 if losses else 0):
        row = {"step": step, "examples_seen": step * int(8 / budget)}
        if step:
            row.update(sec_step=SEC_STEP, train_loss=1.0, selected_per_source=PICKS[selector])
        if step % eval_every == 0:
            row.update(target_eval_loss=losses[step // eval_every], target_eval_acc=0.1 * (seed + 1))
        rows.append(row)
    if status == "running":  # a killed job: partial metrics ending in a torn line
        rows = rows[:5]
    torn = '{"step": 5, "exam' if status == "running" else ""
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + torn)
    final = losses[-1] if losses and status == "ok" else None
    (path / "summary.json").write_text(json.dumps({
        "status": status, "error": error, "selector": selector, "budget": budget, "seed": seed,
        "steps": steps, "eval_every": eval_every, "target_eval_loss": final,
        "target_eval_acc": 0.1 * (seed + 1) if final else None}))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    for (sel, b, seed), losses in LOSSES.items():
        write_job(root / f"b{b}" / f"selector-{sel}_seed-{seed}", sel, b, seed, losses)
    write_job(root / "b0.25" / "selector-ftw_seed-3", "ftw", 0.25, 3, status="failed", error="ValueError: boom",
              first_rows=1)
    write_job(root / "b2" / "selector-ftw_seed-0", "ftw", 2, 0, status="failed",  # a config error: never started
              error="ConfigError: budget must be in (0, 1], got 2")
    write_job(root / "b0.25" / "selector-greats_seed-0", "greats", 0.25, 0, LOSSES[("ftw", 0.25, 0)][:3] * 2,
              status="running")
    missing = root / "b0.5" / "selector-ftw_seed-0" / ".hydra"
    missing.mkdir(parents=True)
    (missing / "config.yaml").write_text("selector: {name: ftw}\nbudget: 0.5\nseed: 0\n")
    out = root / "report"
    rows, text = compare.compare_dirs([root], out=out)
    return root, out, {(r["selector"], r["budget"]): r for r in rows}, text


def test_mean_std_and_steps_to_target(sweep):
    _, _, rows, text = sweep
    ftw, rnd = rows[("ftw", 0.25)], rows[("random", 0.25)]
    assert ftw["loss_mean"] == pytest.approx(1.85)  # (1.6 + 1.65 + 2.3) / 3
    assert ftw["loss_std"] == pytest.approx(math.sqrt((0.25**2 + 0.2**2 + 0.45**2) / 2))
    assert rnd["loss_mean"] == pytest.approx(1.9) and rnd["loss_std"] == pytest.approx(0.1)
    assert ftw["acc_mean"] == pytest.approx(0.2) and ftw["acc_std"] == pytest.approx(0.1)
    assert ftw["steps_to_random_ratio"] == pytest.approx(0.6)  # median(0.6, 0.4, inf)
    assert ftw["sec_to_random"] == pytest.approx(3.0)  # median(3.0, 2.0, inf)
    assert rnd["steps_to_random_ratio"] is None  # random against itself says nothing: "—"
    assert math.isinf(rows[("full", 0.5)]["steps_to_random_ratio"])
    assert ftw["frac_target"] == pytest.approx(0.75) and rnd["frac_noisy"] == pytest.approx(0.75)
    assert ftw["seeds"] == 3 and ftw["n_ok"] == 3
    assert "1.8500 ± 0.3905" in text and "1.9000 ± 0.1000" in text
    assert "0.60 (3.0s)" in text and "> 1 (not reached)" in text
    assert "0.80" not in text


def test_jobs_that_never_started_are_left_out(sweep):
    _, _, rows, text = sweep
    assert all(b != 2 for _, b in rows) and "budget 2" not in text
    assert "left out: 1 job(s) that failed before their first step" in text and "got 2" in text


def test_differing_keys_make_their_own_arms(tmp_path):
    for seed in (0, 1):
        write_job(tmp_path / f"r{seed}", "random", 0.5, seed, LOSSES[("random", 0.5, 0)])
        write_job(tmp_path / f"f{seed}", "ftw", 0.5, seed, LOSSES[("ftw", 0.25, 0)])
        write_job(tmp_path / f"r50_{seed}", "random", 0.5, seed, LOSSES[("random", 0.5, 0)][:3], steps=4)
    rows, text = compare.compare_dirs([tmp_path])
    by = {(r["arm"], r["budget"]): r for r in rows}
    assert set(by) == {("random steps=10", 0.5), ("ftw steps=10", 0.5), ("random steps=4", 0.5)}
    assert all(r["n_ok"] == 2 and r["seeds"] == 2 for r in rows)
    assert by[("ftw steps=10", 0.5)]["steps_to_random_ratio"] is not None  # against random of the same steps
    assert by[("random steps=4", 0.5)]["min_evals"] == 3 and "warning" not in text
    write_job(tmp_path / "few", "greats", 0.5, 0, LOSSES[("random", 0.5, 0)][:2], steps=2)
    _, text = compare.compare_dirs([tmp_path])
    assert "warning: greats steps=2 @ budget 0.5 has jobs with only 2 eval(s), fewer than 3" in text


def test_one_run_dir(tmp_path, capsys):
    run = tmp_path / "run"
    write_job(run, "ftw", 0.25, 0, LOSSES[("ftw", 0.25, 0)])
    assert compare.main([str(run)]) == 0
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG" and "1.6000 (n=1)" in capsys.readouterr().out


def test_failed_running_missing_marked(sweep):
    root, _, rows, text = sweep
    assert rows[("ftw", 0.25)]["n_failed"] == 1
    assert rows[("greats", 0.25)]["n_running"] == 1 and rows[("greats", 0.25)]["seeds"] == 0
    assert rows[("greats", 0.25)]["loss_mean"] is None
    assert rows[("ftw", 0.5)]["n_missing"] == 1
    assert rows[("full", 0.5)]["reference"] and not rows[("ftw", 0.25)]["reference"]
    assert "(reference)" in text
    assert "1 failed" in text and "1 running/killed" in text and "1 missing" in text
    assert "ValueError: boom" in text and "selector-greats_seed-0" in text


def test_csv_and_pictures_written(sweep):
    root, out, rows, _ = sweep
    with open(out / "summary.csv") as f:
        got = {(r["selector"], float(r["budget"])): r for r in csv.DictReader(f)}
    assert set(got) == set(rows)
    assert float(got[("ftw", 0.25)]["steps_to_random_ratio"]) == pytest.approx(0.6)
    assert float(got[("full", 0.5)]["steps_to_random_ratio"]) == math.inf
    assert got[("ftw", 0.25)]["n_failed"] == "1" and got[("ftw", 0.25)]["seeds"] == "3"
    for name in ("curves.png", "selection.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (root / "summary.csv").exists()  # --out was honoured


def test_cli_ok_and_default_out(tmp_path, capsys):
    write_job(tmp_path / "a", "random", 0.5, 0, LOSSES[("random", 0.5, 0)])
    assert compare.main([str(tmp_path)]) == 0
    assert "final loss" in capsys.readouterr().out
    assert (tmp_path / "summary.csv").is_file() and (tmp_path / "curves.png").is_file()


@pytest.mark.parametrize("case", ["empty", "absent", "unstarted"])
def test_cli_errors(tmp_path, capsys, case):
    if case == "unstarted":
        write_job(tmp_path / "a", "random", 0.5, 0, status="failed", error="ConfigError: x")
    target = tmp_path / "nope" if case == "absent" else tmp_path
    assert compare.main([str(target)]) == 1
    err = capsys.readouterr().err
    expected = {"empty": "no jobs found", "absent": "not a directory", "unstarted": "got to its first step"}[case]
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_callback_runs_and_never_raises(tmp_path, caplog):
    from fwsel.train import CompareCallback

    write_job(tmp_path / "a", "random", 0.5, 0, LOSSES[("random", 0.5, 0)])
    CompareCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert (tmp_path / "summary.csv").is_file()
    with caplog.at_level(logging.WARNING):
        CompareCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "x")}}}))
    assert "not a directory" in caplog.text


def test_a_swapped_config_group_labels_by_its_choice(tmp_path):
    """data=jsonl beside data=synthetic: the arm says which, not every key under data."""
    for kind, extra in (("synthetic", {"mixture": "default"}), ("jsonl", {"files": "t.jsonl", "max_len": 512})):
        run = tmp_path / kind
        write_job(run, "random", 0.5, 0, LOSSES[("random", 0.5, 0)])
        cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
        cfg.data = {"kind": kind, **extra}
        (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        (run / ".hydra" / "hydra.yaml").write_text(OmegaConf.to_yaml({"hydra": {"runtime": {"choices": {
            "data": kind, "selector": "random", "hydra/launcher": "basic"}}}}))
    rows, _ = compare.compare_dirs([tmp_path])
    assert sorted(r["arm"] for r in rows) == ["random data=jsonl", "random data=synthetic"]


def test_path_lines_are_never_wrapped(tmp_path, capsys):
    run = tmp_path / ("a_long_directory_name_" * 4) / "run"
    write_job(run, "random", 0.5, 0, LOSSES[("random", 0.5, 0)])
    assert compare.main([str(run)]) == 0
    assert f"wrote {run / 'summary.csv'}, {run / 'curves.png'}, {run / 'selection.png'}\n" in capsys.readouterr().out


def test_selection_legend_fits_one_budget(tmp_path, monkeypatch):
    from fwsel import compare_plots

    figs = []
    monkeypatch.setattr(compare_plots.plt, "close", figs.append)
    sources = ("duplicate", "irrelevant", "noisy", "related", "target")
    job = compare.Job(tmp_path, "ok", "random", 0.25, 0, picks=[(s, {src: 1 for src in sources}) for s in (1, 2)])
    compare_plots.plot_selection([{"arm": "random", "budget": 0.25, "_jobs": [job]}], tmp_path / "s.png")
    fig = figs[0]
    box = fig.legends[0].get_window_extent(fig.canvas.get_renderer())
    assert 0 <= box.x0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1  # nothing cut off
    axes_top = max(ax.get_window_extent().y1 for ax in fig.axes)
    assert box.y0 >= axes_top  # and above the panel's title
