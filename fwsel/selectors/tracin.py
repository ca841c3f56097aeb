"""`tracin` (TracIn-style, online): top-k by `<g_i, g_T>`, SGD geometry, uniform weights.

No LR factor in the score: it would not change the order for `eta > 0` and would zero every
score at `eta = 0`. Reads `b` and which rows have a non-zero gradient (the candidate mask), never
`K` or the norms (the engine then makes no pass for the norms).
"""

from __future__ import annotations

import numpy as np

from fwsel.selectors.base import EngineNeeds, Pool, Product, ScoreTopK, as_np


class TracIn(ScoreTopK):
    engine_needs = EngineNeeds("sgd", Product.B | Product.NONZERO)

    def score(self, pool: Pool) -> np.ndarray:
        return as_np(pool.scores.b[:, 0])

    def predict_change(self, pool, indices, weights, clip):
        from fwsel.fidelity import sgd_first_order

        return {"fid_pred": sgd_first_order(pool.scores, indices, clip * np.asarray(weights) / len(indices), pool.lr)}
