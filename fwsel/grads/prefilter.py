"""A cheap first stage for low budgets: the output layer's gradient alignment with the target.

At a low budget a gradient selector backpropagates N rows to keep k. `selector.prefilter_keep`
shortlists the pool first by a signal from one no-grad forward: TracIn on the output head alone,
`a_i = <g_i^head, g_T^head>`. A row's head gradient is `(1/n_i) sum_t r_t h_t^T` (`h_t`: the
final hidden state at a supervised position, `r_t = softmax(logits_t) - onehot(y_t)`), so

    a_i = (1/n_i) sum_{t in i} sum_{s in T} c_s (h_t . h_s)(r_t . r_s)        (c_s = 1 / (v n_row(s)))

a token Gram against the target tokens, taken in chunks of pool tokens so that no more than
`chunk x vocabulary` residuals exist at once. Unlike the loss alone (high for noisy and unrelated
rows alike), it is signed and target-aware: a row the target pulls against scores low.
"""

from __future__ import annotations

import torch

from .loss import HALF, unwrap


def _head_factors(model, batch, chunk_tokens: int, f):
    """Per supervised token: `f(h chunk, r chunk)` for each chunk, with the rows and counts."""
    base = unwrap(model)
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)[0]
    tgt = batch["labels"][:, 1:]
    sup = tgt != -100
    rows, pos = sup.nonzero(as_tuple=True)
    h, y = hidden[:, :-1][rows, pos], tgt[rows, pos]
    wide = torch.float32 if h.dtype in HALF else h.dtype
    outs = []
    for s in range(0, h.shape[0], chunk_tokens):
        hs, ys = h[s : s + chunk_tokens], y[s : s + chunk_tokens]
        r = torch.softmax(head(hs).to(wide), -1)
        r[torch.arange(r.shape[0], device=r.device), ys] -= 1
        outs.append(f(hs.to(wide), r))
    return outs, rows, sup.sum(1)


@torch.no_grad()
def head_alignment(model, pool: dict, target: dict, chunk_tokens: int = 4096) -> torch.Tensor:
    """[N] float64 on the CPU: `<g_i^head, g_T^head>` for the pool rows (NaN where not finite)."""
    parts, t_rows, t_n = _head_factors(model, target, chunk_tokens, lambda h, r: (h, r))
    Ht, Rt = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    c = 1.0 / (t_n.to(Ht)[t_rows] * target["input_ids"].shape[0])  # per target token
    sums, p_rows, p_n = _head_factors(model, pool, chunk_tokens, lambda h, r: (((h @ Ht.T) * (r @ Rt.T)) @ c))
    per_tok = torch.cat(sums).double()
    a = torch.zeros(pool["input_ids"].shape[0], dtype=torch.float64, device=per_tok.device)
    a.index_add_(0, p_rows, per_tok)
    return (a / p_n.double()).cpu()
