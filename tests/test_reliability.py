"""Failures that must not lose work or bend a curve: non-finite rows, updates and parameters,
a full disk, an unwritable run dir, wandb without a network, bad reliability keys, and
same-seed determinism of every selector."""

import json
import logging
import os

import numpy as np
import pytest
import torch

from fwsel.loop import Trainer
from fwsel.rng import torch_gen

from helpers_runs import FAST, metric_rows, patch_model, run_cli, summary, text

K, N = 4, 16  # FAST: batch_size 4, budget 0.25


def nan_embedding(char):
    """Every row containing `char` gets a NaN loss and gradient ('r': exactly the `irrelevant` rows)."""
    def edit(model, tok):
        with torch.no_grad():
            model.get_input_embeddings().weight[tok.convert_tokens_to_ids(char)] = float("nan")
    return edit


def record_pools(monkeypatch) -> list:
    """The pool rows of every step (the synthetic stream is a pure function of t)."""
    pools, inner = [], Trainer.train_step

    def train_step(self, t):
        pools.append(self.data.stream.pool(t, self.N))
        return inner(self, t)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    return pools


@pytest.mark.parametrize("selector", ["ftw", "maxloss", "random"])  # engine, loss-only, nothing scored
def test_nan_rows_are_dropped_and_counted(selector, tmp_path, monkeypatch, capsys):
    patch_model(monkeypatch, nan_embedding("r"))
    pools = record_pools(monkeypatch)
    code, out = run_cli(["train", *FAST, f"selector={selector}", "steps=4", "eval_every=4",
                         f"hydra.run.dir={tmp_path}"], capsys)
    assert code == 0, out
    rows = metric_rows(tmp_path)[1:]
    bad = [[r["source"] == "irrelevant" for r in pool] for pool in pools]
    if selector == "random":  # only the rows it picked reach a forward
        bad = [[b[i] for i in torch.randperm(N, generator=torch_gen(0, "selector", t))[:K].tolist()]
               for t, b in enumerate(bad)]
    expected = [sum(b) for b in bad]
    assert sum(expected) > 0
    assert [r["nonfinite_rows"] for r in rows] == expected
    assert summary(tmp_path)["nonfinite_rows"] == sum(expected)
    assert all(np.isfinite(r["train_loss"]) and "irrelevant" not in r["selected_per_source"] for r in rows)
    chosen = [json.loads(line) for line in text(tmp_path, "selected.jsonl").splitlines()]
    for sel, pool in zip(chosen, pools):
        by_id = {r["id"]: r for r in pool}
        assert sel["ids"] and all(by_id[i]["source"] != "irrelevant" for i in sel["ids"])
        assert np.isclose(np.mean(sel["weights"]), 1.0)  # mean 1 over the rows that trained
    assert f"dropped {expected[0]} candidate(s)" in out or expected[0] == 0


def test_nonfinite_update_skips_the_step(tmp_path, monkeypatch, capsys):
    inner = Trainer.form_update

    def poisoned(self, need, rows, scores, idx, w):
        out = inner(self, need, rows, scores, idx, w)
        if self.step == 2:  # the update of step 3 is formed, then one entry turns NaN
            next(p for p in self.params if p.grad is not None).grad.view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(Trainer, "form_update", poisoned)
    code, out = run_cli(["train", *FAST, "selector=ftw", "steps=5", "eval_every=5", f"hydra.run.dir={tmp_path}"],
                        capsys)
    assert code == 0, out
    assert "step 3 skipped: the update gradient norm is nan" in out
    rows = metric_rows(tmp_path)
    assert [r["skipped_steps"] for r in rows[1:]] == [0, 0, 1, 1, 1]
    assert rows[3]["train_loss"] is None and rows[3]["examples_trained"] == rows[2]["examples_trained"]
    assert json.loads(text(tmp_path, "selected.jsonl").splitlines()[2]) == {"step": 3, "ids": [], "weights": []}
    s = summary(tmp_path)
    assert s["status"] == "ok" and s["skipped_steps"] == 1
    state = torch.load(tmp_path / "checkpoints" / "step-00000005" / "state.pt", weights_only=True)
    assert state["scheduler"]["last_epoch"] == 4  # 5 steps, one without a scheduler step
    assert {int(st["step"]) for st in state["optimizer"]["state"].values()} == {4}  # nor an optimizer step
    weights = torch.load(tmp_path / "checkpoints" / "step-00000005" / "weights.pt", weights_only=True)
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.parametrize("selector", ["ftw", "random"])
def test_nan_parameter_aborts_after_max_bad_steps(selector, tmp_path, monkeypatch, capsys):
    def edit(model, tok):
        with torch.no_grad():
            model.get_output_embeddings().weight[0, 0] = float("nan")  # every logit row, every loss

    patch_model(monkeypatch, edit)
    code, out = run_cli(["train", *FAST, f"selector={selector}", "steps=10", "max_bad_steps=3",
                         f"hydra.run.dir={tmp_path}"], capsys)
    line = "3 steps in a row skipped (max_bad_steps), the last at step 3: no selected candidate has a finite loss"
    assert code == 1 and line in out and "Traceback" not in out
    s = summary(tmp_path)
    assert s["status"] == "failed" and line in s["error"]
    rows = metric_rows(tmp_path)
    assert rows[0]["target_eval_loss"] is None  # a non-finite eval loss is logged as null
    assert [r["skipped_steps"] for r in rows[1:]] == [1, 2, 3]
    assert [r["nonfinite_rows"] for r in rows[1:]] == [N if selector == "ftw" else K] * 3
    assert not (tmp_path / "checkpoints").exists()  # a failed run writes no checkpoint


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_one_line_and_readable(tmp_path, capsys):
    os.symlink("/dev/full", tmp_path / "selected.jsonl")  # every write: ENOSPC
    code, out = run_cli(["train", *FAST, "steps=3", f"hydra.run.dir={tmp_path}"], capsys)
    line = f"cannot write {tmp_path}/selected.jsonl: No space left on device"
    assert code == 1 and line in out and "Traceback" not in out
    assert summary(tmp_path)["status"] == "failed" and line in summary(tmp_path)["error"]
    assert [r["step"] for r in metric_rows(tmp_path)] == [0]  # what was written stays readable


