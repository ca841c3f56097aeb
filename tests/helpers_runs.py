"""Small training runs for tests: the CLI in-process, and what a run wrote."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from fwsel.cli import main

TIMING = ("sec_step", "sec_select")  # the only keys a resumed run may not reproduce
# A few seconds of ftw on the embedded default (pool N = 16, k = 4).
FAST = ["experiment=smoke", "batch_size=4", "target.eval_size=16", "progress=false"]


def run_cli(args, capsys=None):
    """(exit code, console text) of `fwsel <args>` run in this process."""
    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code
    if capsys is None:
        return code, ""
    out = capsys.readouterr()
    return code, out.out + out.err


def metric_rows(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def text(run_dir, name: str) -> str:
    with open(os.path.join(run_dir, name)) as f:
        return f.read()


def summary(run_dir) -> dict:
    return json.loads(text(run_dir, "summary.json"))


def signal_after(monkeypatch, step: int, sig=signal.SIGINT) -> None:
    """Deliver `sig` to this process right after training step `step` (1-based) finishes."""
    from fwsel.loop import Trainer

    orig = Trainer.train_step

    def train_step(self, t):
        row = orig(self, t)
        if t + 1 == step:
            os.kill(os.getpid(), sig)
        return row

    monkeypatch.setattr(Trainer, "train_step", train_step)


def patch_model(monkeypatch, edit) -> None:
    """Apply `edit(model, tokenizer)` to the model the Trainer builds (fault injection)."""
    import fwsel.loop

    orig = fwsel.loop.build_model

    def build(cfg, device):
        model, tok = orig(cfg, device)
        edit(model, tok)
        return model, tok

    monkeypatch.setattr(fwsel.loop, "build_model", build)


def train(run_dir: Path, *overrides: str) -> dict:
    """One `fwsel train` job into `run_dir`; returns {summary, metrics, selected}. Fails on exit != 0."""
    try:
        code = main(["train", *overrides, f"hydra.run.dir={run_dir}", "progress=false"])
    except SystemExit as e:
        code = e.code
    assert code in (0, None), f"fwsel train {' '.join(overrides)} exited {code}"
    return read_run(run_dir)


def read_run(run_dir: Path) -> dict:
    def jsonl(name):
        p = Path(run_dir) / name
        return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []

    return {"summary": json.loads((Path(run_dir) / "summary.json").read_text()),
            "metrics": jsonl("metrics.jsonl"), "selected": jsonl("selected.jsonl")}


def train_losses(run: dict) -> list[float]:
    return [r["train_loss"] for r in run["metrics"] if r["step"] > 0]


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
