"""Run `fwsel train` in-process into a temp dir and read back what it wrote."""

from __future__ import annotations

import json
from pathlib import Path

from fwsel.cli import main

TIMING = ("sec_step", "sec_select")  # the only keys allowed to differ between identical runs


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
