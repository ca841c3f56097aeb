"""Selection weights: mean-1 normalisation and the order-preserving cap (docs/method.md#weights).

The loop rescales every selection to mean 1, but FTW must cap AFTER normalising (a cap
before the rescale would not bound the applied weights), so FTW applies both itself.
"""

from __future__ import annotations

import numpy as np


def normalise_mean1(w) -> np.ndarray:
    """`w / mean(w)`: mean 1 over the given entries (all zero stays all zero; one entry is exactly 1)."""
    w = np.asarray(w, dtype=np.float64)
    total = w.sum()
    return w / (total / len(w)) if total > 0 else w.copy()


def cap_weights(w, w_max: float) -> tuple[np.ndarray, bool, bool]:
    """Cap mean-1 weights at `w_max`, keeping mean 1 and the order: `w_i <- min(s w_i, w_max)`.

    A bisection would find `s >= 1`; `sum_i min(s w_i, w_max)` is piecewise linear in `s`,
    so this solves for it exactly instead (the same `s`, no tolerance). If the non-zero
    weights are too few to reach mean 1 under the cap, they are all set to `w_max`.
    Returns (weights, cap_bound, all_at_w_max).
    """
    w = np.asarray(w, dtype=np.float64)
    n = len(w)
    if n == 0 or w.max() <= w_max:
        return w.copy(), False, False
    nz = np.sort(w[w > 0])[::-1]  # descending
    if len(nz) * w_max <= n:  # even every non-zero weight at w_max cannot carry mean 1
        return np.where(w > 0, w_max, 0.0), True, True
    tail = np.cumsum(nz[::-1])[::-1]  # tail[j] = sum of nz[j:]
    for j in range(len(nz)):  # j = how many of the largest weights sit at the cap
        s = (n - j * w_max) / tail[j]
        if s * nz[j] <= w_max and (j == 0 or s * nz[j - 1] >= w_max):
            return np.minimum(s * w, w_max), True, False
    raise AssertionError("unreachable: sum(min(s w, w_max)) is continuous and crosses n")


def normalise_and_cap(w, w_max: float) -> tuple[np.ndarray, bool, bool]:
    """Mean 1, then the order-preserving cap (see `cap_weights`)."""
    return cap_weights(normalise_mean1(w), w_max)
