"""The one small interface every selector implements.

The loop asks a selector what it `needs` for a step ("none": nothing beyond the rows,
"losses": a no-grad forward over the pool, "grads": the gradient engine's `Scores`), hands
it a `Pool`, and gets back a `Selection`: at most `k` pool positions and their weights.
The loop normalises weights to mean 1 over the chosen rows and does the update, so a
selector never touches the model or the optimizer's state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class Pool:
    """Everything a selector may look at for one step."""

    rows: list[dict]  # candidate rows: id, source, text fields (same order as the batch)
    k: int  # the update size (batch_size); a selection holds at most k rows
    step: int  # optimizer steps already taken
    lr: float  # the LR the coming step uses
    rng: torch.Generator  # the selector's own generator (seeded from (seed, "selector", step))
    scores: Any = None  # fwsel.grads.Scores when needs() == "grads"
    losses: torch.Tensor | None = None  # per-sample losses when needs() == "losses"
    optimizer: torch.optim.Optimizer | None = None
    engine: Any = None  # the engine that scored this step (holds the per-sample gradients until the update)
    clip_prev: float = 1.0  # the previous step's gradient-clipping factor (1 when it did not bind)
    max_norm: float | None = None  # optim.max_grad_norm (None: no clipping)


@dataclass
class Selection:
    indices: list[int]  # positions in the pool, distinct
    weights: np.ndarray  # non-negative, same length; the loop rescales to mean 1
    diagnostics: dict[str, float] = field(default_factory=dict)  # logged as sel_<key>


class Selector:
    """Base class. Subclasses set `name`, override `select`, and `needs` if they score."""

    name = "base"
    metric = "sgd"  # GradEngine metric when needs() == "grads": sgd | adam | adam2
    engine_kwargs: dict = {}  # extra GradEngine settings (e.g. adam_q)
    fidelity = False  # set by the loop under diagnostics.fidelity: also predict each step's effect

    def __init__(self, **cfg: Any) -> None:
        self.cfg = cfg

    def needs(self, step: int) -> str:
        return "none"

    def extra_dirs(self, step: int) -> tuple:
        """Extra directions the engine should project on (see GradEngine.score)."""
        return ()

    def select(self, pool: Pool) -> Selection:  # pragma: no cover - interface
        raise NotImplementedError

    def predict_change(self, pool: Pool, indices, weights, clip: float) -> dict[str, float]:
        """The target-loss change this selector's own model predicts for the update on
        `(indices, weights)` (mean-1 weights, `clip` the clipping factor), as `fid_*` metrics
        (see fwsel.fidelity); empty when the selector has no such model."""
        return {}


def uniform(indices) -> Selection:
    idx = [int(i) for i in indices]
    return Selection(idx, np.ones(len(idx)))


def topk(scores, k: int, valid=None) -> list[int]:
    """Indices of the k largest scores, ties broken by pool position; never duplicates."""
    s = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((np.arange(len(s)), -s))  # primary: -score, secondary: position
    if valid is not None:
        order = [i for i in order if valid[i]]
    return [int(i) for i in order[: min(k, len(s))]]
