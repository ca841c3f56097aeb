"""Score math shared by ftw, greats and less (ftw's `filter=greedy` is GREATS' greedy, and
ftw logs its overlap with less's ranking)."""

from __future__ import annotations

import numpy as np

from fwsel.selectors.base import as_np


def greedy_interaction(b, K, k: int, scale: float, valid) -> tuple[list[int], float, float]:
    """Greedy picks on `b_i - scale sum_{j in S} K_ij`; ties by pool position.

    Returns (picks, first-order total, interaction total) summed over the picks at the time
    each was taken.
    """
    gain = np.where(valid, b, -np.inf)
    picks: list[int] = []
    first = inter = 0.0
    for _ in range(min(k, int(np.sum(valid)))):
        i = int(np.argmax(gain))  # argmax returns the first maximum: the lowest position
        first += b[i]
        inter += b[i] - gain[i]
        picks.append(i)
        gain = gain - scale * K[:, i]
        gain[picks] = -np.inf
    return picks, first, inter


def less_scores(b, sq_norms) -> np.ndarray:
    """`b_i / sqrt(|D g_i|^2)` in the D^2 metric; 0 where the gradient is 0."""
    b, sq = as_np(b), as_np(sq_norms)
    return np.divide(b, np.sqrt(np.maximum(sq, 0.0)), out=np.zeros_like(b), where=sq > 0)
