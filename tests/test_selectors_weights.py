"""Mean-1 normalisation and the order-preserving cap (docs/method.md#weights)."""

import numpy as np
import pytest

from fwsel.selectors.weights import cap_weights, normalise_and_cap, normalise_mean1


def bisection_cap(w, w_max):
    """The literal recipe: bisection on s >= 1 for mean(min(s w, w_max)) = 1."""
    lo, hi = 1.0, 1.0
    while np.minimum(hi * w, w_max).mean() < 1:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.minimum(mid * w, w_max).mean() < 1 else (lo, mid)
    return np.minimum(hi * w, w_max)


def test_cap_keeps_mean_one_and_order():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 20))
        w = normalise_mean1(rng.lognormal(0, 1.5, size=n) * (rng.random(n) < 0.8) + 1e-9)
        w_max = float(rng.uniform(1.0, 4.0))
        got, bound, all_max = cap_weights(w, w_max)
        assert bound == (w.max() > w_max) and not all_max
        assert got.mean() == pytest.approx(1.0) and got.max() <= w_max + 1e-12
        order = np.argsort(w, kind="stable")
        assert np.all(np.diff(got[order]) >= -1e-12)  # never reorders
        if bound:
            np.testing.assert_allclose(got, bisection_cap(w, w_max), rtol=1e-9, atol=1e-12)
        else:
            assert np.array_equal(got, w)


def test_all_at_w_max_when_too_few_nonzero():
    got, bound, all_max = normalise_and_cap([8.0, 0.0, 0.0, 2.0, 0.0, 0.0], 2.5)
    assert bound and all_max and list(got) == [2.5, 0.0, 0.0, 2.5, 0.0, 0.0]


def test_normalise_mean1():
    assert list(normalise_mean1([1.0, 3.0])) == [0.5, 1.5]
    assert list(normalise_mean1([0.0, 0.0])) == [0.0, 0.0]
    assert normalise_and_cap([], 5.0)[0].size == 0
