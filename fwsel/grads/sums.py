"""The products of one scoring pass: `Scores` (what selectors read), `MatOps` (products of a run
of materialised blocks) and `Sums` (their float64 sums over block runs); fwsel.grads.engine forms them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Scores:
    """Products over the captured parameters, on the CPU, in float64."""

    K: torch.Tensor | None  # [N, N] <g_i, M g_j> (None when the engine was asked for no K)
    b: torch.Tensor  # [N, 1 + n_dir] <g_i, M u> for u = g_T, then each extra direction
    y2: float  # <g_T, M g_T>
    dir_gram: torch.Tensor  # [1 + n_dir, 1 + n_dir] <u_a, M u_b> among (g_T, extra dirs...)
    losses: torch.Tensor  # [N] pool losses
    target_losses: torch.Tensor  # [v] target losses
    sq_norms: torch.Tensor | None  # [N] diag(K) (None when asked for neither K nor the norms)
    finite: torch.Tensor  # [N] bool; False rows of K, b are 0 and never enter the update
    poor_frac: float | None = None  # adam: fraction of coordinates with (1-b2) q > b2 v
    aux: dict = field(default_factory=dict)  # metric -> {"b": [N], "sq_norms": [N], "y2": float}
    n_tokens: torch.Tensor | None = None  # [N] supervised tokens per pool row (int64)
    ghost: dict = field(default_factory=dict)  # token-Gram layers: {"layers", "adam_q", "rank1_err_max"}
    nonzero: torch.Tensor | None = None  # [N] bool |g_i| > 0 (Product.NONZERO; else from sq_norms)


class MatOps:
    """Products for one run of materialised blocks from its per-sample gradients `Gp` ([N, cols]).

    `scratch(shape)` gives the room for a scaled copy of `Gp` (a fresh tensor, or on the CPU a
    reused one: a fresh allocation of that size page-faults every step)."""

    def __init__(self, Gp, scratch=None):
        self.Gp = Gp
        self.scratch = scratch or (lambda shape: None)

    def gram(self, M=None, key=None):
        GM = self.Gp if M is None else torch.mul(self.Gp, M, out=self.scratch(self.Gp.shape))
        return GM @ self.Gp.T

    def sq_norms(self, M=None, key=None):
        if M is None:  # a fused norm per row, no [N, cols] temporary
            return torch.linalg.vector_norm(self.Gp, dim=1).square()
        return torch.mul(self.Gp, self.Gp, out=self.scratch(self.Gp.shape)) @ M

    def dots(self, W):
        return self.Gp @ W.T


class Sums:
    """The products of `Scores`, summed over block runs in float64 on the buffer's device."""

    def __init__(self, n: int, nd: int, aux_metrics, device, with_K: bool, with_sq: bool):
        def zeros(*shape):
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        self.device, self.aux_metrics = device, aux_metrics
        self.K = zeros(n, n) if with_K else None
        self.sq = zeros(n) if with_sq and not with_K else None  # diag(K) when K is formed
        self.B, self.dir_gram = zeros(n, nd), zeros(nd, nd)
        self.aux = {a: {"b": zeros(n), "sq_norms": zeros(n), "y2": zeros(())} for a in aux_metrics}
        self.poor, self.coords = [], 0

    def add(self, ops, U, diag: dict, metric: str) -> None:
        """One block run: `ops` its pool products, `U` the directions (g_T first), `diag` each metric."""
        M = diag[metric]
        UM = U if M is None else U * M
        if self.K is not None:
            self.K += ops.gram(M, metric).to(torch.float64)
        elif self.sq is not None:
            self.sq += ops.sq_norms(M, metric).to(torch.float64)
        self.B += ops.dots(UM).to(torch.float64)
        self.dir_gram += (UM @ U.T).to(torch.float64)
        gT = U[0]
        for a, out in self.aux.items():
            ga = gT if diag[a] is None else gT * diag[a]
            out["b"] += ops.dots(ga[None])[:, 0].to(torch.float64)
            out["sq_norms"] += ops.sq_norms(diag[a], a).to(torch.float64)
            out["y2"] += (gT * ga).sum().to(torch.float64)

    def add_gram_all(self, Kall, n: int, nt: int) -> None:
        """An sgd-only token-Gram layer: `K`, `b` and `y2` from its Gram over pool and target rows."""
        b0, y0 = Kall[:n, n:].sum(1) / max(nt, 1), Kall[n:, n:].sum() / max(nt, 1) ** 2
        self.K += Kall[:n, :n]
        self.B[:, 0] += b0
        self.dir_gram[0, 0] += y0
        for out in self.aux.values():
            out["b"] += b0
            out["sq_norms"] += Kall.diagonal()[:n]
            out["y2"] += y0

    def scores(self, finite, ghost: dict) -> Scores:
        K, B, G = (None if self.K is None else self.K.cpu()), self.B.cpu(), self.dir_gram.cpu()
        sq = K.diagonal().clone() if K is not None else None if self.sq is None else self.sq.cpu()
        aux = {a: {"b": d["b"].cpu(), "sq_norms": d["sq_norms"].cpu(), "y2": float(d["y2"])}
               for a, d in self.aux.items()}
        poor = float(torch.stack(self.poor).sum()) / self.coords if self.coords else None
        return Scores(K=K, b=B, y2=float(G[0, 0]), dir_gram=G, losses=None, target_losses=None, sq_norms=sq,
                      finite=finite, poor_frac=poor, aux=aux, ghost=ghost)


def nonzero_mask(sc: Scores, pool_rows: torch.Tensor, ghost_ops) -> torch.Tensor:
    """[n] `|g_i| > 0`: from the squared norms when formed, else `b_i != 0` (then `g_i != 0`), the
    finite rows with `b_i = 0` (rare: g_T = 0, or orthogonal) settled by their norms over the
    buffer's rows `pool_rows` and every token-Gram layer's `ghost_ops`."""
    if sc.sq_norms is not None:
        return sc.sq_norms > 0
    nz = sc.b[:, 0] != 0
    idx = torch.nonzero(sc.finite & ~nz).flatten()
    if idx.numel():
        sq, at = 0.0, idx.to(pool_rows.device)
        if pool_rows.shape[1]:  # a few rows gathered, or every row's norm then those (no big copy)
            norms = torch.linalg.vector_norm(pool_rows[at], dim=1) if 4 * idx.numel() <= pool_rows.shape[0] \
                else torch.linalg.vector_norm(pool_rows, dim=1)[at]
            sq = norms.double().cpu() ** 2
        for ops in ghost_ops:
            sq = sq + ops.sq_norms()[idx.to(ops.X.device)].cpu()
        nz[idx] = torch.as_tensor(sq) > 0
    return nz


def row_sum(buf, rows: list, coef: list) -> torch.Tensor:
    """`sum_j coef_j buf[rows_j]`, one scaled add per row: no gathered copy of the k rows (the
    update reads each selected row once)."""
    out = torch.mul(buf[rows[0]], coef[0])
    for r, c in zip(rows[1:], coef[1:]):
        out.add_(buf[r], alpha=c)
    return out
