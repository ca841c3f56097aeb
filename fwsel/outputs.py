"""The run dir's contract: metrics.jsonl, selected.jsonl (one flushed line per step) and
summary.json (rewritten atomically; `status` says how the run ended)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator

from fwsel.errors import FwselError


def _clean(v):
    """JSON-safe values: non-finite floats become null, tensors/numpy scalars plain numbers."""
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


FINISHED = ("ok", "exhausted")  # a job that ended by itself: its numbers count, re-running it changes nothing
STATUSES = (*FINISHED, "failed", "interrupted", "running")  # what summary.json's `status` may say
# keys that change neither the numbers nor the run's identity: resume may change them, compare ignores them
RESUME_SAFE = ("tracker", "progress", "resume", "checkpoint_every", "checkpoint_keep", "max_bad_steps",
               "save_model")


def iter_jsonl(path, on_bad: str = "stop") -> Iterator[dict]:
    """The JSON objects of a JSONL file, one per line (nothing when there is no file).

    A line that does not parse is where a killed writer stopped: `on_bad="stop"` ends there
    (resume cuts the file at that point), `"skip"` reads on past it (readers that want every
    row they can get: `fwsel compare`, `fwsel export-selection`).
    """
    if on_bad not in ("stop", "skip"):
        raise ValueError(f"on_bad must be stop|skip, got {on_bad!r}")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if on_bad == "stop":
                    return
                continue
            if isinstance(row, dict):
                yield row


def read_jsonl(path, on_bad: str = "stop") -> list[dict]:
    return list(iter_jsonl(path, on_bad))


def write_error(path: str, e: OSError) -> FwselError:
    """One line naming the file (a full disk, a read-only or vanished dir)."""
    return FwselError(f"cannot write {path}: {e.strerror or e}")


class JsonlLog:
    """An append-only JSONL file, flushed line by line; the last line can be amended once more."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.last: dict | None = None  # the last line written, and where it starts
        self._last_at: int | None = None
        try:
            self._f = open(path, "a", encoding="utf-8")
        except OSError as e:
            raise write_error(path, e) from None

    def write(self, row: dict) -> None:
        try:
            at = self._f.tell()
            self._f.write(json.dumps(_clean(row)) + "\n")
            self._f.flush()
        except OSError as e:  # what was flushed before stays readable, line by line
            raise write_error(self.path, e) from None
        self.last, self._last_at = _clean(row), at

    def amend_last(self, fields: dict) -> dict:
        """Rewrite the last line with `fields` added (the closing evaluation of a step already logged)."""
        if self.last is None:
            raise FwselError(f"{self.path}: no line to amend")
        row = {**self.last, **_clean(fields)}
        try:
            self._f.truncate(self._last_at)
        except OSError as e:
            raise write_error(self.path, e) from None
        self.write(row)
        return row

    def truncate_to(self, step: int) -> list[dict]:
        """Keep rows with step <= `step` (resume); drops a half-written last line. Returns them."""
        self._f.close()
        rows = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows[:-1])
        self._f = open(self.path, "a", encoding="utf-8")
        self.last = None
        if rows:
            self.write(rows[-1])
        return rows

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:  # a full disk: the flush already failed and was reported
            pass


class RunWriter:
    """Owns the three files of one run dir."""

    def __init__(self, run_dir: str, enabled: bool = True) -> None:
        self.dir, self.enabled = run_dir, enabled
        self.summary: dict = {}
        self.last_eval: dict | None = None  # the newest metrics row with an evaluation
        self.last_row: dict | None = None  # the newest metrics row
        if enabled:
            try:
                os.makedirs(run_dir, exist_ok=True)
            except OSError as e:
                raise write_error(run_dir, e) from None
            self.metrics = JsonlLog(os.path.join(run_dir, "metrics.jsonl"))
            self.selected = JsonlLog(os.path.join(run_dir, "selected.jsonl"))

    def log_metrics(self, row: dict) -> None:
        self.last_row = _clean(row)
        if "target_eval_acc" in row:
            self.last_eval = self.last_row
        if self.enabled:
            self.metrics.write(row)

    def add_to_last_metrics(self, fields: dict) -> dict:
        """The newest metrics row with `fields` added, rewritten in place (one line per step stays true)."""
        row = {**(self.last_row or {}), **_clean(fields)}
        if self.enabled:
            row = self.metrics.amend_last(fields)
        self.last_row = row
        if "target_eval_acc" in row:
            self.last_eval = row
        return row

    def log_selection(self, step: int, ids: list[str], weights) -> None:
        if self.enabled:
            self.selected.write({"step": step, "ids": list(ids), "weights": [float(w) for w in weights]})

    def truncate_to(self, step: int) -> None:
        """Cut metrics and selections back to `step` (resume); -1 empties both."""
        if self.enabled:
            rows = self.metrics.truncate_to(step)
            evals = [r for r in rows if "target_eval_acc" in r]
            self.last_eval = evals[-1] if evals else None
            self.last_row = rows[-1] if rows else None
            self.selected.truncate_to(step)

    def load_summary(self) -> dict:
        """The summary a previous invocation left (resume keeps its keys)."""
        path = os.path.join(self.dir, "summary.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                self.summary = json.load(f)
        return self.summary

    def update_summary(self, **kv) -> None:
        self.summary.update(_clean(kv))
        if not self.enabled:
            return
        path = os.path.join(self.dir, "summary.json")
        try:
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                json.dump(self.summary, f, indent=2, sort_keys=True)
            os.replace(path + ".tmp", path)
        except OSError as e:  # the previous summary.json stays whole (atomic replace)
            raise write_error(path, e) from None

    def close(self) -> None:
        if self.enabled:
            self.metrics.close()
            self.selected.close()
