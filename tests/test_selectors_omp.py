"""The Gram-form OMP and NNLS against explicit-vector references (scipy.optimize.nnls)."""

import numpy as np
import pytest
from scipy.optimize import nnls

from fwsel.selectors.omp import nnls_gram, omp, ridge_lambda


def explicit_omp(Phi, y, k, rho, tol):
    """docs/method.md#filter-then-weight with residual VECTORS: the ridge as extra rows sqrt(lam) I."""
    N = len(Phi)
    norms = np.linalg.norm(Phi, axis=1)
    ok = norms > 0
    lam = rho * float((norms**2).sum()) / N
    thresh = tol * np.linalg.norm(y)
    S, u, banned, iters = [], np.zeros(0), [], 0
    res = y.copy()
    while len(S) < k and iters < 3 * k:
        score = np.full(N, -np.inf)
        score[ok] = Phi[ok] @ res / norms[ok]
        score[S + banned] = -np.inf
        i = int(np.argmax(score))
        if not score[i] > thresh:
            break
        iters += 1
        S.append(i)
        A = np.vstack([Phi[S].T, np.sqrt(lam) * np.eye(len(S))])
        u = nnls(A, np.concatenate([y, np.zeros(len(S))]))[0]
        banned = [s for s, x in zip(S, u) if x <= 0]
        S, u = [s for s, x in zip(S, u) if x > 0], u[u > 0]
        res = y - Phi[S].T @ u
    return S, u


def random_problem(rng):
    """Random feature rows; some zero rows, some problems rank-deficient or with no b_i > 0."""
    N, p = int(rng.integers(1, 30)), int(rng.integers(2, 16))  # p = 1: exact ties
    Phi = rng.normal(size=(N, p)) * rng.lognormal(0, 1, size=(N, 1))
    Phi[rng.random(N) < 0.1] = 0.0
    y = rng.normal(size=p) * rng.lognormal(0, 2)
    kind = rng.integers(4)
    if kind == 0:  # empty support: every candidate anti-aligned with the target
        Phi *= -np.sign(Phi @ y)[:, None] + (Phi @ y == 0)[:, None]
    elif kind == 1:  # under-full: only a few candidates point along the target
        Phi[(Phi @ y > 0) & (rng.random(N) < 0.8)] *= -1.0
    return Phi, y, int(rng.integers(1, 12))


def test_gram_omp_matches_explicit_vector_omp():
    rng = np.random.default_rng(0)
    sizes = {"empty": 0, "underfull": 0, "full": 0}
    for _ in range(300):
        Phi, y, k = random_problem(rng)
        K, b, y2 = Phi @ Phi.T, Phi @ y, float(y @ y)
        got = omp(K, b, y2, k, ridge_lambda(K, 1e-4), 1e-3)
        S, u = explicit_omp(Phi, y, k, 1e-4, 1e-3)
        assert got.support == S
        np.testing.assert_allclose(got.u, u, rtol=1e-6, atol=1e-9 * (np.abs(u).max(initial=0) + 1e-300))
        assert np.all(got.u > 0) and got.iters <= 3 * k and len(set(S)) == len(S) <= k
        assert all(np.linalg.norm(Phi[i]) > 0 for i in S)  # K_ii = 0 never enters
        sizes["empty" if not S else "underfull" if len(S) < min(k, len(b)) else "full"] += 1
    assert min(sizes.values()) >= 20, sizes  # every regime is exercised


def test_omp_objective_falls_and_drops_can_reenter():
    """Correlated atoms force drops; the objective decreases at each accepted addition."""
    rng = np.random.default_rng(1)
    dropped_any = False
    for _ in range(50):
        base = rng.normal(size=(3, 6))
        Phi = base[rng.integers(3, size=20)] + 0.3 * rng.normal(size=(20, 6))
        y = rng.normal(size=6)
        K, b = Phi @ Phi.T, Phi @ y
        lam = ridge_lambda(K, 1e-4)
        prev = 0.0
        for k in range(1, 9):
            r = omp(K, b, float(y @ y), k, lam, 1e-3)
            obj = r.u @ (K[np.ix_(r.support, r.support)] + lam * np.eye(len(r.u))) @ r.u - 2 * b[r.support] @ r.u
            assert obj <= prev + 1e-9 * abs(prev)
            prev = obj
            dropped_any |= r.iters > len(r.support)
    assert dropped_any


def test_four_copies_keep_one():
    y = np.array([1.0, 2.0, -0.5])
    Phi = np.tile(0.7 * y, (4, 1))
    K, b = Phi @ Phi.T, Phi @ y
    r = omp(K, b, float(y @ y), 4, ridge_lambda(K, 1e-4), 1e-3)
    assert r.support == [0] and r.stop == "tol" and r.iters == 1
    rng = np.random.default_rng(2)  # with other candidates around: still exactly one copy
    Phi2 = np.vstack([Phi, rng.normal(size=(6, 3))])
    K2, b2 = Phi2 @ Phi2.T, Phi2 @ y
    r2 = omp(K2, b2, float(y @ y), 4, ridge_lambda(K2, 1e-4), 1e-3)
    assert len(set(r2.support) & {0, 1, 2, 3}) == 1 and r2.iters <= 12


@pytest.mark.parametrize("warm", [False, True])
def test_nnls_gram_matches_scipy(warm):
    rng = np.random.default_rng(3)
    for _ in range(100):
        n, p = int(rng.integers(1, 12)), int(rng.integers(1, 15))
        X, y = rng.normal(size=(p, n)), rng.normal(size=p)
        A, c = X.T @ X + 1e-6 * np.eye(n), X.T @ y
        ref = nnls(np.vstack([X, 1e-3 * np.eye(n)]), np.concatenate([y, np.zeros(n)]))[0]
        x0 = np.abs(rng.normal(size=n)) * (rng.random(n) < 0.5) if warm else None
        np.testing.assert_allclose(nnls_gram(A, c, x0), ref, rtol=1e-6, atol=1e-8)
