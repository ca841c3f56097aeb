"""Target evaluation on `eval`: mean per-sample loss, token perplexity, exact match, and
multiple-choice accuracy. Under torchrun each rank scores a contiguous shard of the rows and the
per-row results are gathered, so every rank returns what one process would.

* `target_eval_loss`: mean over rows of each row's mean-token loss (the training objective).
* `target_eval_ppl`: exp(total loss / total supervised tokens), token-level perplexity.
* `target_eval_acc`: exact match, teacher-forced: every supervised token is the argmax.
* `target_eval_mc_acc` (only when eval rows carry `choices`, i.e. MMLU-style rows): the
  option whose continuation (` A`, ` B`, ...) has the highest summed log-likelihood after
  the row's prompt is the answer, as the lm-eval harness scores MMLU.
"""

from __future__ import annotations

import math

import torch

from fwsel.data.formats import mc_option
from fwsel.distributed import Comm
from fwsel.grads.loss import sequence_losses


def _losses(model, collate, rows, device, chunk_tokens, batch_rows, eos=True, with_correct=False):
    losses, n_tok, correct = [torch.zeros(0, dtype=torch.float64)], [torch.zeros(0, dtype=torch.long)], \
        [torch.zeros(0, dtype=torch.bool)]
    for i in range(0, len(rows), batch_rows):
        batch = {k: v.to(device) for k, v in collate(rows[i:i + batch_rows], eos=eos).items()}
        out = sequence_losses(model, batch, chunk_tokens=chunk_tokens, with_correct=with_correct)
        losses.append(out.losses.double().cpu())
        n_tok.append(out.n_tokens.cpu())
        if with_correct:
            correct.append(out.correct.cpu())
    return torch.cat(losses), torch.cat(n_tok), (torch.cat(correct) if with_correct else None)


def mc_accuracy(model, collate, rows: list[dict], device, chunk_tokens: int, batch_rows: int = 64,
                comm: Comm | None = None) -> float:
    """Share of MC rows whose answer has the highest option log-likelihood (no EOS scored)."""
    comm, total = comm or Comm(), len(rows)
    rows = rows[comm.shard(total)]
    options = [{"id": r["id"], "prompt": r["prompt"], "response": mc_option(j)}
               for r in rows for j in range(len(r["choices"]))]
    losses, n_tok, _ = _losses(model, collate, options, device, chunk_tokens, batch_rows, eos=False)
    loglik = -(losses * n_tok.double())
    hits, s = 0, 0
    for r in rows:
        n = len(r["choices"])
        hits += int(int(torch.argmax(loglik[s:s + n])) == int(r["answer"]))
        s += n
    return float(comm.all_reduce_(torch.tensor([float(hits)], dtype=torch.float64))) / total


@torch.no_grad()
def evaluate(model, collate, rows: list[dict], device, chunk_tokens: int, batch_rows: int = 64,
             comm: Comm | None = None) -> dict:
    comm = comm or Comm()
    was_training = model.training
    model.eval()  # no dropout: evaluation draws nothing from the training RNG
    try:
        part = _losses(model, collate, rows[comm.shard(len(rows))], device, chunk_tokens, batch_rows, with_correct=True)
        losses, n_tok, correct = (comm.gather_rows(x, len(rows)) for x in part)
        out = {"target_eval_loss": losses.mean().item(),
               "target_eval_acc": correct.double().mean().item(),
               "target_eval_ppl": math.exp(min(float((losses * n_tok).sum() / n_tok.sum()), 700.0))}
        mc = [r for r in rows if "choices" in r]
        if mc:
            out["target_eval_mc_acc"] = mc_accuracy(model, collate, mc, device, chunk_tokens, batch_rows, comm)
    finally:
        model.train(was_training)
    return out


SAMPLE_TOKENS = 32  # at most this many new tokens per sample (the reference's length + a few, when shorter)


@torch.no_grad()
def samples(model, collate, rows: list[dict], device, n: int) -> list[dict]:
    """The first `n` eval rows that have a prompt, with the model's greedy completion next to the
    reference. Greedy decoding draws no random number; the RNG state is restored all the same."""
    tok, out = collate.tok, []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            for row in rows:
                if len(out) >= n:
                    break
                head, prompt, ref = collate.parts(row, eos=False)
                if not prompt:  # a `text` row: nothing to complete from
                    continue
                ids = torch.tensor([(head + prompt)[-(collate.max_len - 1):]], device=device)
                pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
                gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=min(SAMPLE_TOKENS, len(ref) + 4), pad_token_id=pad)
                new = gen[0, ids.shape[1]:].tolist()
                out.append({"id": row["id"], "prompt": tok.decode(prompt, skip_special_tokens=True)[-200:],
                            "reference": tok.decode(ref, skip_special_tokens=True),
                            "completion": tok.decode(new, skip_special_tokens=True)})
    finally:
        model.train(was_training)
    return out