def test_unwritable_output_dir_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code, out = run_cli(["train", *FAST, f"hydra.run.dir={tmp_path}/file/run"], capsys)
    assert code == 1 and "Traceback" not in out
    assert f"cannot create the output dir {tmp_path}/file/run: {tmp_path}/file is a file, not a directory" in out


@pytest.mark.parametrize("key", ["checkpoint_every=0", "checkpoint_keep=0", "max_bad_steps=0"])
def test_bad_reliability_keys(key, tmp_path, capsys):
    code, out = run_cli(["train", *FAST, key, f"hydra.run.dir={tmp_path}"], capsys)
    assert code == 1 and f"{key.split('=')[0]} must be" in out and "Traceback" not in out


class FakeWandb:
    """wandb.init that fails online (no network) and records every call; nothing is sent."""

    def __init__(self):
        self.calls = []

    def init(self, **kw):
        self.calls.append(kw["mode"])
        if kw["mode"] == "online":
            raise TimeoutError("could not reach api.wandb.ai")
        return type("Run", (), {"id": "abc123", "log": lambda *a, **k: None, "finish": lambda self: None})()

    Settings = staticmethod(lambda **kw: kw)


@pytest.mark.parametrize("api_key", [None, "dummy"])
def test_wandb_without_network_falls_back_offline(api_key, monkeypatch, tmp_path, caplog):
    import sys

    from omegaconf import OmegaConf

    from fwsel.tracking import WandbTracker

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    if api_key:
        monkeypatch.setenv("WANDB_API_KEY", api_key)
    else:
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
    tcfg = OmegaConf.create({"project": "p", "entity": None, "mode": "online", "group": None, "init_timeout": 5})
    with caplog.at_level(logging.WARNING):
        tracker = WandbTracker(tcfg, {}, str(tmp_path), job_type="ftw")
    assert fake.calls == (["online", "offline"] if api_key else ["offline"])
    assert "logging offline" in caplog.text and tracker.run_id == "abc123"
    if api_key:
        assert "online init failed (TimeoutError: could not reach api.wandb.ai)" in caplog.text


def all_selectors() -> list[str]:
    import fwsel

    conf = os.path.join(os.path.dirname(fwsel.__file__), "..", "conf", "selector")
    return sorted(f[:-5] for f in os.listdir(conf) if f.endswith(".yaml"))


@pytest.mark.parametrize("selector", all_selectors())
def test_same_seed_same_selections(selector, tmp_path):
    """Two Trainers from the same config pick the same rows with the same weights, bit for bit."""
    from hydra import compose, initialize_config_module

    from fwsel.outputs import RunWriter
    from fwsel.tracking import NoTracker

    with initialize_config_module("fwsel.conf", version_base="1.3"):
        cfg = compose("train", [*FAST, f"selector={selector}", "steps=3", "eval_every=3", "target.eval_size=4"])
    out = []
    for i in range(2):
        writer = RunWriter(str(tmp_path / str(i)))
        trainer = Trainer(cfg, writer, NoTracker())
        trainer.run()
        trainer.close()
        writer.close()
        out.append(text(tmp_path / str(i), "selected.jsonl"))
    assert out[0] == out[1] and len(out[0].splitlines()) == 3


def test_exhausted_stream_and_skipped_lines(tmp_path, monkeypatch, capsys):
    """A file stream that runs out stops cleanly (status exhausted, checkpoint, summary); lines
    skipped with data.on_error=skip are counted as data_skipped (the stream's `skipped`)."""
    rows = [json.dumps({"prompt": f"{i}+1=", "response": str(i + 1)}) for i in range(40)]
    rows[5] = "{not json"
    rows[17] = json.dumps({"prompt": "no response"})
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "target.jsonl").write_text("\n".join(rows[20:]) + "\n")
    run = tmp_path / "run"
    code, out = run_cli(["train", *FAST, "data=jsonl", f"data.files={tmp_path}/train.jsonl",
                         f"data.target_files={tmp_path}/target.jsonl", "data.on_error=skip", "steps=5",
                         "data.shuffle_buffer=0",  # file order: each bad line is met by the pool that reads it
                         f"hydra.run.dir={run}"], capsys)
    assert code == 0, out
    assert "the stream ran out at step 2 (6 of 16 pool rows left): stopping" in out  # 38 good rows = 2 pools + 6
    s = summary(run)
    assert s["status"] == "exhausted" and s["steps_done"] == 2 and s["data_skipped"] == 2
    assert s["target_eval_loss"] is not None
    assert [r["data_skipped"] for r in metric_rows(run)[1:]] == [1, 2]
    assert os.listdir(run / "checkpoints") == ["step-00000002"]
    code, out = run_cli(["train", f"resume={run}"], capsys)
    assert code == 0 and "already finished" in out
