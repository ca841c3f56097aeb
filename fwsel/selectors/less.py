"""`less` (LESS-style): top-k by the cosine of `D g_i` with `D g_T`, uniform weights.

A deliberate simplification of LESS's one-step Adam feature: optimizer-aware, no redundancy
term. `<D g_i, D g_T>` is the engine's `adam2` metric, so the cosine is
`b_i / sqrt(K_ii)` up to the per-step constant `|D g_T|`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fwsel.selectors.base import Pool
from fwsel.selectors.tracin import ScoreTopK, as_np, choice


def less_scores(b, sq_norms) -> np.ndarray:
    """`b_i / sqrt(|D g_i|^2)` in the D^2 metric; 0 where the gradient is 0."""
    b, sq = as_np(b), as_np(sq_norms)
    return np.divide(b, np.sqrt(np.maximum(sq, 0.0)), out=np.zeros_like(b), where=sq > 0)


class Less(ScoreTopK):
    metric = "adam2"

    def __init__(self, name: str, adam_q: str = "pool", **kw: Any) -> None:
        super().__init__(name=name, adam_q=adam_q, **kw)
        self.engine_kwargs = {"adam_q": choice("adam_q", adam_q, ("pool", "state", "taylor"))}

    def score(self, pool: Pool) -> np.ndarray:
        return less_scores(pool.scores.b[:, 0], pool.scores.sq_norms)
