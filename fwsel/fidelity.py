"""`diagnostics.fidelity`: does a selector's own model of the step predict what the step does?

Each step, the target-loss change the selector predicts for its chosen update (`fid_pred`)
is logged beside the change measured on the same `v` target rows after the step (`fid_meas`,
one extra no-grad forward in eval mode; the "before" losses come from the scoring pass, so
with dropout > 0 the two differ by the dropout noise too). `summarise` gives Spearman and
Pearson over the steps after warm-up, raw and with the LR divided out (a decaying schedule
alone makes prediction and measurement shrink together).

The predictions (docs/method.md#diagnostics), with `u = clip * w / |S|` the applied weights:
- ftw (adam): the linearised AdamW step `dtheta = -eta c D z`, `z = g_hat + (beta/c) m +
  (lam/c) D^-1 theta` (momentum and decay drift included), under Adam's own curvature model
  `H = h D^-1` with `alpha = h eta c` (`selector.alpha`, 1: the step on g_T is the Newton
  step): `dL = -eta c (<g_T, D z> - alpha/2 <z, D z>)`. That curvature scales like 1/eta, so
  the quadratic term does not vanish at small LR: `fid_pred_linear` logs the first-order
  part alone (exact for a small step when v' is frozen at the batch's own g*g);
- tracin, ftw_sgd: first order under SGD, `dL = -eta <g_T, g_hat>`;
- greats: its own utility, `dL = -eta (<g_T, g_hat> - 1/2 gamma eta sum_{i != j} u_i u_j K_ij)`.
"""

from __future__ import annotations

import numpy as np
import torch


def _np(x) -> np.ndarray:
    return x.detach().cpu().to(torch.float64).numpy() if isinstance(x, torch.Tensor) else np.asarray(x, float)


def adam_quadratic(scores, idx, u, scale: float, drift, curvature: float = 1.0) -> float:
    """`-scale (<g_T, M z> - curvature/2 <z, M z>)` for `z = sum_S u_i g_i + sum_a drift[a] dir_a`.

    `scores.b[:, 1 + a]` and `scores.dir_gram` hold the products with the extra directions.
    """
    idx, u, d = list(idx), np.asarray(u, float), np.asarray(drift, float)
    K, B, G = _np(scores.K)[np.ix_(idx, idx)], _np(scores.b)[idx], _np(scores.dir_gram)
    lin = B[:, 0] @ u + d @ G[0, 1:1 + len(d)]
    quad = u @ K @ u + 2 * d @ (B[:, 1:1 + len(d)].T @ u) + d @ G[1:1 + len(d), 1:1 + len(d)] @ d
    return float(-scale * (lin - 0.5 * curvature * quad))


def sgd_first_order(scores, idx, u, lr: float, interaction: float = 0.0) -> float:
    """`-lr (<g_T, g_hat> - 1/2 interaction sum_{i != j} u_i u_j K_ij)` in the SGD geometry."""
    idx, u = list(idx), np.asarray(u, float)
    K = _np(scores.K)[np.ix_(idx, idx)]
    off = u @ K @ u - u @ (np.diag(K) * u)
    return float(-lr * (_np(scores.b)[idx, 0] @ u - 0.5 * interaction * off))


def measured_change(model, batch: dict, before, chunk_tokens: int) -> float | None:
    """Mean target loss of `batch` now (no grad, eval mode: no RNG drawn) minus `before`'s mean."""
    from fwsel.grads.loss import sequence_losses

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            after = sequence_losses(model, batch, chunk_tokens).losses.double().cpu()
    finally:
        model.train(was)
    before = torch.as_tensor(before, dtype=torch.float64)
    ok = torch.isfinite(after) & torch.isfinite(before)
    return float(after[ok].mean() - before[ok].mean()) if bool(ok.any()) else None


def summarise(rows: list[dict], warmup: int = 0, key: str = "fid_pred") -> dict[str, float]:
    """Spearman / Pearson of `key` vs `fid_meas` over steps > warmup, raw and per unit LR."""
    from scipy.stats import pearsonr, spearmanr

    pts = [(r[key], r["fid_meas"], r["lr"]) for r in rows
           if r.get(key) is not None and r.get("fid_meas") is not None and r.get("lr") and r["step"] > warmup]
    if len(pts) < 3:
        return {}
    p, m, lr = (np.array(x, dtype=float) for x in zip(*pts))
    out = {"n": float(len(pts)), "spearman": spearmanr(p, m)[0], "pearson": pearsonr(p, m)[0],
           "spearman_per_lr": spearmanr(p / lr, m / lr)[0], "pearson_per_lr": pearsonr(p / lr, m / lr)[0]}
    return {k: float(v) for k, v in out.items()}
