"""The CLI in-process: help, unknown command, a sweep, and bad input (one line, exit 1, no traceback)."""

import json
import os

import pytest
import torch

from fwsel.cli import main


def run_cli(args, capsys):
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err


def test_help_and_unknown_command(capsys):
    code, text = run_cli(["--help"], capsys)
    assert code == 0 and "train" in text and "compare" in text
    code, text = run_cli(["bogus"], capsys)
    assert code == 1 and "unknown command 'bogus'" in text


def test_train_help_lists_groups(capsys):
    code, text = run_cli(["train", "--help"], capsys)
    assert code == 0
    for group in ("selector:", "model:", "data:", "optim:", "tracker:", "experiment:"):
        assert group in text
    assert "ftw" in text and "random" in text and "source_oracle" in text


def test_sweep_makes_one_dir_per_job(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # works from any working directory
    sweep = tmp_path / "sweep"
    code, text = run_cli(["train", "-m", "selector=random,full", "budget=0.25,0.5", "experiment=smoke",
                          "steps=3", "eval_every=3", "target.eval_size=16", f"hydra.sweep.dir={sweep}"], capsys)
    assert code == 0, text
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 4
    names = sorted(p.parent.name for p in summaries)
    assert names == sorted(f"budget-{b}_eval_every-3_experiment-smoke_selector-{s}_steps-3_target.eval_size-16"
                           for s in ("random", "full") for b in ("0.25", "0.5"))
    for p in summaries:
        s = json.loads(p.read_text())
        assert s["status"] == "ok" and s["steps_done"] == 3
        assert s["pool_size"] == round(8 / s["budget"])
    assert (sweep / "summary.csv").exists()  # the compare callback ran at the end of the sweep


BAD = [
    (["budget=0"], "budget must be in (0, 1]"),
    (["budget=1.5"], "budget must be in (0, 1]"),
    pytest.param(["device=cuda"], "device=cuda but this torch build sees no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is there")),
    (["batch_size=0"], "batch_size must be an integer >= 1"),
    (["steps=0"], "steps must be an integer >= 1"),
    (["optim.schedule=bogus"], "optim.schedule must be one of linear|cosine|constant"),
    (["model.dtype=bogus"], "model.dtype must be one of fp32|fp64"),
    (["selector.filter=bogus"], "selector.filter must be one of omp|greedy|topk, got 'bogus'"),
    (["selector=greats", "selector.interaction_scale=-1"], "selector.interaction_scale must be >= 0"),
    (["engine.grad_path=fast"], "engine.grad_path must be one of auto|materialize|ghost, got 'fast'"),
    (["engine.micro_batch_size=0"], "engine.micro_batch_size must be null or an integer >= 1"),
    (["engine.grad_path=ghost", "engine.projection_dim=64"], "engine.grad_path=ghost does not combine"),
    (["data=jsonl", "data.files=/nonexistent/*.jsonl", "data.target_files=/nonexistent.jsonl"],
     "data.files: no file matches"),
]


@pytest.mark.parametrize("overrides,line", BAD, ids=[(b.values if hasattr(b, "values") else b)[0][-1] for b in BAD])
def test_bad_input_one_line_exit_1(overrides, line, tmp_path, capsys):
    code, text = run_cli(["train", *overrides, f"hydra.run.dir={tmp_path}"], capsys)
    assert code == 1
    assert line in text
    assert "Traceback" not in text
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["status"] == "failed" and line in s["error"]
    assert not os.path.exists(tmp_path / "metrics.jsonl") or not (tmp_path / "metrics.jsonl").read_text()


def test_unknown_group_option_lists_options(tmp_path, capsys):
    code, text = run_cli(["train", "selector=bogus", f"hydra.run.dir={tmp_path}"], capsys)
    assert code == 1
    assert "bogus" in text and "random" in text  # Hydra names the available options


def test_empty_target_split(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    target = tmp_path / "target.jsonl"
    target.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    code, text = run_cli(["train", "data=jsonl", f"data.files={data}", f"data.target_files={target}",
                          f"hydra.run.dir={tmp_path / 'run'}"], capsys)
    assert code == 1 and "select and eval splits are non-empty" in text and "Traceback" not in text
