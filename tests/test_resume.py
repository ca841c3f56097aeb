"""Exact resume in-process: SIGINT mid-run, then `fwsel train resume=<dir>` reproduces the
uninterrupted run's metrics (timings aside) and selections byte for byte; damaged or missing
checkpoints, finished runs, refused overrides and a re-run sweep."""

import os
import shutil
import signal

import pytest

from fwsel.checkpoint import verify

from helpers_runs import FAST, metric_rows, run_cli, signal_after, summary, text

ARGS = [*FAST, "selector=ftw", "steps=14", "eval_every=4", "checkpoint_every=5"]
CUT = 7  # SIGINT arrives during step 7: checkpoints step-5 and step-7 remain


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run and the same run stopped by SIGINT after step 7."""
    root = tmp_path_factory.mktemp("runs")
    full, cut = root / "full", root / "cut"
    assert run_cli(["train", *ARGS, f"hydra.run.dir={full}"])[0] == 0
    with pytest.MonkeyPatch.context() as mp:
        signal_after(mp, CUT)
        code = run_cli(["train", *ARGS, f"hydra.run.dir={cut}"])[0]
    return {"full": full, "cut": cut, "cut_code": code}


def copy(src, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def assert_same_curve(run, full):
    assert metric_rows(run) == metric_rows(full)
    assert text(run, "selected.jsonl") == text(full, "selected.jsonl")
    s = summary(run)
    assert s["status"] == "ok" and s["steps_done"] == 14 and s["error"] is None
    assert s["target_eval_loss"] == summary(full)["target_eval_loss"]


def test_sigint_writes_checkpoint_and_resume_is_exact(runs, tmp_path, capsys):
    assert runs["cut_code"] == 130
    s = summary(runs["cut"])
    assert s["status"] == "interrupted" and s["signal"] == "SIGINT" and s["steps_done"] == CUT
    assert sorted(os.listdir(runs["cut"] / "checkpoints")) == ["step-00000005", f"step-{CUT:08d}"]
    assert verify(str(runs["cut"] / "checkpoints" / f"step-{CUT:08d}")) is None
    run = copy(runs["cut"], tmp_path)
    for name in ("metrics.jsonl", "selected.jsonl"):  # a line cut by a kill
        with open(run / name, "a") as f:
            f.write('{"step": 8, "train_lo')
    # allowed extras: tracker, progress (and they win over the saved ones)
    code, out = run_cli(["train", f"resume={run}", "tracker=none", "progress=false"], capsys)
    assert code == 0, out
    assert f"resuming from step {CUT}" in out
    assert summary(run)["resumed_from_step"] == CUT
    assert_same_curve(run, runs["full"])


def test_damaged_checkpoint_falls_back_to_previous(runs, tmp_path, capsys):
    run = copy(runs["cut"], tmp_path)
    weights = run / "checkpoints" / f"step-{CUT:08d}" / "weights.pt"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    code, out = run_cli(["train", f"resume={run}"], capsys)
    assert code == 0, out
    assert f"step-{CUT:08d} is damaged: weights.pt has {size // 2} bytes, the manifest says {size}" in out
    assert "using the previous one" in out
    assert summary(run)["resumed_from_step"] == 5
    assert_same_curve(run, runs["full"])


def test_verify_names_the_problem(runs, tmp_path):
    run = copy(runs["cut"], tmp_path)
    ck = run / "checkpoints" / "step-00000005"
    data = bytearray((ck / "state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    (ck / "state.pt").write_bytes(bytes(data))
    assert verify(str(ck)) == "state.pt fails its sha256 checksum"
    (ck / "manifest.json").unlink()
    assert "no readable manifest.json" in verify(str(ck))


def test_no_checkpoint_restarts_from_zero(runs, tmp_path, capsys):
    run = copy(runs["cut"], tmp_path)
    shutil.rmtree(run / "checkpoints")
    code, out = run_cli(["train", f"resume={run}"], capsys)
    assert code == 0, out
    assert "no complete checkpoint" in out and "restarting from step 0" in out
    assert summary(run)["resumed_from_step"] == 0
    assert_same_curve(run, runs["full"])


def test_resume_finished_run_says_so(runs, capsys):
    before = text(runs["full"], "metrics.jsonl")
    code, out = run_cli(["train", f"resume={runs['full']}"], capsys)
    assert code == 0 and "already finished" in out and "nothing to resume" in out
    assert text(runs["full"], "metrics.jsonl") == before and summary(runs["full"])["status"] == "ok"


@pytest.mark.parametrize("extra,named", [(["seed=1", "budget=0.5"], "budget, seed"),
                                         (["optim.lr=1e-2"], "optim.lr"),
                                         (["+foo=1"], "foo")])
def test_resume_refuses_curve_changing_overrides(runs, extra, named, capsys):
    before = text(runs["cut"], "summary.json")
    code, out = run_cli(["train", f"resume={runs['cut']}", *extra], capsys)
    assert code == 1 and "Traceback" not in out
    assert f"refusing overrides that would change the run: {named} " in out
    assert text(runs["cut"], "summary.json") == before  # nothing touched


def test_resume_bad_dir_one_line(tmp_path, capsys):
    code, out = run_cli(["train", f"resume={tmp_path}"], capsys)
    assert code == 1 and "not a fwsel run dir (no .hydra/overrides.yaml)" in out and "Traceback" not in out
    code, out = run_cli(["train", "-m", f"resume={tmp_path}"], capsys)
    assert code == 1 and "re-run its command with the same hydra.sweep.dir" in out


def test_rerun_sweep_resumes_the_interrupted_job(tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    args = ["train", "-m", *FAST, "selector=random", "seed=0,1", "steps=6", "eval_every=3",
            "checkpoint_every=2", f"hydra.sweep.dir={sweep}"]
    ref = tmp_path / "ref"  # job seed=1 alone, uninterrupted
    assert run_cli(["train", *FAST, "selector=random", "seed=1", "steps=6", "eval_every=3",
                    "checkpoint_every=2", f"hydra.run.dir={ref}"])[0] == 0
    from fwsel.loop import Trainer

    calls, inner = [], Trainer.train_step

    def train_step(self, t):  # job seed=0 takes calls 1-6, job seed=1 is stopped after its step 3
        row = inner(self, t)
        calls.append(t)
        if len(calls) == 9:
            os.kill(os.getpid(), signal.SIGTERM)
        return row

    monkeypatch.setattr(Trainer, "train_step", train_step)
    code, out = run_cli(args, capsys)
    monkeypatch.undo()
    assert code == 143, out  # SIGTERM stops the whole sweep
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [summary(j)["status"] for j in jobs] == ["ok", "interrupted"]
    code, out = run_cli(args, capsys)
    assert code == 0, out
    assert "already finished with this config: nothing to re-run (skipped)" in out
    assert [summary(j)["status"] for j in jobs] == ["ok", "ok"]
    assert summary(jobs[1])["resumed_from_step"] == 3  # the checkpoint written on SIGTERM
    assert metric_rows(jobs[1]) == metric_rows(ref)
    assert text(jobs[1], "selected.jsonl") == text(ref, "selected.jsonl")


def full_and_cut(args, tmp_path, monkeypatch):
    """The uninterrupted run of `args` and one stopped by a signal after step 3 (its checkpoint)."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_cli(["train", *args, f"hydra.run.dir={full}"])[0] == 0
    with monkeypatch.context() as mp:
        signal_after(mp, 3)
        assert run_cli(["train", *args, f"hydra.run.dir={cut}"])[0] == 130
    return full, cut


