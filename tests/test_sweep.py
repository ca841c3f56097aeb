"""Re-running a sweep into the same dir: finished jobs are skipped, a changed config is refused."""

import json

from fwsel.cli import main

GRID = ["selector=random,maxloss", "budget=0.5", "experiment=smoke", "steps=2", "eval_every=2",
        "target.eval_size=8", "progress=false"]


def sweep(sweep_dir, *extra):
    try:
        return main(["train", "-m", *GRID, *extra, f"hydra.sweep.dir={sweep_dir}"])
    except SystemExit as e:
        return e.code


def test_rerun_skips_finished_jobs_and_refuses_changes(tmp_path, capsys):
    d = tmp_path / "sweep"
    assert sweep(d) == 0
    summaries = sorted(d.glob("*/summary.json"))
    assert len(summaries) == 2
    stamps = [p.stat().st_mtime_ns for p in summaries]
    metrics = [p.with_name("metrics.jsonl").read_text() for p in summaries]

    capsys.readouterr()
    assert sweep(d) == 0
    assert [p.stat().st_mtime_ns for p in summaries] == stamps  # nothing re-ran
    assert [p.with_name("metrics.jsonl").read_text() for p in summaries] == metrics
    assert capsys.readouterr().out.count("already finished with this config") == 2

    # the same job names with another value of a key that is not in the name: refused, naming the key
    sweep(d, "optim.lr=0.01")  # a new key joins the name: new dirs, no clash
    assert len(sorted(d.glob("*/summary.json"))) == 4
    job = summaries[0].parent
    cfg = job / "fwsel_config.yaml"
    cfg.write_text(cfg.read_text().replace("lr: 0.003", "lr: 0.005"))
    capsys.readouterr()
    sweep(d)
    text = capsys.readouterr()
    text = text.out + text.err
    assert "different config (changed: optim.lr)" in text, text
    assert json.loads(summaries[0].read_text())["status"] == "ok"  # the finished job's files are untouched


def test_a_failing_job_does_not_stop_the_sweep(tmp_path, capsys):
    d = tmp_path / "sweep"
    grid = [g for g in GRID if not g.startswith(("budget=", "selector="))]
    code = main(["train", "-m", "selector=random", "budget=1.5,0.5", *grid, f"hydra.sweep.dir={d}"])
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == 1
    assert text.count("budget must be in (0, 1], got 1.5") == 2  # the job's line, and the list at the end
    assert "Traceback" not in text and "Error executing job" not in text
    assert "1 sweep job(s) failed" in out.err
    assert [json.loads(p.read_text())["status"] for p in d.glob("*/summary.json")] == ["ok"]  # the next job ran
    assert (d / "summary.csv").is_file()  # and the compare at the end
