"""Real processes: a 200-step ftw run killed with SIGKILL (and one stopped with SIGTERM) after
its first checkpoint, resumed with `fwsel train resume=<dir>`, equals the uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import pytest

from fwsel.checkpoint import verify

from helpers_runs import metric_rows, summary, text

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("HYDRA_FULL_ERROR", None)
ARGS = ["experiment=smoke", "selector=ftw", "steps=200", "eval_every=20", "batch_size=4", "target.eval_size=16",
        "checkpoint_every=20", "progress=false"]


def fwsel(*args):
    return [sys.executable, "-m", "fwsel", *args]


def start_and_stop(run_dir, sig) -> int:
    """Start the run, send `sig` as soon as its first checkpoint exists, return the exit code."""
    proc = subprocess.Popen(fwsel("train", *ARGS, f"hydra.run.dir={run_dir}"), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (run_dir / "checkpoints" / "step-00000020").exists():
            assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.05)
        proc.send_signal(sig)
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    subprocess.run(fwsel("train", *ARGS, f"hydra.run.dir={run_dir}"), env=ENV, check=True, capture_output=True)
    return run_dir


def resume_and_compare(run_dir, full) -> dict:
    res = subprocess.run(fwsel("train", f"resume={run_dir}"), env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    s = summary(run_dir)
    assert s["status"] == "ok" and s["steps_done"] == 200 and s["resumed_from_step"] >= 20
    a, b = metric_rows(run_dir), metric_rows(full)
    assert [r["step"] for r in a] == list(range(201))
    for key in ("train_loss", "target_eval_loss"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key
    assert a == b  # every other key too (timings aside)
    assert text(run_dir, "selected.jsonl") == text(full, "selected.jsonl")
    return s


def test_sigkill_then_resume_is_exact(full, tmp_path):
    run_dir = tmp_path / "run"
    code = start_and_stop(run_dir, signal.SIGKILL)
    assert code == -signal.SIGKILL
    cut = summary(run_dir)
    assert cut["status"] == "running" and cut["steps_done"] < 200  # really cut
    resume_and_compare(run_dir, full)


def test_sigterm_interrupts_with_checkpoint_then_resumes(full, tmp_path):
    run_dir = tmp_path / "run"
    assert start_and_stop(run_dir, signal.SIGTERM) == 143
    cut = summary(run_dir)
    assert cut["status"] == "interrupted" and cut["signal"] == "SIGTERM"
    step = cut["steps_done"]
    assert verify(str(run_dir / "checkpoints" / f"step-{step:08d}")) is None  # written on the way out
    assert resume_and_compare(run_dir, full)["resumed_from_step"] == step
