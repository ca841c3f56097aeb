"""What a user who brings a file meets: the final numbers, epochs and steps=null, strict keys,
threads chosen before torch loads, quick commands that never import torch, and the log lines."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fwsel import threads
from fwsel.cli import check_keys
from fwsel.data.files import FileReader, IterStream
from fwsel.errors import ConfigError, DataError

from helpers_runs import FAST, read_run, run_cli, signal_after, train, untimed

README = Path(__file__).resolve().parent.parent / "README.md"


def rows_file(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"{i}+1=", "response": str(i + 1)}) + "\n" for i in range(n)))
    return path


# ---------------------------------------------------------------- the final evaluation
def test_exhausted_run_reports_its_final_eval(tmp_path):
    f = rows_file(tmp_path / "rows.jsonl", 72)  # N = 16: 4 pools, stream runs out at step 4 (eval_every 3)
    run = train(tmp_path / "run", *FAST, "data=jsonl", f"data.files={f}", f"data.target_files={f}",
                "selector=random", "steps=10", "eval_every=3")
    evals = [r for r in run["metrics"] if "target_eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 4]  # the closing eval joins the row of the step it ran out at
    assert [r["step"] for r in run["metrics"]] == [0, 1, 2, 3, 4] and evals[-1]["train_loss"] is not None
    s = run["summary"]
    assert s["status"] == "exhausted" and s["steps_done"] == 4
    assert s["target_eval_loss"] == evals[-1]["target_eval_loss"] != evals[-2]["target_eval_loss"]


# ---------------------------------------------------------------- epochs
def test_epochs_reshuffle_and_stay_pure_functions_of_the_step(tmp_path):
    f = rows_file(tmp_path / "rows.jsonl", 30)
    stream = IterStream(FileReader([str(f)]), seed=3, shuffle_buffer=8, known_size=30, epochs=3)
    assert stream.known_size == 90
    ids = [r["id"] for t in range(9) for r in stream.pool(t, 10)]
    epochs = [ids[i:i + 30] for i in (0, 30, 60)]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs)  # every row once per epoch
    assert len({tuple(e) for e in epochs}) == 3  # in a new order each epoch
    one = IterStream(FileReader([str(f)]), seed=3, shuffle_buffer=8, known_size=30)
    assert [r["id"] for t in range(3) for r in one.pool(t, 10)] == epochs[0]  # epoch 0 = the one-pass order
    fresh = IterStream(FileReader([str(f)]), seed=3, shuffle_buffer=8, known_size=30, epochs=3)
    assert fresh.pool(5, 10) == stream.pool(5, 10)  # no state beyond the step
    assert stream.pool(9, 10) == []


def test_steps_null_runs_the_epochs_and_resumes_exactly_across_an_epoch_boundary(tmp_path, monkeypatch, capsys):
    f = rows_file(tmp_path / "rows.jsonl", 40)  # N = 16, 3 epochs: 120 rows = 7 pools; step 3 spans epochs 1-2
    args = [*FAST, "data=jsonl", f"data.files={f}", f"data.target_files={f}", "data.epochs=3", "steps=null",
            "eval_every=2", "selector=random", "data.shuffle_buffer=8"]
    full = train(tmp_path / "full", *args)
    assert full["summary"]["status"] == "ok" and full["summary"]["steps"] == full["summary"]["steps_done"] == 7
    signal_after(monkeypatch, 3)
    code, _ = run_cli(["train", *args, f"hydra.run.dir={tmp_path / 'cut'}"], capsys)
    assert code == 130
    monkeypatch.undo()
    code, out = run_cli(["train", f"resume={tmp_path / 'cut'}"], capsys)
    assert code == 0, out
    cut = read_run(tmp_path / "cut")
    assert untimed(cut["metrics"]) == untimed(full["metrics"]) and cut["selected"] == full["selected"]


def test_steps_null_needs_a_finite_source(tmp_path, capsys):
    code, text = run_cli(["train", *FAST, "steps=null", f"hydra.run.dir={tmp_path / 'run'}"], capsys)
    assert code == 1 and "steps=null (train until the data is used up) needs a source of known size" in text


def test_malformed_line_names_the_skip_switch(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON .*data.on_error=skip"):
        list(FileReader([str(f)]))


# ---------------------------------------------------------------- keys
@pytest.mark.parametrize("arg,hint", [("+lr=1e-3", "did you mean optim.lr?"), ("lr=1e-3", "did you mean optim.lr?"),
                                      ("budgt=0.1", "did you mean budget?"),
                                      ("optim.lrr=1", "did you mean optim.lr?")])
def test_unknown_keys_are_refused_with_the_nearest(arg, hint):
    with pytest.raises(ConfigError, match=re.escape(hint)):
        check_keys([arg])


def test_unknown_key_one_line_before_any_run_dir(tmp_path, capsys):
    code, text = run_cli(["train", "+lr=1e-3", f"hydra.run.dir={tmp_path / 'run'}"], capsys)
    assert code == 1 and "unknown key 'lr' (no config declares it): did you mean optim.lr?" in text
    assert len(text.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_legitimate_additions_pass():
    check_keys(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "+hydra.job.env_set.X=1", "experiment=smoke",
                "+experiment=compare", "data=jsonl", "+data.fields.prompt=question", "~tracker", "selector=greats",
                "selector.interaction_scale=45", "-m", "--cfg", "job", "threads=2", "data.epochs=2"])


def test_every_readme_command_uses_declared_keys():
    cmds = [line for line in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)]
    args = []
    for block in cmds:
        for cmd in block.replace("\\\n", " ").splitlines():
            if "fwsel train" in cmd:
                tail = cmd.split("fwsel train", 1)[1].split("#", 1)[0]
                args += [a.strip("'\"") for a in tail.split() if "=" in a and "<" not in a and not a.startswith("--")]
    assert len(args) > 20
    check_keys(args)


# ---------------------------------------------------------------- threads
def test_threads_respect_the_user_and_wait_passively_only_when_oversubscribed(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_cores", lambda: 0)
    env = {}
    threads.configure([], env)  # idle: every core, OpenMP's default (fast) waiting
    assert env == {"OMP_NUM_THREADS": "2"}
    monkeypatch.setattr(threads, "busy_cores", lambda: 1)
    env = {}
    threads.configure([], env)  # one core busy: one thread, nothing to wait for
    assert env == {"OMP_NUM_THREADS": "1"}
    env = {}
    threads.configure(["threads=2"], env)  # more threads than free cores: they must not spin
    assert env == {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}
    assert threads.configure([], env) == {} and env["OMP_NUM_THREADS"] == "3"  # the user's choice stands
    env = {"OMP_NUM_THREADS": "3"}
    threads.configure(["threads=2"], env)
    assert env["OMP_NUM_THREADS"] == "2"  # an explicit threads= wins
    with pytest.raises(ConfigError, match="threads must be auto or an integer >= 1"):
        threads.configure(["threads=0"], {})
    run = Path(__file__).parent / "no-such-run"
    assert threads.requested_in([f"resume={run}"]) is None


def test_resume_reuses_the_runs_thread_count(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"threads": 3}))
    env = {}
    threads.configure([f"resume={tmp_path}"], env)
    assert env["OMP_NUM_THREADS"] == "3"  # another count may round differently: resume stays exact
    env = {"OMP_NUM_THREADS": "1"}
    threads.configure([f"resume={tmp_path}"], env)
    assert env["OMP_NUM_THREADS"] == "1"


def test_threads_leave_the_busy_cores(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_cores", lambda: 1)
    assert threads.choose() == 1
    monkeypatch.setattr(threads, "busy_cores", lambda: 0)
    assert threads.choose() == 2
    monkeypatch.setattr(threads, "busy_cores", lambda: 5)
    assert threads.choose() == 1 and threads.choose("4") == 4


# ---------------------------------------------------------------- quick commands never load torch
def test_quick_commands_import_neither_torch_nor_transformers(tmp_path):
    run = tmp_path / "run"
    train(run, *FAST, "selector=random", "steps=2", "eval_every=2")
    probe = ("import sys; from fwsel.cli import main\n"
             "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    for cmd in (["--help"], ["--version"], ["train", "--help"], ["compare", str(run)],
                ["export-selection", str(run), "--out", str(tmp_path / "x.jsonl")]):
        p = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert "HEAVY []" in p.stdout, (cmd, p.stdout[-500:], p.stderr[-500:])
    assert (tmp_path / "x.jsonl").stat().st_size > 0 and (run / "curves.png").exists()


# ---------------------------------------------------------------- what the console says
def test_help_version_and_the_keys_comments(capsys):
    code, text = run_cli(["--version"], capsys)
    assert code == 0 and re.fullmatch(r"fwsel \d+\.\d+\.\d+\S*\n", text)
    code, text = run_cli(["train", "--help", "data=jsonl"], capsys)
    assert code == 0 and "peak learning rate" in text and "Filter-then-Weight" in text
    assert "data.epochs" in text and "[data=jsonl]" in text and "*ftw" in text


def test_log_lines_samples_and_the_final_line(tmp_path, capsys):
    code, text = run_cli(["train", *FAST, "selector=random", "steps=4", "eval_every=2", "eval_samples=2",
                          f"hydra.run.dir={tmp_path / 'run'}"], capsys)
    assert code == 0
    assert re.search(r"step 2/4 .* s/step  ETA \d+s", text)
    assert re.search(r"done: status ok, step 4/4, target_eval_loss \d\.\d{4} \(step 0: \d\.\d{4}\), "
                     r"exact match \d\.\d{3}, wall \d+s; run dir: ", text)
    assert text.count("sample ") == 3 * 2 and "(reference " in text
    rows = read_run(tmp_path / "run")["metrics"]
    assert [len(r.get("samples", [])) for r in rows] == [2, 0, 2, 0, 2]
    assert set(rows[0]["samples"][0]) == {"id", "prompt", "reference", "completion"}


def test_second_ctrl_c_repeats_the_resume_command(tmp_path, monkeypatch, capsys):
    from fwsel.loop import Trainer

    def abandoned(self, t):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_step", abandoned)
    code, text = run_cli(["train", *FAST, "selector=random", f"hydra.run.dir={tmp_path / 'run'}"], capsys)
    assert code == 130 and f"continue with: fwsel train resume={tmp_path / 'run'}" in text
    assert "no checkpoint was written yet, so continuing starts again from step 0" in text
    assert "is intact" not in text

    sweep = tmp_path / "sweep"  # in a sweep: the sweep's own command, into its dir
    code, text = run_cli(["train", "-m", *FAST, "selector=random", f"hydra.sweep.dir={sweep}"], capsys)
    assert code == 130
    assert f"continue with: fwsel train -m {' '.join(FAST)} selector=random hydra.sweep.dir={sweep} " in text


def test_a_sweep_log_tag_carries_the_path_hash():
    from types import SimpleNamespace

    from fwsel.train import _path_suffix, job_tag

    def hc(files):
        task = ["seed=0", f"data.files={files}"]
        return SimpleNamespace(job=SimpleNamespace(override_dirname="seed-0", num=0),
                               overrides=SimpleNamespace(task=task))

    assert job_tag(hc("a.jsonl")) == "seed-0" + _path_suffix(["seed=0", "data.files=a.jsonl"])
    assert job_tag(hc("a.jsonl")) != job_tag(hc("b.jsonl"))  # the dirs differ by it, so do the tags


def test_sweep_lines_carry_the_job_tag(tmp_path, capsys):
    code, text = run_cli(["train", "-m", *FAST, "selector=random", "seed=0,1", "steps=2", "eval_every=2",
                          f"hydra.sweep.dir={tmp_path / 'sweep'}"], capsys)
    assert code == 0
    for seed in (0, 1):
        assert re.search(rf"\[[^\]]*seed-{seed}[^\]]*\] step 2/2", text)
        assert re.search(rf"\[[^\]]*seed-{seed}[^\]]*\] done: status ok", text)


def test_wandb_gets_the_samples_as_a_table():
    import types

    import wandb

    from fwsel.tracking import WandbTracker

    logged = []
    tracker = WandbTracker.__new__(WandbTracker)  # no wandb.init: only what log() hands to the run
    tracker.run = types.SimpleNamespace(log=lambda row, step: logged.append(row))
    sample = {"id": "t:1", "prompt": "1+1=", "reference": "2", "completion": "3"}
    tracker.log({"step": 4, "target_eval_loss": 1.5, "samples": [sample]}, 4)
    table = logged[0]["samples"]
    assert isinstance(table, wandb.Table) and table.data == [[4, "t:1", "1+1=", "2", "3"]]
    assert logged[0]["target_eval_loss"] == 1.5


def test_off_a_terminal_each_log_record_is_one_plain_line(monkeypatch, capsys):
    import logging

    from fwsel.cli import PlainHandler, console_handler

    handler = console_handler(show_path=False, markup=False)  # pytest's stdout is no terminal
    assert isinstance(handler, PlainHandler)
    handler.setFormatter(logging.Formatter("%(message)s"))
    record = logging.LogRecord("fwsel", logging.INFO, __file__, 1, "step 2/4  " + "x" * 150, None, None)
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] INFO    step 2/4  x{150}", handler.format(record))
