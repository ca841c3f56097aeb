"""Local-file streams: JSONL, JSON arrays, parquet and plain text, read lazily in file order.

Row ids are `path:N` (N = line for JSONL/text, 1-based row or item for parquet/JSON arrays)
so any selected row can be read back (`read_record`). Bad data (malformed JSON, a record of
no known format, a field of the wrong type, an empty file) raises `DataError` naming file
and line; with `on_error=skip` the record is skipped and counted in `reader.skipped`.
`IterStream` turns any row iterator into seeded, replayable candidate pools.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
from typing import Callable, Iterator

from fwsel.data.formats import to_row
from fwsel.errors import ConfigError, DataError
from fwsel.rng import np_rng

log = logging.getLogger(__name__)

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "text",
              ".text": "text"}
COUNT_LIMIT = 256 << 20  # count rows up front (known_size) only below this many bytes in all


def check_on_error(on_error: str) -> str:
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"data.on_error must be raise|skip, got {on_error!r}")
    return on_error


def skip_or_raise(err: DataError, on_error: str, logger: logging.Logger, hint: bool = True,
                  count: bool = True) -> int:
    """A bad record under `data.on_error`: `raise` raises `err` (with the hint where skipping can
    help: a bad record among good ones); `skip` logs it and returns 1, the count to add (`count`
    False: 0 and no log, for a record seen before, e.g. in a later epoch)."""
    if on_error != "skip":
        raise DataError(f"{err} (data.on_error=skip skips such records)" if hint else str(err)) from None
    if count:
        logger.warning("skipping %s", err)
    return int(count)


def expand(pattern, key: str) -> list[str]:
    """Sorted matches of a path or glob (or of each entry of a list of them)."""
    pats = [pattern] if isinstance(pattern, str) else list(pattern or [])
    paths = []
    for pat in pats:
        hits = sorted(glob.glob(os.path.expanduser(str(pat)), recursive=True))
        if not hits:
            raise ConfigError(f"{key}: no file matches {pat!r}")
        paths += [p for p in hits if os.path.isfile(p)]
    if not paths:
        raise ConfigError(f"{key}: {pattern!r} matches only directories")
    return paths


def file_format(path: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    base = path[:-3] if path.endswith(".gz") else path
    ext = os.path.splitext(base)[1].lower()
    if ext not in EXTENSIONS:
        raise ConfigError(f"{path}: unknown file type {ext or '(none)'!r}; set data.format=jsonl|json|parquet|text")
    return EXTENSIONS[ext]


def stem(path: str) -> str:
    name = os.path.basename(path[:-3] if path.endswith(".gz") else path)
    return os.path.splitext(name)[0]


def _open(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def records(path: str, fmt: str) -> Iterator[tuple[int, object, DataError | None]]:
    """(N, record, None), or (N, None, error) for a record that cannot be parsed."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a corrupt file
            raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
        n = 0
        for batch in pf.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                n += 1
                yield n, rec, None
        return
    with _open(path) as f:
        if fmt == "json":
            text = f.read()
            if text.lstrip().startswith("["):
                try:
                    items = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
                yield from ((i, rec, None) for i, rec in enumerate(items, 1))
                return
            f = text.splitlines(keepends=True)
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if fmt == "text":
                yield lineno, {"text": line.rstrip("\n")}, None
                continue
            try:
                yield lineno, json.loads(line), None
            except json.JSONDecodeError as e:
                yield lineno, None, DataError(f"{path}:{lineno}: malformed JSON ({e.msg})")


class FileReader:
    """Rows of `paths` in order; `on_error=skip` skips (and counts) what would raise."""

    def __init__(self, paths: list[str], source_field: str = "source", on_error: str = "raise",
                 fmt: str = "auto", fields=None) -> None:
        self.paths, self.source_field, self.on_error = list(paths), source_field, check_on_error(on_error)
        self.formats = [file_format(p, fmt) for p in self.paths]
        self.fields = dict(fields or {})
        self.skipped = 0

    def __iter__(self) -> Iterator[dict]:
        self.skipped = 0  # a replay counts again from the start
        for path, fmt in zip(self.paths, self.formats):
            n_rec = 0
            for n, rec, err in records(path, fmt):
                n_rec += 1
                try:
                    if err is not None:
                        raise err
                    yield to_row(rec, f"{path}:{n}", self.source_field, stem(path), self.fields)
                except DataError as e:
                    self.skipped += skip_or_raise(e, self.on_error, log)
            if n_rec == 0:  # no hint: skipping the whole file would not help
                empty = DataError(f"{path}: empty file (no rows)")
                self.skipped += skip_or_raise(empty, self.on_error, log, hint=False)

    def count(self) -> int | None:
        """Records in all files, when cheap (parquet metadata; small text files); else None."""
        total, small = 0, sum(os.path.getsize(p) for p in self.paths) <= COUNT_LIMIT
        for path, fmt in zip(self.paths, self.formats):
            if fmt == "parquet":
                import pyarrow.parquet as pq

                total += pq.ParquetFile(path).metadata.num_rows
                continue
            if fmt == "json" or path.endswith(".gz") or not small:
                return None
            with open(path, encoding="utf-8", errors="replace") as f:
                total += sum(1 for line in f if line.strip())
        return total


