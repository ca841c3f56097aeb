"""FTW v2: the products again, under the second moment the coming AdamW step really sees.

The engine freezes the coming `v'` at `q_pool` (METHOD section 4): the expected `g_hat^2` of a
uniform k-subset, unclipped. Two corrections need `K`, `b`, `y2` in another metric (METHOD
section 9), each from the engine's kept per-sample gradients at the cost of one more Gram
(`N x N` over the captured coordinates) per pass:

- clip: the step sees `c g_hat`, `c = min(1, max_norm / |g_hat|)`, so `q -> c^2 q_pool`, with
  `c` the previous step's measured factor or the chosen update's own factor (fixed point);
- self: the chosen set's own update, `q_S = (c sum_S w_i g_i / |S|)^2`, so a low-weight row
  that alone drives a coordinate is seen at its real (near full-step) effect.

`D = 1 / (sqrt((b2 v + (1 - b2) q) / (1 - b2^(t+1))) + eps)` per coordinate, by
`fwsel.grads.metric.adam_diag_run` (the engine's formula and checks). The chosen update's norm
here covers the captured parameters only (embeddings and norms train outside the buffer), so the
fixed-point `c` is an upper bound.
"""

from __future__ import annotations

import numpy as np
import torch

from fwsel.grads.metric import adam_diag_run, group_of, pool_q


class AdamRegram:
    """Per-coordinate AdamW state and the pool's per-sample gradients, to re-form `K, b, y2`."""

    @staticmethod
    def unsupported(engine) -> str | None:
        """Why the products cannot be re-formed from this engine's rows (None when they can)."""
        cap = getattr(engine, "cap", None)
        if cap is None or getattr(engine, "_rows", None) is None:
            return "they need the engine's per-sample gradients (scored this step)"
        if getattr(engine, "proj", None) is not None or any(b.ghost is not None for b in cap.blocks):
            return "they need exact materialised gradients (engine.projection_dim null, grad_path materialize or auto)"
        return None

    def __init__(self, engine, optimizer, k: int) -> None:
        why = self.unsupported(engine)
        if why:
            raise ValueError(f"selector.clip_q / self_q / objective=step re-form the products: {why}")
        cap, rows = engine.cap, engine.plain_rows()  # what the products read (every rank's rows under torchrun)
        finite = getattr(engine, "_global_finite", None)
        finite = engine._finite if finite is None else finite
        n = len(finite)
        self.G, T = rows[:n], rows[n:]
        nt = max(int((T.abs().sum(1) > 0).sum()), 1)  # non-finite target rows are zero in the buffer
        self.gT = T.sum(0) / nt
        finite = finite.to(self.G.device)
        n_bad = int((~finite).sum())
        self.q_pool = pool_q(self.G, n_bad, max(min(k, n - n_bad), 1))
        self.params = [blk.param for blk in cap.blocks]  # their columns are the buffer's, in order
        self.optimizer, self.groups = optimizer, group_of(optimizer)

    def diag(self, q: torch.Tensor) -> torch.Tensor:
        """`D(q)` over the captured coordinates: the engine's own formula (fwsel.grads.metric)."""
        return adam_diag_run(self.params, self.optimizer, self.groups, self.gT, "pool", q)[0]

    def products(self, q: torch.Tensor) -> tuple[np.ndarray, np.ndarray, float]:
        """`(K, b, y2)` in the metric `D(q)`, float64 on the CPU (one more Gram)."""
        D = self.diag(q)
        GD = self.G * D
        K = (GD @ self.G.T).double().cpu().numpy()
        b = (GD @ self.gT).double().cpu().numpy()
        y2 = float((self.gT * D * self.gT).sum())
        return K, b, y2

    def l2_gram(self) -> np.ndarray:
        """`<g_i, g_j>` over the captured coordinates: the metric the global-norm clip measures in."""
        return (self.G @ self.G.T).double().cpu().numpy()

    def update(self, S: list[int], w: np.ndarray) -> torch.Tensor:
        """`g_hat = sum_S w_i g_i / |S|` over the captured coordinates."""
        coef = torch.as_tensor(np.asarray(w, dtype=np.float64) / max(len(S), 1)).to(self.G)
        return coef @ self.G[torch.as_tensor(S, dtype=torch.long, device=self.G.device)]


CLIP_EPS = 1e-6  # added to the norm, as torch.nn.utils.clip_grad_norm_ does


def clip_factor(norm: float, max_norm, eps: float = 0.0) -> float:
    """`min(1, max_norm / (norm + eps))` (1 without clipping): the loop's clip (eps = CLIP_EPS)
    and ftw's model of it share this one formula."""
    if max_norm is None or not norm + eps > 0:
        return 1.0
    return float(min(1.0, float(max_norm) / (float(norm) + eps)))


def clipped_step(K, K2, b, m: float, alpha: float, solve, iters: int = 30):
    """The support and weights `x` of the clipped update `sum_S x_i g_i` that maximise the predicted
    target-loss decrease `b.x - alpha/2 x^T K x` at the step length the clip imposes,
    `|sum x_i g_i|_2 = m` (METHOD section 9, fwsel docs/method.md "FTW v2").

    The Lagrangian makes it the matching problem on the blended Gram `alpha K + mu K2`, with the
    multiplier `mu >= 0` found by bisection on the step length (decreasing in `mu`); `mu = 0` when
    the unclipped optimum is already shorter than `m`. `solve(A) -> (S, x)` solves
    `min x^T A x - 2 b.x` over `x >= 0` (the filter and weights). Returns (S, x, mu).
    """

    def length(S, x):
        return float(np.sqrt(max(x @ K2[np.ix_(S, S)] @ x, 0.0))) if S else 0.0

    S, x = solve(alpha * K)
    if not S or m is None or length(S, x) <= m:
        return S, x, 0.0
    scale = alpha * max(np.trace(K), 1e-300) / max(np.trace(K2), 1e-300)
    lo, hi = 0.0, scale
    for _ in range(60):  # grow hi until the step is short enough
        S_hi, x_hi = solve(alpha * K + hi * K2)
        if length(S_hi, x_hi) <= m:
            break
        lo, hi = hi, hi * 4
    best = (S_hi, x_hi, hi)
    for _ in range(iters):
        mid = 0.5 * (lo + hi) if lo == 0 else float(np.sqrt(lo * hi))
        S_m, x_m = solve(alpha * K + mid * K2)
        if length(S_m, x_m) <= m:
            hi, best = mid, (S_m, x_m, mid)
        else:
            lo = mid
        if hi - lo <= 1e-3 * hi:
            break
    return best