def assert_resumes_to(cut, full, capsys):
    """`resume=cut` finishes the run with the uninterrupted run's metrics and selections."""
    code, out = run_cli(["train", f"resume={cut}"], capsys)
    assert code == 0, out
    assert summary(cut)["resumed_from_step"] == 3
    assert metric_rows(cut) == metric_rows(full)
    assert text(cut, "selected.jsonl") == text(full, "selected.jsonl")


def test_lora_checkpoints_hold_adapters_only_and_resume_exactly(tmp_path, monkeypatch, capsys):
    args = [*FAST, "selector=ftw", "lora.enabled=true", "lora.r=2", "steps=6", "eval_every=3", "checkpoint_every=2"]
    full, cut = full_and_cut(args, tmp_path, monkeypatch)
    import torch

    weights = torch.load(cut / "checkpoints" / "step-00000003" / "weights.pt", weights_only=True)
    assert weights and all("lora_" in name for name in weights)  # no frozen base weights
    assert_resumes_to(cut, full, capsys)


def test_alpha_fit_state_resumes_exactly(tmp_path, monkeypatch, capsys):
    """ftw's alpha_fit sums carry across steps: the checkpoint holds them (Selector.state_dict), so
    the resumed run fits from where it stopped, not from alpha again."""
    import torch

    args = [*FAST, "selector=ftw", "selector.objective=step", "selector.alpha_fit=true", "diagnostics.fidelity=true",
            "steps=5", "eval_every=5", "checkpoint_every=2"]
    full, cut = full_and_cut(args, tmp_path, monkeypatch)
    state = torch.load(cut / "checkpoints" / "step-00000003" / "state.pt", weights_only=True)
    assert state["selector"]["fit"][1] > 0  # a fit exists at the cut
    assert len({r["sel_alpha_fit"] for r in metric_rows(full)[1:]}) > 2  # the fit moves after the cut too
    assert_resumes_to(cut, full, capsys)


def test_second_sigint_abandons_the_step(tmp_path, monkeypatch, capsys):
    from fwsel.loop import Trainer

    inner = Trainer.form_update

    def twice(self, *a):
        if self.step == 3:  # inside step 4: the first signal asks for a stop, the second abandons the step
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return inner(self, *a)

    monkeypatch.setattr(Trainer, "form_update", twice)
    code, out = run_cli(["train", *FAST, "selector=random", "steps=8", "checkpoint_every=2",
                         f"hydra.run.dir={tmp_path}"], capsys)
    assert code == 130 and "the step in progress was abandoned" in out and "Traceback" not in out
    s = summary(tmp_path)
    assert s["status"] == "interrupted" and s["steps_done"] == 3
    assert os.listdir(tmp_path / "checkpoints") == ["step-00000002"]  # the last complete one, intact
    assert verify(str(tmp_path / "checkpoints" / "step-00000002")) is None


def test_new_run_into_a_used_dir_is_refused(runs, tmp_path, capsys):
    run = copy(runs["cut"], tmp_path)
    before = [text(run, name) for name in ("metrics.jsonl", ".hydra/overrides.yaml")]
    code, out = run_cli(["train", *ARGS, "seed=3", f"hydra.run.dir={run}"], capsys)
    assert code == 1 and f"{run} already holds a run: continue it with `fwsel train resume={run}`" in out
    assert [text(run, name) for name in ("metrics.jsonl", ".hydra/overrides.yaml")] == before