def read_record(path: str, n: int, source_field: str = "source", fmt: str = "auto", fields=None) -> dict:
    """Row `path:n` again (for export)."""
    for i, rec, err in records(path, file_format(path, fmt)):
        if i == n:
            if err is not None:
                raise err
            return to_row(rec, f"{path}:{n}", source_field, stem(path), fields)
    raise DataError(f"{path}:{n}: no such row")


read_line = read_record  # the foundation's name


def take_first(reader, m: int, source: str | None) -> list[dict]:
    """The first `m` rows (of `source`, when given) in reader order: a target set from the stream."""
    out = []
    for row in reader:
        if source is None or row["source"] == source:
            out.append(row)
            if len(out) == m:
                return out
    what = f"rows of source {source!r}" if source is not None else "rows"
    raise ConfigError(f"target.from_stream={m} but the stream has only {len(out)} {what} "
                      f"(data.target_source names the source)")


class Without:
    """The reader minus its first `m` rows of `source` (those became the target set)."""

    def __init__(self, reader, m: int, source: str | None) -> None:
        self.reader, self.m, self.source = reader, int(m), source

    @property
    def skipped(self) -> int:
        return getattr(self.reader, "skipped", 0)

    def __iter__(self) -> Iterator[dict]:
        left = self.m
        for row in self.reader:
            if left and (self.source is None or row["source"] == self.source):
                left -= 1
                continue
            yield row


class IterStream:
    """Pool `t` is rows [t*n, (t+1)*n) of the seeded, shuffled row iterator, read `epochs` times.

    Epoch `e` is the reader's rows through a shuffle buffer seeded from `(seed, e)`, so every
    epoch has its own order and pool `t` stays a pure function of `(seed, t)`. Replaying from
    the start and skipping is how a position is restored (resume): the only state is the count
    of rows consumed. `row_filter(row) -> (usable, truncated)` (set by `Data.attach` once the
    tokenizer exists) drops rows with no supervised token left; `skipped`, `unsupervised` and
    `truncated` count bad, dropped and cut rows of the first epoch read so far.
    `known_size` is the rows of all epochs (None when the source's size is unknown).
    """

    def __init__(self, reader, seed: int, shuffle_buffer: int = 0, known_size: int | None = None,
                 on_error: str = "raise", epochs: int = 1) -> None:
        self.reader, self.seed, self.buffer = reader, int(seed), int(shuffle_buffer)
        self.epochs = int(epochs)
        self.known_size = None if known_size is None else int(known_size) * self.epochs
        self.on_error = on_error
        self.row_filter: Callable[[dict], tuple[bool, bool]] | None = None
        self._it, self.consumed = None, 0
        self.unsupervised = self.truncated = self._bad = 0

    @property
    def skipped(self) -> int:
        """Bad records: from the reader, plus rows the tokenizer side rejected (e.g. a chat template error)."""
        return getattr(self.reader, "skipped", 0) + self._bad

    def counts(self) -> dict:
        return {"data_skipped": self.skipped, "data_unsupervised": self.unsupervised,
                "data_truncated": self.truncated}

    def _usable(self, first: bool) -> Iterator[dict]:
        """The reader's rows the tokenizer side accepts; counts only in the first epoch."""
        for row in self.reader:
            if self.row_filter is not None:
                try:
                    ok, cut = self.row_filter(row)
                except DataError as e:
                    self._bad += skip_or_raise(e, self.on_error, log, count=first)
                    continue
                self.truncated += int(cut and first)
                if not ok:
                    self.unsupervised += int(first)
                    continue
            yield row

    def _epoch(self, e: int) -> Iterator[dict]:
        rows = self._usable(first=e == 0)
        if self.buffer <= 1:
            yield from rows
            return
        rng, buf = np_rng(self.seed, "shuffle", *([e] if e else [])), []  # epoch 0: the one-pass order
        for row in rows:
            buf.append(row)
            if len(buf) >= self.buffer:  # emit a random element: swap it to the end, pop in O(1)
                j = int(rng.integers(len(buf)))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def _rows(self) -> Iterator[dict]:
        self.unsupervised = self.truncated = self._bad = 0
        for e in range(self.epochs):
            yield from self._epoch(e)

    def pool(self, t: int, n: int) -> list[dict]:
        start = t * n
        if self._it is None or start < self.consumed:
            self._it, self.consumed = self._rows(), 0
        for _ in range(start - self.consumed):
            if next(self._it, None) is None:
                return []
            self.consumed += 1
        out = []
        for _ in range(n):
            row = next(self._it, None)
            if row is None:
                break
            out.append(row)
        self.consumed += len(out)
        return out
