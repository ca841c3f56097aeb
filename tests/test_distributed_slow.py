"""Real torchrun jobs (2 CPU ranks, gloo) against one plain process: the default tiny full
fine-tuning in fp64 with an uneven pool (N = 17) and target batch (v = 7).

Same selected ids at every step, weights within 1e-9, losses within 1e-9 (relative); only
rank 0 writes (the run dirs hold the same files); a failing rank brings the job down with its
error; `resume=` under 2 ranks continues that job to the uninterrupted run's result; a group
torchrun restarts (--max-restarts) resumes its own run dir, derived from the run id.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("HYDRA_FULL_ERROR", None)
ARGS = ["experiment=smoke", "steps=5", "eval_every=2", "checkpoint_every=2", "model.dtype=fp64", "batch_size=5",
        "budget=0.3", "target.batch_size=7", "target.eval_size=15", "progress=false"]
ENTRY = os.path.join(os.path.dirname(__file__), "dist_entry.py")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, module=True, cwd=None, env=None, launcher=()):
    """`torchrun --nproc_per_node=2 (-m fwsel | dist_entry.py) <args>`: (exit code, output)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *launcher,
           *(["--master_port", str(_port())] if "--standalone" not in launcher else []),
           *(["-m", "fwsel"] if module else [ENTRY]), *args]
    res = subprocess.run(cmd, env={**ENV, **(env or {})}, cwd=cwd, capture_output=True, text=True, timeout=180)
    return res.returncode, res.stdout + res.stderr


def rows(run_dir, name):
    with open(os.path.join(run_dir, name)) as f:
        return [json.loads(line) for line in f]


def files(run_dir):
    return sorted(os.path.relpath(os.path.join(d, f), run_dir) for d, _, fs in os.walk(run_dir) for f in fs)


def assert_same_run(a, b):
    sa, sb = rows(a, "selected.jsonl"), rows(b, "selected.jsonl")
    assert [r["step"] for r in sa] == [r["step"] for r in sb] == list(range(1, 6))
    for x, y in zip(sa, sb):
        assert x["ids"] == y["ids"], (x, y)
        assert max(abs(p - q) for p, q in zip(x["weights"], y["weights"])) < 1e-9
    ma, mb = rows(a, "metrics.jsonl"), rows(b, "metrics.jsonl")
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    for x, y in zip(ma, mb):
        for key in ("train_loss", "target_eval_loss", "target_eval_acc", "grad_norm", "sel_n_eff", "tokens_trained"):
            if x.get(key) is not None:
                assert y[key] == pytest.approx(x[key], rel=1e-9), (x["step"], key)


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one")
    subprocess.run([sys.executable, "-m", "fwsel", "train", *ARGS, f"hydra.run.dir={run_dir}"], env=ENV, check=True,
                   capture_output=True, timeout=300)
    return run_dir


def test_two_ranks_select_and_train_as_one_process(one, tmp_path):
    run_dir = tmp_path / "two"
    code, out = torchrun("train", *ARGS, f"hydra.run.dir={run_dir}")
    assert code == 0, out[-3000:]
    assert_same_run(one, run_dir)
    assert files(run_dir) == files(one)  # rank 1 wrote nothing of its own: no second log or .hydra/
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2
    assert out.splitlines().count(str(run_dir)) == 1  # only rank 0 prints the run dir
    assert out.count("done: status ok") == 1  # and only rank 0 logs the final line


def test_a_failing_rank_stops_the_job_and_resume_continues_it(one, tmp_path):
    run_dir = tmp_path / "fail"
    code, out = torchrun("train", *ARGS, f"hydra.run.dir={run_dir}", module=False, env={"FWSEL_TEST_FAIL": "1:3"})
    assert code != 0
    assert "RuntimeError: injected failure on rank 1 at step 3" in out  # the root cause, from rank 1
    summ = json.loads((run_dir / "summary.json").read_text())
    assert summ["status"] == "failed" and "another rank stopped" in summ["error"] and summ["steps_done"] == 2
    assert os.path.isdir(run_dir / "checkpoints" / "step-00000002")
    code, out = torchrun("train", f"resume={run_dir}")
    assert code == 0, out[-3000:]
    summ = json.loads((run_dir / "summary.json").read_text())
    assert summ["status"] == "ok" and summ["resumed_from_step"] == 2
    assert_same_run(one, run_dir)


def test_a_restarted_group_resumes_its_run_dir(one, tmp_path):
    code, out = torchrun("train", *ARGS, module=False, cwd=tmp_path, env={"FWSEL_TEST_FAIL": "0:4"},
                         launcher=("--standalone", "--max-restarts=1"))
    assert code == 0, out[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "torchrun").iterdir()  # named after torchrun's run id
    summ = json.loads((run_dir / "summary.json").read_text())
    assert summ["status"] == "ok" and summ["resumed_from_step"] == 2
    assert_same_run(one, run_dir)


def test_torchrun_without_a_shared_run_dir_is_refused(tmp_path):
    code, out = torchrun("train", *ARGS, cwd=tmp_path)
    assert code != 0 and "give hydra.run.dir=<dir>, or start torchrun with --rdzv-id" in out
    assert not (tmp_path / "outputs").exists()
