"""`tracin` (TracIn-style, online): top-k by `<g_i, g_T>`, SGD geometry, uniform weights.

Also home of what every score-based selector shares: `ScoreTopK` (top-k of one score per
candidate), the candidate mask, and the config-choice check. No LR factor in the score: it
would not change the order for `eta > 0` and would zero every score at `eta = 0`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fwsel.selectors.base import Pool, Selection, Selector, topk, uniform


def choice(key: str, value: Any, options: tuple) -> Any:
    """Validate an enumerated config value; the message names the key and the options."""
    if value not in options:
        raise ValueError(f"selector.{key} must be one of {'|'.join(map(str, options))}, got {value!r}")
    return value


def as_np(x) -> np.ndarray:
    """float64 numpy copy of a tensor or array (scores arrive as torch tensors)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    return np.array(x, dtype=np.float64)


def candidates(scores) -> np.ndarray:
    """Rows a gradient selector may pick: finite gradient and `|g_i| > 0` (METHOD section 2)."""
    finite = scores.finite.detach().cpu().numpy().astype(bool)
    return finite & (as_np(scores.sq_norms) > 0)


class ScoreTopK(Selector):
    """Top-k of `score(pool)` among `valid(pool)`, ties by pool position, uniform weights."""

    needs_kind = "grads"

    def __init__(self, name: str, **kw: Any) -> None:
        super().__init__(name=name, **kw)
        self.name = name
        self.engine_kwargs = {}

    def needs(self, step: int) -> str:
        return self.needs_kind

    def score(self, pool: Pool) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def valid(self, pool: Pool) -> np.ndarray:
        return candidates(pool.scores)

    def select(self, pool: Pool) -> Selection:
        return uniform(topk(self.score(pool), pool.k, valid=self.valid(pool)))


class TracIn(ScoreTopK):
    metric = "sgd"

    def score(self, pool: Pool) -> np.ndarray:
        return as_np(pool.scores.b[:, 0])

    def predict_change(self, pool, indices, weights, clip):
        from fwsel.fidelity import sgd_first_order

        return {"fid_pred": sgd_first_order(pool.scores, indices, clip * np.asarray(weights) / len(indices), pool.lr)}
