"""`maxloss`: top-k by per-sample loss `l_i`; forward only (no gradient engine)."""

from __future__ import annotations

import numpy as np

from fwsel.selectors.base import Needs, Pool, ScoreTopK, as_np


class MaxLoss(ScoreTopK):
    needs_kind = Needs.LOSSES

    def score(self, pool: Pool) -> np.ndarray:
        return as_np(pool.losses)

    def valid(self, pool: Pool) -> np.ndarray:
        return np.isfinite(self.score(pool))  # a row without supervised tokens has no loss
