"""Data sources: a stream of candidate pools plus a target set split into select / eval.

`build_data(cfg)` returns a `Data` with `stream.pool(t, n)` (rows of step t), `select` and
`eval` rows. A finite source is read `data.epochs` times, reshuffled per epoch;
`total_steps` turns `steps: null` into the pools those epochs hold. Every row is a dict with
`id`, `source` and text fields (`prompt`/`response`, `text` or `messages`; see
`fwsel.data.formats`). `lookup_rows(cfg, ids)` turns stable ids back into rows (for export).

Target sets: `data.target_files` (jsonl) or `data.target_split` (hf), or, with
`target.from_stream=M`, the first M rows of source `data.target_source` (null: any source)
of the unshuffled stream, which are then removed from training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fwsel.data.files import FileReader, IterStream, Without, expand, read_record, take_first
from fwsel.data.synthetic import SyntheticStream, TargetSplit
from fwsel.errors import ConfigError
from fwsel.rng import np_rng

log = logging.getLogger(__name__)


@dataclass
class Data:
    stream: Any
    select: list[dict]
    eval: list[dict]

    def attach(self, collate) -> None:
        """Once the tokenizer exists: drop rows with no supervised token left (stream and target)."""
        if hasattr(self.stream, "row_filter"):
            self.stream.row_filter = collate.check
        for split in ("select", "eval"):
            rows = getattr(self, split)
            kept = [r for r in rows if collate.check(r)[0]]
            if len(kept) < len(rows):
                log.warning("target %s split: %d of %d rows have no supervised token left after truncation: "
                            "dropped", split, len(rows) - len(kept), len(rows))
            if not kept:
                raise ConfigError(f"the target {split} split has no row with a supervised token left "
                                  f"(raise data.max_len?)")
            setattr(self, split, kept)

    def counts(self) -> dict:
        """Rows skipped as bad data, dropped as unsupervised and truncated so far (file/hf streams)."""
        counts = getattr(self.stream, "counts", None)
        return counts() if callable(counts) else {}


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
        split = TargetSplit(int(t.split_seed), int(t.select_size), int(t.eval_size), d.get("task", "add"))
        return SyntheticStream(int(cfg.seed), dict(d.mixture), int(d.n_duplicates), split, d.noisy_mode), split
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _reader_kw(d) -> dict:
    fields = d.get("fields")
    return {"source_field": d.get("source_field", "source"), "on_error": d.get("on_error", "raise"),
            "fields": dict(fields) if fields else None}


def _hf_reader(d, name, config, split, limit=None):
    from fwsel.data.hf import HFReader

    return HFReader(name, config, split, revision=d.get("revision"), limit=limit, **_reader_kw(d))


def _readers(cfg):
    """(train reader, target reader or None, known size of the train reader)."""
    d = cfg.data
    if d.kind == "jsonl":
        if not d.get("files"):
            raise ConfigError("data.files is required for data=jsonl: a path or glob, e.g. data.files='train/*.jsonl'")
        fmt = d.get("format", "auto")
        reader = FileReader(expand(d.files, "data.files"), fmt=fmt, **_reader_kw(d))
        target = (FileReader(expand(d.target_files, "data.target_files"), fmt=fmt, **_reader_kw(d))
                  if d.get("target_files") else None)
        return reader, target, reader.count()
    if not d.get("name"):
        raise ConfigError("data.name is required for data=hf: a hub dataset name or a local dir")
    reader = _hf_reader(d, d.name, d.get("config"), d.get("split", "train"))
    target = None
    if d.get("target_split") and not cfg.target.get("from_stream"):  # from_stream wins over the default split
        target = _hf_reader(d, d.get("target_name") or d.name, d.get("target_config"),
                            d.target_split, limit=d.get("target_limit"))
    return reader, target, reader.known_size()


def build_data(cfg) -> Data:
    d, t = cfg.data, cfg.target
    if d.kind == "synthetic":
        if t.get("from_stream"):
            raise ConfigError("target.from_stream applies to data=jsonl|hf (the embedded stream has its own target)")
        stream, split = synthetic(cfg)
        return Data(stream, split.select, split.eval)
    # data.kind is synthetic|jsonl|hf (fwsel.config.validate)
    reader, target, size = _readers(cfg)
    m = t.get("from_stream")
    if m:
        if target is not None:
            raise ConfigError("set either target.from_stream or data.target_files / data.target_split, not both")
        source = d.get("target_source")
        target_rows = take_first(reader, int(m), source)
        reader = Without(reader, int(m), source)
        size = None if size is None else size - int(m)
    elif target is None:
        keys = "data.target_files" if d.kind == "jsonl" else "data.target_split"
        raise ConfigError(f"no target set: set {keys}, or target.from_stream=M (with data.target_source)")
    else:
        target_rows = list(target)
    select, evals = split_target(target_rows, t)
    stream = IterStream(reader, int(cfg.seed), int(d.get("shuffle_buffer", 0) or 0), size, d.get("on_error", "raise"),
                        epochs=int(d.get("epochs", 1)))  # checked by fwsel.config
    return Data(stream, select, evals)


def total_steps(steps, stream, pool: int) -> int:
    """`steps`, or with `steps: null` the full pools the finite stream holds over its epochs."""
    if steps is not None:
        return int(steps)
    size = getattr(stream, "known_size", None)
    if size is None:
        raise ConfigError("steps=null (train until the data is used up) needs a source of known size; "
                          "this one is endless or of unknown length: give steps=N")
    if size < pool:
        raise ConfigError(f"steps=null: the stream holds {size} rows, fewer than one pool of N={pool}")
    return size // pool


def lookup_rows(cfg, ids: list[str]) -> list[dict]:
    """Rows for stable ids: `seed:step:pos` (generated), `file:N` (files), `name:split:i` (hf)."""
    d = cfg.data
    if d.kind == "synthetic":
        stream = synthetic(cfg)[0]
        return [stream.lookup(i) for i in ids]
    kw = _reader_kw(d)
    if d.kind == "hf":
        by_split: dict[tuple[str, str], list[str]] = {}
        for rid in ids:
            name, split, _ = rid.rsplit(":", 2)
            by_split.setdefault((name, split), []).append(rid)
        found = {}
        for (name, split), group in by_split.items():
            config = d.get("config") if (name, split) == (d.name, d.get("split")) else d.get("target_config")
            found.update(zip(group, _hf_reader(d, name, config, split).lookup(group)))
        return [found[rid] for rid in ids]
    out = []
    for rid in ids:
        path, n = rid.rsplit(":", 1)
        out.append(read_record(path, int(n), kw["source_field"], d.get("format", "auto"), kw["fields"]))
    return out
