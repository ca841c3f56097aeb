"""Rows -> a right-padded batch dict (input_ids, attention_mask, labels) as HF collators make it.

Labels are aligned with input_ids (the loss shifts them) and are -100 on the BOS token,
prompt tokens and padding: the loss covers response tokens (and EOS) only. A row longer
than `max_len` loses prompt tokens from the left; the response is kept.
"""

from __future__ import annotations

import torch


class Collator:
    def __init__(self, tokenizer, max_len: int) -> None:
        self.tok, self.max_len = tokenizer, int(max_len)
        self.truncated = 0

    def encode(self, row: dict) -> tuple[list[int], list[int]]:
        enc = lambda s: self.tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        eos = [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []
        if "text" in row:
            ids = (bos + enc(row["text"]) + eos)[: self.max_len]
            return ids, [-100] + ids[1:]
        p, r = enc(row["prompt"]), enc(row["response"]) + eos
        room = self.max_len - len(bos) - len(r)
        if room < len(p):
            self.truncated += 1
            p = p[len(p) - max(room, 0):] if room > 0 else []
            r = r[: self.max_len - len(bos)]
        ids = bos + p + r
        return ids, [-100] * (len(bos) + len(p)) + r

    def __call__(self, rows: list[dict]) -> dict:
        enc = [self.encode(r) for r in rows]
        width = max(len(i) for i, _ in enc)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, (i, lab) in enumerate(enc):
            ids[j, : len(i)] = torch.tensor(i)
            labels[j, : len(lab)] = torch.tensor(lab)
            mask[j, : len(i)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
