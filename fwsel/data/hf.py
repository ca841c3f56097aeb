"""`data=hf`: a `datasets` split read as a stream (`load_dataset(..., streaming=True)`).

`datasets` is imported here only, so runs on local files never pay for it. Rows are read in
the dataset's own order and shuffled by fwsel's seeded buffer (`IterStream`), which makes a
position restorable by replay. Row ids are `<name>:<split>:<index>` (index in that order).
A dataset that cannot be loaded fails fast with one line (see `fwsel.hub.check_source`).
"""

from __future__ import annotations

import logging
import os
from typing import Iterator

from fwsel.data.files import check_on_error, skip_or_raise
from fwsel.data.formats import to_row
from fwsel.errors import ConfigError, DataError
from fwsel.hub import _first_line, check_source

log = logging.getLogger(__name__)


def load_split(name: str, config, split: str, revision=None):
    """The streaming split, or ConfigError naming the dataset and how to use a local copy."""
    key = "data.name"
    check_source(name, key, "dataset", repo_type="dataset", revision=revision)
    import datasets

    try:
        return datasets.load_dataset(os.path.expanduser(name), config, split=split, streaming=True, revision=revision)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "cannot load"
        raise ConfigError(f"cannot load dataset {name!r} (config {config!r}, split {split!r}): {_first_line(e)}; "
                          f"point data.name at a local dir of data files, or use data=jsonl "
                          f"data.files=/path/to/files") from None


class HFReader:
    """Rows of one split in the dataset's order; `on_error=skip` skips and counts bad records."""

    def __init__(self, name: str, config, split: str, source_field: str = "source", on_error: str = "raise",
                 fields=None, revision=None, limit=None) -> None:
        self.name, self.split, self.source_field, self.on_error = name, split, source_field, check_on_error(on_error)
        self.fields, self.limit = dict(fields or {}), limit
        self.ds = load_split(name, config, split, revision)
        self.default_source = os.path.basename(str(name).rstrip("/")) + (f"/{config}" if config else "")
        self.skipped = 0

    def known_size(self) -> int | None:
        try:
            n = self.ds.info.splits[self.split].num_examples
        except (AttributeError, KeyError, TypeError):
            return None
        return min(n, self.limit) if self.limit else n

    def _records(self) -> Iterator[dict]:
        """The split's records; a failure inside `datasets` (a cast, a broken shard) is a DataError."""
        it, i = iter(self.ds), 0
        while True:
            try:
                rec = next(it)
            except StopIteration:
                return
            except Exception as e:  # noqa: BLE001
                raise DataError(f"{self.name}:{self.split}:{i}: datasets could not read the record "
                                f"({_first_line(e)})") from None
            yield rec
            i += 1

    def __iter__(self) -> Iterator[dict]:
        self.skipped = 0
        for i, rec in enumerate(self._records()):
            if self.limit is not None and i >= self.limit:
                return
            try:
                yield to_row(rec, f"{self.name}:{self.split}:{i}", self.source_field, self.default_source, self.fields)
            except DataError as e:
                self.skipped += skip_or_raise(e, self.on_error, log)

    def lookup(self, ids: list[str]) -> list[dict]:
        """Rows for ids of this split (one pass up to the largest index)."""
        want = {int(rid.rsplit(":", 1)[1]) for rid in ids}
        found = {}
        for i, rec in enumerate(self._records()):
            if i in want:
                found[i] = to_row(rec, f"{self.name}:{self.split}:{i}", self.source_field, self.default_source,
                                  self.fields)
                if len(found) == len(want):
                    break
        return [found[int(rid.rsplit(":", 1)[1])] for rid in ids]
