"""`less` (LESS-style): top-k by the cosine of `D g_i` with `D g_T`, uniform weights.

A deliberate simplification of LESS's one-step Adam feature: optimizer-aware, no redundancy
term. `<D g_i, D g_T>` is the engine's `adam2` metric, so the cosine is
`b_i / sqrt(K_ii)` up to the per-step constant `|D g_T|`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fwsel.selectors.base import EngineNeeds, Pool, Product, ScoreTopK, choice
from fwsel.selectors.scoring import less_scores


class Less(ScoreTopK):
    def __init__(self, name: str, adam_q: str = "pool", **kw: Any) -> None:
        super().__init__(name=name, adam_q=adam_q, **kw)
        q = choice("adam_q", adam_q, ("pool", "state", "taylor"))
        self.engine_needs = EngineNeeds("adam2", Product.B | Product.SQ_NORMS, adam_q=q)

    def score(self, pool: Pool) -> np.ndarray:
        return less_scores(pool.scores.b[:, 0], pool.scores.sq_norms)
