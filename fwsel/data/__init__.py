"""Data sources: a stream of candidate pools plus a target set split into select / eval.

`build_data(cfg)` returns a `Data` with `stream.pool(t, n)` (rows of step t), `select` and
`eval` rows. Every row is a dict with `id`, `source` and text fields (`prompt`/`response`
or `text`). `lookup_rows(cfg, ids)` turns stable ids back into rows (for export).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fwsel.data.files import IterStream, JsonlReader, expand, read_line
from fwsel.data.synthetic import SyntheticStream, TargetSplit
from fwsel.errors import ConfigError
from fwsel.rng import np_rng


@dataclass
class Data:
    stream: Any
    select: list[dict]
    eval: list[dict]


def split_target(rows: list[dict], tcfg) -> tuple[list[dict], list[dict]]:
    """min(select_size, n // 2) rows to `select` after a fixed shuffle, the rest (capped) to `eval`."""
    n = len(rows)
    order = np_rng(int(tcfg.split_seed), "target-split").permutation(n)
    n_sel = min(int(tcfg.select_size), n // 2)
    select = [rows[i] for i in order[:n_sel]]
    evals = [rows[i] for i in order[n_sel:n_sel + int(tcfg.eval_size)]]
    if not select or not evals:
        raise ConfigError(f"the target set has {n} usable rows: need at least 2 so that both "
                          f"the select and eval splits are non-empty")
    return select, evals


def synthetic(cfg) -> tuple[SyntheticStream, TargetSplit]:
    """The embedded stream and its target split, from the config alone."""
    d, t = cfg.data, cfg.target
    try:
        split = TargetSplit(int(t.split_seed), int(t.select_size), int(t.eval_size))
        return SyntheticStream(int(cfg.seed), dict(d.mixture), int(d.n_duplicates), split, d.noisy_mode), split
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_data(cfg) -> Data:
    d, t = cfg.data, cfg.target
    if d.kind == "synthetic":
        stream, split = synthetic(cfg)
        return Data(stream, split.select, split.eval)
    if d.kind == "jsonl":
        on_error = d.get("on_error", "raise")
        reader = JsonlReader(expand(d.files, "data.files"), d.get("source_field", "source"), on_error)
        target_rows = list(JsonlReader(expand(d.target_files, "data.target_files"),
                                       d.get("source_field", "source"), on_error))
        select, evals = split_target(target_rows, t)
        stream = IterStream(reader, int(cfg.seed), int(d.get("shuffle_buffer", 0) or 0), reader.count())
        return Data(stream, select, evals)
    raise ConfigError(f"data.kind must be one of synthetic|jsonl, got {d.kind!r}")


def lookup_rows(cfg, ids: list[str]) -> list[dict]:
    """Rows for stable ids: `seed:step:pos` (generated) or `file:line` (files)."""
    if cfg.data.kind == "synthetic":
        stream = synthetic(cfg)[0]
        return [stream.lookup(i) for i in ids]
    field = cfg.data.get("source_field", "source")
    out = []
    for rid in ids:
        path, line = rid.rsplit(":", 1)
        out.append(read_line(path, int(line), field))
    return out
