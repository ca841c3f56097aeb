"""Local-file streams (JSONL): rows read in order, seeded shuffle buffer, stable `file:line` ids."""

from __future__ import annotations

import glob
import json
import logging
import os
from typing import Iterator

from fwsel.errors import ConfigError, DataError
from fwsel.rng import np_rng

log = logging.getLogger(__name__)


def expand(pattern: str, key: str) -> list[str]:
    paths = sorted(glob.glob(os.path.expanduser(str(pattern)), recursive=True))
    if not paths:
        raise ConfigError(f"{key}: no file matches {pattern!r}")
    return paths


def to_row(obj, path: str, lineno: int, source_field: str) -> dict:
    """Normalise one record to {id, source, prompt, response} (or {id, source, text})."""
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    row = {"id": f"{path}:{lineno}",
           "source": str(obj.get(source_field) or os.path.splitext(os.path.basename(path))[0])}
    if "prompt" in obj and "response" in obj:
        row["prompt"], row["response"] = obj["prompt"], obj["response"]
    elif "text" in obj:
        row["text"] = obj["text"]
    else:
        raise DataError(f"{path}:{lineno}: a row needs 'prompt' and 'response' (or 'text'); "
                        f"got keys {sorted(obj)}")
    for k in ("prompt", "response", "text"):
        if k in row and not isinstance(row[k], str):
            raise DataError(f"{path}:{lineno}: field {k!r} must be a string, got {type(row[k]).__name__}")
    return row


class JsonlReader:
    """Reads rows; `on_error=skip` skips and counts malformed lines instead of raising."""

    def __init__(self, paths: list[str], source_field: str = "source", on_error: str = "raise") -> None:
        self.paths, self.source_field, self.on_error = paths, source_field, on_error
        self.skipped = 0

    def __iter__(self) -> Iterator[dict]:
        for path in self.paths:
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        try:
                            obj = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
                        yield to_row(obj, path, lineno, self.source_field)
                    except DataError as e:
                        if self.on_error != "skip":
                            raise
                        self.skipped += 1
                        log.warning("skipping %s", e)

    def count(self) -> int:
        return sum(1 for p in self.paths for line in open(p, encoding="utf-8") if line.strip())


def read_line(path: str, lineno: int, source_field: str = "source") -> dict:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if i == lineno:
                return to_row(json.loads(line), path, lineno, source_field)
    raise DataError(f"{path}:{lineno}: no such line")


class IterStream:
    """Pool `t` is rows [t*n, (t+1)*n) of the seeded, shuffled row iterator.

    Replaying from the start and skipping is how a position is restored (resume): the only
    state is the count of rows consumed.
    """

    def __init__(self, reader, seed: int, shuffle_buffer: int = 0, known_size: int | None = None) -> None:
        self.reader, self.seed, self.buffer = reader, int(seed), int(shuffle_buffer)
        self.known_size = known_size
        self._it, self.consumed = None, 0

    def _rows(self) -> Iterator[dict]:
        if self.buffer <= 1:
            yield from self.reader
            return
        rng, buf = np_rng(self.seed, "shuffle"), []
        for row in self.reader:
            buf.append(row)
            if len(buf) >= self.buffer:
                yield buf.pop(int(rng.integers(len(buf))))
        rng.shuffle(buf)
        yield from buf

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
