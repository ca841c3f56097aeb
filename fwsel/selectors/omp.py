"""Gram-form orthogonal matching pursuit with NNLS refits (docs/method.md#filter-then-weight, step 1).

Everything works from `K` (N x N), `b` (N) and `y2` alone: the per-sample gradients are
never needed. The problem, in `u = w / k`:

    minimise over u >= 0, |supp u| <= k:   u^T K u - 2 b . u + lam_r |u|^2

or, with the per-row ridge (`ridge_lambda(K, rho, "self")`), `+ rho sum_i K_ii u_i^2`: each
row's ridge is proportional to its own squared norm, so the problem and the entry rule are
scale-free per row and an exact copy of a chosen row keeps a normalised residual of
`rho / (1 + rho) cos sqrt(y2)` whatever its norm (the pool-wide `lam_r` lets copies of
small-gradient rows back in).

The refit is Lawson-Hanson on the Gram form `(K_SS + lam_r I, b_S)` warm-started from the
previous support: `scipy.optimize.nnls` wants the design matrix and cannot warm start, so
the active-set loop is written here and scipy solves its linear systems.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg


def ridge_lambda(K: np.ndarray, rho: float, mode: str = "pool"):
    """`pool`: `lam_r = rho trace(K) / N`, fixed for the step from the whole pool (a float);
    `self`: `rho K_ii` per row (a vector), the copy-safe ridge."""
    n = K.shape[0]
    if mode == "self":
        return rho * np.diag(K).astype(np.float64)
    return float(rho * np.trace(K) / n) if n else 0.0


def ridged(K: np.ndarray, S: list[int], lam) -> np.ndarray:
    """`K_SS` plus the ridge on its diagonal (`lam` a float or a per-row vector)."""
    A = K[np.ix_(S, S)]  # a fresh array
    A[np.diag_indices(len(S))] += lam if np.isscalar(lam) else np.asarray(lam)[S]
    return A


def explained(K, b, y2: float, S: list[int], u: np.ndarray) -> float:
    """`1 - |sum_S u_i g_i - g_T|^2 / y2` from the Gram form (0 for an empty support)."""
    if not S or y2 <= 0:
        return 0.0
    return float((2 * b[S] @ u - u @ K[np.ix_(S, S)] @ u) / y2)


_POSV = scipy.linalg.lapack.get_lapack_funcs("posv", (np.zeros((1, 1)),))


def _solve_pd(A: np.ndarray, c: np.ndarray) -> np.ndarray:
    """`A x = c` for PSD `A` by Cholesky (LAPACK posv: `scipy.linalg.solve`'s checks and condition
    estimate cost 20x the solve at these sizes); least norm when `A` is singular (ridge 0)."""
    _, x, info = _POSV(A, c, lower=False)
    if info == 0 and np.isfinite(x).all():
        return x
    return scipy.linalg.lstsq(A, c)[0]


def nnls_gram(A: np.ndarray, c: np.ndarray, x0: np.ndarray | None = None) -> np.ndarray:
    """argmin_{x >= 0} x^T A x - 2 c . x for PSD `A` (Lawson-Hanson on the normal equations).

    `x0` (feasible, >= 0) seeds the passive set: its positive entries start free, so a refit
    after adding one atom to an optimal support usually takes one linear solve.
    """
    n = len(c)
    x = np.zeros(n) if x0 is None else np.maximum(np.asarray(x0, dtype=np.float64), 0.0)
    passive = x > 0
    tol = 1e-12 * max(float(np.abs(c).max(initial=0.0)), 1e-300)

    def restore_feasibility(x, passive):
        # Inner loop: solve on the passive set, step back towards x until every entry is >= 0.
        for _ in range(n + 1):
            z = np.zeros(n)
            if passive.any():
                z[passive] = _solve_pd(A[passive][:, passive], c[passive])
            bad = passive & (z <= 0)
            if not bad.any():
                return z, passive
            gap = x[bad] - z[bad]  # >= 0 since z <= 0 <= x; 0 only for a new atom at z = 0
            ratios = np.divide(x[bad], gap, out=np.zeros_like(gap), where=gap > 0)
            step = ratios.min()
            x = x + step * (z - x)
            passive = passive.copy()
            passive[np.flatnonzero(bad)[ratios.argmin()]] = False
            passive &= x > 0
            x[~passive] = 0.0
        return x, passive

    if passive.any():
        x, passive = restore_feasibility(x, passive)
    for _ in range(3 * n + 10):
        grad = c - A @ x  # minus half the gradient: positive where increasing x_j helps
        cand = ~passive & (grad > tol)
        if not cand.any():
            break
        passive = passive.copy()
        passive[np.flatnonzero(cand)[grad[cand].argmax()]] = True
        x, passive = restore_feasibility(x, passive)
    return x


@dataclass
class OMPResult:
    support: list[int]  # pool positions, in order of (last) entry; weights all > 0
    u: np.ndarray  # NNLS weights on the support (the scale-free `u`, not mean 1)
    iters: int  # accepted additions
    stop: str  # "tol" (stopping rule / nothing with r_i > 0) | "gain" | "w_min" | "k" (support full) | "max_iter"


def omp(
    K,
    b,
    y2: float,
    k: int,
    lam,
    tol: float,
    valid=None,
    max_iter=None,
    min_gain: float = 0.0,
    w_min: float = 0.0,
    entry: str = "cosine",
) -> OMPResult:
    """The OMP of docs/method.md#filter-then-weight: add `argmax r_i / sqrt(K_ii)` among `r_i > 0`, refit by NNLS.

    Candidates with `K_ii = 0` (or `valid` False) are removed first. An atom whose refit weight
    reaches 0 leaves the support; it may re-enter later, never in the next iteration. Stops when
    `max r_i / sqrt(K_ii) <= tol sqrt(y2)`, when `|S| = k`, or after `max_iter` (3k) additions.
    Binding stops (the addition is undone): the explained fraction gains less than `min_gain`,
    or the entering row's mean-1 weight `|S| u_i / sum(u)` is below `w_min`. `lam`: a float
    (pool ridge) or a per-row vector (see `ridge_lambda`). `entry="raw"` picks the largest `r_i`
    itself among the rows above the threshold (TracIn's order on the residual: a row with a small
    gradient, e.g. one already learned, enters late even when its direction fits).
    """
    K = np.asarray(K, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    diag = np.diag(K)
    ok = (diag > 0) & np.isfinite(b) & np.isfinite(diag)
    if valid is not None:
        ok &= np.asarray(valid, dtype=bool)
    norm = np.sqrt(np.where(ok, diag, 1.0))
    thresh = tol * np.sqrt(max(float(y2), 0.0))
    max_iter = 3 * k if max_iter is None else max_iter
    support: list[int] = []
    u = np.zeros(0)
    r = b.copy()
    just_dropped: list[int] = []
    iters, stop = 0, "k"
    while len(support) < k:
        if iters >= max_iter:
            stop = "max_iter"
            break
        score = np.where(ok, r / norm, -np.inf)
        score[support + just_dropped] = -np.inf
        eligible = score > max(thresh, 0.0)
        if not eligible.any():
            stop = "tol"
            break
        i = int(np.argmax(np.where(eligible, r if entry == "raw" else score, -np.inf)))
        iters += 1
        prev = (support, u)
        support = support + [i]
        u = nnls_gram(ridged(K, support, lam), b[support], np.append(u, 0.0))
        if (min_gain > 0 or w_min > 0) and prev[0]:
            gain = explained(K, b, y2, support, u) - explained(K, b, y2, *prev)
            w_new = len(support) * u[-1] / u.sum() if u.sum() > 0 else 0.0
            if gain < min_gain or (0 < w_new < w_min):
                support, u = prev
                stop = "gain" if gain < min_gain else "w_min"
                break
        keep = u > 0
        just_dropped = [s for s, kept in zip(support, keep) if not kept]
        support = [s for s, kept in zip(support, keep) if kept]
        u = u[keep]
        r = b - K[:, support] @ u
    return OMPResult(support, u, iters, stop)


def prune_small(K, b, lam, S: list[int], u: np.ndarray, w_min: float) -> tuple[list[int], np.ndarray]:
    """ "In or out": drop rows whose mean-1 weight is below `w_min`, refit NNLS on the rest; repeat."""
    while S and w_min > 0:
        w = len(S) * u / u.sum()
        keep = w >= w_min
        if keep.all():
            break
        S = [s for s, kept in zip(S, keep) if kept]
        if not S:
            return [], np.zeros(0)
        u = nnls_gram(ridged(K, S, lam), b[S], u[keep])
        S, u = [s for s, x in zip(S, u) if x > 0], u[u > 0]
    return S, u
