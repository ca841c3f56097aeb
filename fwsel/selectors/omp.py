"""Gram-form orthogonal matching pursuit with NNLS refits (docs/method.md#filter-then-weight, step 1).

Everything works from `K` (N x N), `b` (N) and `y2` alone: the per-sample gradients are
never needed. The problem, in `u = w / k`:

    minimise over u >= 0, |supp u| <= k:   u^T K u - 2 b . u + lam_r |u|^2

The refit is Lawson-Hanson on the Gram form `(K_SS + lam_r I, b_S)` warm-started from the
previous support: `scipy.optimize.nnls` wants the design matrix and cannot warm start, so
the active-set loop is written here and scipy solves its linear systems.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg


def ridge_lambda(K: np.ndarray, rho: float) -> float:
    """`lam_r = rho trace(K) / N`, fixed for the step from the whole pool."""
    n = K.shape[0]
    return float(rho * np.trace(K) / n) if n else 0.0


def _solve_pd(A: np.ndarray, c: np.ndarray) -> np.ndarray:
    try:
        return scipy.linalg.solve(A, c, assume_a="pos")
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):  # singular (ridge 0): least norm
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
                z[passive] = _solve_pd(A[np.ix_(passive, passive)], c[passive])
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
    stop: str  # "tol" (stopping rule / nothing with r_i > 0) | "k" (support full) | "max_iter"


def omp(K, b, y2: float, k: int, lam: float, tol: float, valid=None, max_iter=None) -> OMPResult:
    """The OMP of docs/method.md#filter-then-weight: add `argmax r_i / sqrt(K_ii)` among `r_i > 0`, refit by NNLS.

    Candidates with `K_ii = 0` (or `valid` False) are removed first. An atom whose refit weight
    reaches 0 leaves the support; it may re-enter later, never in the next iteration. Stops when
    `max r_i / sqrt(K_ii) <= tol sqrt(y2)`, when `|S| = k`, or after `max_iter` (3k) additions.
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
        i = int(np.argmax(score)) if len(score) else 0
        if not len(score) or not score[i] > max(thresh, 0.0):
            stop = "tol"
            break
        iters += 1
        support.append(i)
        A = K[np.ix_(support, support)] + lam * np.eye(len(support))
        u = nnls_gram(A, b[support], np.append(u, 0.0))
        keep = u > 0
        just_dropped = [s for s, kept in zip(support, keep) if not kept]
        support = [s for s, kept in zip(support, keep) if kept]
        u = u[keep]
        r = b - K[:, support] @ u
    return OMPResult(support, u, iters, stop)
