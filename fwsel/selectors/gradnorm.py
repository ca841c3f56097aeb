"""`gradnorm`: top-k by `|g_i|^2` (SGD geometry), uniform weights; a cheap baseline."""

from __future__ import annotations

import numpy as np

from fwsel.selectors.base import EngineNeeds, Pool, Product, ScoreTopK, as_np


class GradNorm(ScoreTopK):
    engine_needs = EngineNeeds("sgd", Product.SQ_NORMS)

    def score(self, pool: Pool) -> np.ndarray:
        return as_np(pool.scores.sq_norms)
