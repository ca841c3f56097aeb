"""Per-sample sequence losses with a chunked output head (docs/method.md#losses-and-gradients).

The model's built-in `labels=` loss is a token mean over the whole batch and forms the
full `B x T x V` logits; selection needs one mean-token loss per row and must not hold
full-vocabulary logits for every position. So we run the decoder body once, gather the
hidden states of supervised positions only, and apply the head chunk by chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

HALF = (torch.float16, torch.bfloat16)


@dataclass
class LossOut:
    losses: torch.Tensor  # [B] per-row mean CE over supervised tokens
    n_tokens: torch.Tensor  # [B] supervised token counts
    correct: torch.Tensor | None = None  # [B] every supervised token is the argmax


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _head_ce(head, h, y, loss_dtype, softcap, want_argmax):
    logits = head(h).to(loss_dtype)
    if softcap:  # Gemma-style final logit soft-capping
        logits = torch.tanh(logits / softcap) * softcap
    ce = F.cross_entropy(logits, y, reduction="none")
    arg = logits.detach().argmax(-1) if want_argmax else y
    return ce, arg


def sequence_losses(model, batch, chunk_tokens=4096, with_correct=False, on_chunk=None) -> LossOut:
    """Per-row mean-token losses; `labels[t+1]` is predicted at position `t`.

    Under grad, each head chunk is checkpointed when there is more than one, so its logits
    are recomputed in backward instead of being held for every chunk at once.
    """
    base = unwrap(model)
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    ids, labels = batch["input_ids"], batch["labels"]
    mask = batch.get("attention_mask")
    out = decoder(input_ids=ids, attention_mask=mask, use_cache=False)
    hidden = out[0]
    tgt = labels[:, 1:]
    sup = tgt != -100
    n_tok = sup.sum(1)
    if bool((n_tok == 0).any()):
        bad = torch.nonzero(n_tok == 0).flatten().tolist()
        raise ValueError(f"rows {bad} have no supervised token (drop them before scoring)")
    rows, pos = sup.nonzero(as_tuple=True)  # row-major: each row's tokens are contiguous
    h, y = hidden[rows, pos], tgt[rows, pos]
    loss_dtype = torch.float32 if hidden.dtype in HALF else hidden.dtype
    softcap = getattr(base.config, "final_logit_softcapping", None)
    sums = hidden.new_zeros(ids.shape[0], dtype=loss_dtype)
    wrong = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    n = h.shape[0]
    recompute = torch.is_grad_enabled() and h.requires_grad and n > chunk_tokens
    for s in range(0, n, chunk_tokens):
        r, hs, ys = rows[s : s + chunk_tokens], h[s : s + chunk_tokens], y[s : s + chunk_tokens]
        if on_chunk is not None:
            on_chunk(r)
        args = (head, hs, ys, loss_dtype, softcap, with_correct)
        ce, arg = checkpoint(_head_ce, *args, use_reentrant=False) if recompute else _head_ce(*args)
        sums = sums.index_add(0, r, ce)
        if with_correct:
            wrong.index_add_(0, r, (arg != ys).long())
    losses = sums / n_tok.to(loss_dtype)
    return LossOut(losses, n_tok, (wrong == 0) if with_correct else None)


def pad_to(batch: dict, width: int) -> dict:
    """Right-pad a collated batch to `width` (mask 0, labels -100, ids 0)."""
    extra = width - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    fills = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    return {k: F.pad(batch[k], (0, extra), value=fills[k]) for k in fills if k in batch}


def concat_batches(a: dict, b: dict) -> dict:
    """Rows of `a` then rows of `b`, padded to a common width."""
    a, b = ({"attention_mask": torch.ones_like(x["input_ids"]), **x} for x in (a, b))
    w = max(a["input_ids"].shape[1], b["input_ids"].shape[1])
    a, b = pad_to(a, w), pad_to(b, w)
    return {k: torch.cat([a[k], b[k]]) for k in ("input_ids", "attention_mask", "labels")}


def take_rows(batch: dict, idx) -> dict:
    """Rows `idx` of a batch, with trailing all-padding columns trimmed."""
    sub = {k: v[idx] for k, v in batch.items()}
    width = int(sub["attention_mask"].sum(0).nonzero().max()) + 1 if sub["attention_mask"].any() else 1
    return {k: v[:, :width] for k, v in sub.items()}
