"""The run dir's contract: metrics.jsonl, selected.jsonl (one flushed line per step) and
summary.json (rewritten atomically; `status` says how the run ended)."""

from __future__ import annotations

import json
import math
import os


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


def read_jsonl(path: str) -> list[dict]:
    """All complete lines (a half-written last line from a killed run is ignored)."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


class JsonlLog:
    def __init__(self, path: str) -> None:
        self.path = path
        self._f = open(path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(_clean(row)) + "\n")
        self._f.flush()

    def truncate_to(self, step: int) -> None:
        """Keep rows with step <= `step` (resume); drops a half-written last line."""
        self._f.close()
        rows = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        self._f = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        self._f.close()


class RunWriter:
    """Owns the three files of one run dir."""

    def __init__(self, run_dir: str, enabled: bool = True) -> None:
        self.dir, self.enabled = run_dir, enabled
        self.summary: dict = {}
        if enabled:
            os.makedirs(run_dir, exist_ok=True)
            self.metrics = JsonlLog(os.path.join(run_dir, "metrics.jsonl"))
            self.selected = JsonlLog(os.path.join(run_dir, "selected.jsonl"))

    def log_metrics(self, row: dict) -> None:
        if self.enabled:
            self.metrics.write(row)

    def log_selection(self, step: int, ids: list[str], weights) -> None:
        if self.enabled:
            self.selected.write({"step": step, "ids": list(ids), "weights": [float(w) for w in weights]})

    def update_summary(self, **kv) -> None:
        self.summary.update(_clean(kv))
        if not self.enabled:
            return
        path = os.path.join(self.dir, "summary.json")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(self.summary, f, indent=2, sort_keys=True)
        os.replace(path + ".tmp", path)

    def close(self) -> None:
        if self.enabled:
            self.metrics.close()
            self.selected.close()
