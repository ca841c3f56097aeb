"""`maxloss`: top-k by per-sample loss `l_i`; forward only (no gradient engine)."""

from __future__ import annotations

import numpy as np

from fwsel.selectors.base import Pool
from fwsel.selectors.tracin import ScoreTopK, as_np


class MaxLoss(ScoreTopK):
    needs_kind = "losses"

    def score(self, pool: Pool) -> np.ndarray:
        return as_np(pool.losses)

    def valid(self, pool: Pool) -> np.ndarray:
        return np.isfinite(self.score(pool))  # a row without supervised tokens has no loss
