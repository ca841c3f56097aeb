"""Rows -> batches for the Trainer: fwsel's formats through fwsel's collator, pre-tokenized rows
through the script's (or TRL's) collator; each batch carries its rows' ids and sources."""

from __future__ import annotations

import torch

from fwsel.data.collate import Collator
from fwsel.data.formats import to_row
from fwsel.errors import ConfigError

ROWS = "fwsel_rows"  # batch key holding each row's {id, source, text fields}; popped before the model sees it
TENSORS = ("input_ids", "attention_mask", "labels")
# raw columns the Trainer's column pruning must keep: ids, sources and fwsel's row formats
COLUMNS = ("id", "source", "prompt", "response", "completion", "messages", "instruction", "input", "output",
           "text", "question", "choices", "answer")


class RowCollator:
    """Rows in fwsel's formats go through fwsel's collator (response-only loss); pre-tokenized rows
    (`input_ids`, optional `labels`) through `inner` (e.g. TRL's collator) or right-padding. The
    batch carries `fwsel_rows` (id, source, text fields) for selection and selected.jsonl."""

    def __init__(self, tokenizer, max_len: int, inner=None) -> None:
        self.fw = Collator(tokenizer, max_len) if tokenizer is not None else None
        self.inner = inner
        self.pad = getattr(tokenizer, "pad_token_id", None) or 0

    def _pad(self, feats: list[dict]) -> dict:
        width = max(len(f["input_ids"]) for f in feats)
        out = {"input_ids": torch.full((len(feats), width), self.pad, dtype=torch.long),
               "attention_mask": torch.zeros((len(feats), width), dtype=torch.long),
               "labels": torch.full((len(feats), width), -100, dtype=torch.long)}
        for j, f in enumerate(feats):
            ids = torch.as_tensor(f["input_ids"], dtype=torch.long)
            out["input_ids"][j, : len(ids)] = ids
            out["attention_mask"][j, : len(ids)] = 1
            out["labels"][j, : len(ids)] = torch.as_tensor(f.get("labels", ids), dtype=torch.long)
        return out

    def __call__(self, features, eos: bool = True) -> dict:
        feats = [dict(f) for f in features]
        meta = [{"id": f.pop("id", None), "source": f.pop("source", None)} for f in feats]
        if "input_ids" in feats[0]:
            batch = dict(self.inner(feats)) if self.inner is not None else self._pad(feats)
            if "labels" not in batch:
                batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            rows = [{"id": m["id"], "source": str(m["source"] or "data")} for m in meta]
        else:
            if self.fw is None:
                raise ConfigError("rows with text fields need the tokenizer: pass processing_class=<tokenizer>")
            rows = [{**to_row({**f, "source": m["source"]}, str(m["id"])), "id": m["id"]} for f, m in zip(feats, meta)]
            batch = self.fw(rows, eos=eos)
        batch[ROWS] = rows
        return batch

    def tensors(self, rows, eos: bool = True) -> dict:
        """Just the tensors (fwsel.evaluate's collate)."""
        return {k: v for k, v in self(rows, eos).items() if k in TENSORS}


def with_ids(dataset):
    """The dataset with an `id` column (the row index when it has none)."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None
    if dataset is None or (datasets and isinstance(dataset, datasets.IterableDataset)):
        return dataset
    if datasets and isinstance(dataset, datasets.Dataset):
        return dataset if "id" in dataset.column_names else dataset.add_column("id", list(range(len(dataset))))
    return _Indexed(dataset)


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, data) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        row = self.data[i]
        return row if "id" in row else {**row, "id": i}


def rows_of(data) -> list[dict]:
    return [dict(r) for r in data] if data is not None else []
