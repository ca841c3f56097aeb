"""`greats` (Wang et al., NeurIPS 2024): greedy on `<g_i, g_T> - gamma eta sum_{j in S} <g_i, g_j>`.

Upstream's `eta <g_i, g_T> - eta^2 sum <g_i, g_j>` divided by `eta`: the same picks for
`eta > 0`, and top-k TracIn at `eta = 0` (the limit) instead of an arbitrary first k. SGD
geometry, no self-term, uniform weights, exactly min(k, candidates) picks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fwsel.selectors.base import EngineNeeds, Pool, Product, ScoreTopK, Selection, as_np, candidates
from fwsel.selectors.scoring import greedy_interaction


class Greats(ScoreTopK):
    engine_needs = EngineNeeds("sgd", Product.B | Product.K)

    def __init__(self, name: str, interaction_scale: float = 1.0, **kw: Any) -> None:
        super().__init__(name=name, interaction_scale=interaction_scale, **kw)
        if not (isinstance(interaction_scale, (int, float)) and interaction_scale >= 0):
            raise ValueError(f"selector.interaction_scale must be >= 0, got {interaction_scale!r}")
        self.gamma = float(interaction_scale)

    def select(self, pool: Pool) -> Selection:
        s = pool.scores
        b = as_np(s.b[:, 0])
        picks, first, inter = greedy_interaction(
            b, as_np(s.K), pool.k, self.gamma * float(pool.lr), candidates(s)
        )
        ratio = abs(inter) / abs(first) if first != 0 else (0.0 if inter == 0 else float("inf"))
        return Selection(picks, np.ones(len(picks)), {"interaction_ratio": float(ratio)})

    def predict_change(self, pool, indices, weights, clip):
        from fwsel.fidelity import sgd_first_order

        u = clip * np.asarray(weights) / len(indices)
        return {"fid_pred": sgd_first_order(pool.scores, indices, u, pool.lr, interaction=self.gamma * float(pool.lr))}
