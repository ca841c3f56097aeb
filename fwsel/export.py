"""`fwsel export-selection`: the rows a run trained on, as a curated JSONL dataset.

Ids in `selected.jsonl` are stable (`seed:step:pos` for generated data, `file:line` for
files), so the rows are rebuilt from the run's saved config through `fwsel.data.lookup_rows`;
no model is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterator

from fwsel.errors import FwselError
from fwsel.outputs import iter_jsonl

CHUNK = 4096  # ids looked up per call: bounds memory on long runs
RESERVED = ("id", "step", "weight", "source")  # keys the export writes itself


class ExportError(Exception):
    """A problem with the run dir that the user must fix (printed as one line, exit 1)."""


def _selected(run_dir: Path) -> Iterator[tuple[int, str, float]]:
    """(step, id, weight) for every selected row; a torn last line (killed run) is skipped."""
    path = run_dir / "selected.jsonl"
    if not path.is_file():
        raise ExportError(f"no selected.jsonl in {run_dir}")
    for rec in iter_jsonl(path, on_bad="skip"):
        ids = rec.get("ids") or []
        weights = rec.get("weights") or [1.0] * len(ids)
        if len(weights) != len(ids):
            raise ExportError(f"{path}: step {rec.get('step')} has {len(ids)} ids but {len(weights)} weights")
        for i, w in zip(ids, weights):
            yield rec.get("step"), str(i), w


def _flush(cfg, batch: list[tuple[int, str, float]], f) -> int:
    from fwsel.data import lookup_rows  # lazy: the CLI's --help and errors stay fast

    ids = [i for _, i, _ in batch]
    rows = lookup_rows(cfg, ids)
    if len(rows) != len(ids):
        raise ExportError(f"lookup_rows returned {len(rows)} rows for {len(ids)} ids")
    for (step, rid, w), row in zip(batch, rows):
        if row.get("id") is not None and str(row["id"]) != rid:
            raise ExportError(f"lookup_rows returned row {row['id']!r} for id {rid!r}")
        out = {"id": rid, "step": step, "weight": w, "source": row.get("source")}
        out.update({k: v for k, v in row.items() if k not in RESERVED})
        f.write(json.dumps(out) + "\n")
    return len(batch)


def export_selection(run_dir: str | Path, out: str | Path) -> int:
    """Write one JSONL line per selected row of `run_dir` to `out`; returns the number of rows."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"not a directory: {run_dir}")
    cfg_path = run_dir / ".hydra" / "config.yaml"
    if not cfg_path.is_file():
        raise ExportError(f"no .hydra/config.yaml in {run_dir} (is it a run dir?)")
    cfg = OmegaConf.load(cfg_path)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")  # a failed lookup leaves no half-written export behind
    n, batch = 0, []
    try:
        with open(tmp, "w") as f:
            for item in _selected(run_dir):
                batch.append(item)
                if len(batch) >= CHUNK:
                    n, batch = n + _flush(cfg, batch, f), []
            if batch:
                n += _flush(cfg, batch, f)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return n


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fwsel export-selection RUN_DIR --out FILE`."""
    p = argparse.ArgumentParser(
        prog="fwsel export-selection",
        description="Write the rows a run selected as JSONL: id, step, weight, source and the row's text "
                    "fields (prompt/response or text). Rows are rebuilt from the run's saved config; "
                    "no model is loaded.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="one job's run dir (holds selected.jsonl and .hydra/)")
    p.add_argument("--out", required=True, metavar="FILE", help="output JSONL file")
    args = p.parse_args(argv)
    try:
        n = export_selection(args.run_dir, args.out)
    except (ExportError, FwselError, ImportError, KeyError, ValueError, OSError) as e:
        print(f"fwsel export-selection: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {n} rows to {args.out}")
    return 0
