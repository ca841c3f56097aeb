"""Rows -> a right-padded batch dict (input_ids, attention_mask, labels) as HF collators make it.

Labels are aligned with input_ids (the loss shifts them) and are -100 on the BOS token,
prompt tokens and padding: the loss covers response tokens (and EOS) only. Every row is
split into (head, prompt, supervised) token lists:

* `text`: BOS | - | text + EOS (cut from the right when too long);
* `prompt`/`response`: BOS | prompt | response + EOS;
* `messages`: with a chat template, the conversation rendered without its last assistant
  turn (plus the generation prompt) is the prompt and what the full rendering adds is the
  supervised span (the common token prefix of the two renderings decides the boundary);
  without one, `formats.plain_chat`'s prompt/response.

A row longer than `max_len` loses prompt tokens from the left (the head stays); the
response is cut only when it alone does not fit. `check(row)` says whether any supervised
token is left and whether the row was cut.
"""

from __future__ import annotations

import torch

from fwsel.data.formats import plain_chat
from fwsel.errors import DataError


class Collator:
    def __init__(self, tokenizer, max_len: int) -> None:
        self.tok, self.max_len = tokenizer, int(max_len)
        self.truncated = 0
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.chat = bool(getattr(tokenizer, "chat_template", None))

    def _enc(self, s: str) -> list[int]:
        return list(self.tok(s, add_special_tokens=False)["input_ids"])

    def _render(self, row: dict, messages: list[dict], gen: bool) -> list[int]:
        try:
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # noqa: BLE001 - jinja templates raise anything (e.g. role order rules)
            raise DataError(f"{row['id']}: the tokenizer's chat template failed ({type(e).__name__}: {e})") from None
        return self._enc(text)

    def parts(self, row: dict, eos: bool = True) -> tuple[list[int], list[int], list[int]]:
        end = self.eos if eos else []
        if "text" in row:
            return self.bos, [], self._enc(row["text"]) + end
        if "messages" in row:
            msgs = row["messages"]
            if not self.chat:
                p, r = plain_chat(msgs)
                return self.bos, self._enc(p), self._enc(r) + end
            full, prefix = self._render(row, msgs, False), self._render(row, msgs[:-1], True)
            n = 0
            while n < min(len(full), len(prefix)) and full[n] == prefix[n]:
                n += 1
            return [], full[:n], full[n:]
        return self.bos, self._enc(row["prompt"]), self._enc(row["response"]) + end

    def encode(self, row: dict, eos: bool = True) -> tuple[list[int], list[int], bool]:
        """(ids, labels, truncated)."""
        head, p, r = self.parts(row, eos)
        room = self.max_len - len(head) - len(r)
        cut = room < len(p)
        if cut:
            p = p[len(p) - room:] if room > 0 else []
            r = r[: max(self.max_len - len(head), 0)]
        ids = (head + p + r)[: self.max_len]
        labels = ([-100] * (len(head) + len(p)) + r)[: len(ids)]
        return ids, labels, cut

    def check(self, row: dict) -> tuple[bool, bool]:
        """(any supervised token left, truncated). Position 0 is never predicted."""
        ids, labels, cut = self.encode(row)
        return any(x != -100 for x in labels[1:]), cut

    def __call__(self, rows: list[dict], eos: bool = True) -> dict:
        enc = []
        for r in rows:
            i, lab, cut = self.encode(r, eos)
            self.truncated += int(cut)
            enc.append((i, lab))
        return self.pad(enc)

    def pad(self, enc: list[tuple[list[int], list[int]]]) -> dict:
        """The batch of rows already encoded as (ids, labels): callers may keep a fixed row's encoding."""
        width = max(len(i) for i, _ in enc)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in enc], dtype=torch.long)
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in enc], dtype=torch.long)
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in enc], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
