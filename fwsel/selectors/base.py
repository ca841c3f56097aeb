"""The one small interface every selector implements, and what score-based selectors share.

The loop asks a selector what it `needs` for a step (`Needs.NONE`: nothing beyond the rows,
`Needs.LOSSES`: a no-grad forward over the pool, `Needs.GRADS`: the gradient engine's
`Scores`, computed as its `engine_needs` asks), hands it a `Pool`, and gets back a
`Selection`: at most `k` pool positions and their weights. The loop normalises weights to
mean 1 over the chosen rows and does the update, so a selector never touches the model or
the optimizer's state.
"""

from __future__ import annotations

import enum
import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fwsel.grads.needs import EngineNeeds, Product

__all__ = ["EngineNeeds", "Needs", "Pool", "Product", "ScoreTopK", "Selection", "Selector", "as_np", "candidates",
           "choice", "topk", "uniform"]


class Needs(str, enum.Enum):
    """What one step of a selector needs computed before `select` (compares equal to its value)."""

    NONE = "none"  # the rows alone
    LOSSES = "losses"  # per-row losses: one no-grad forward over the pool
    GRADS = "grads"  # the engine's Scores: one forward and one backward over pool + target


@dataclass
class Pool:
    """Everything a selector may look at for one step."""

    rows: list[dict]  # candidate rows: id, source, text fields (same order as the batch)
    k: int  # the update size (batch_size); a selection holds at most k rows
    step: int  # optimizer steps already taken
    lr: float  # the LR the coming step uses
    rng: torch.Generator  # the selector's own generator (seeded from (seed, "selector", step))
    scores: Any = None  # fwsel.grads.Scores when needs() is Needs.GRADS
    losses: torch.Tensor | None = None  # per-sample losses when needs() is Needs.LOSSES
    optimizer: torch.optim.Optimizer | None = None
    engine: Any = None  # the engine that scored this step (holds the per-sample gradients until the update)
    clip_prev: float = 1.0  # the previous step's gradient-clipping factor (1 when it did not bind)
    max_norm: float | None = None  # optim.max_grad_norm (None: no clipping)


@dataclass
class Selection:
    indices: list[int]  # positions in the pool, distinct
    weights: np.ndarray  # non-negative, same length; the loop rescales to mean 1
    diagnostics: dict[str, float] = field(default_factory=dict)  # logged as sel_<key>


LOOP_KEYS = ("prefilter_keep",)  # keys of the selector group the loop reads (Trainer.shortlist)


class Selector:
    """Base class. Subclasses set `name`, override `select`, and `needs` (and `engine_needs`) if
    they score."""

    name = "base"
    engine_needs = EngineNeeds()  # metric, products and aux metrics of the Scores it reads
    fidelity = False  # set by the loop under diagnostics.fidelity: also predict each step's effect

    def __init__(self, **cfg: Any) -> None:
        self.cfg = cfg
        self.name = cfg.get("name", self.name)
        unknown = sorted(set(cfg) - self.config_keys())
        if unknown:  # a misspelt key built from a config dict would otherwise be silently ignored
            raise ValueError(f"selector.{unknown[0]} is not a key of selector {self.name!r} "
                             f"(keys: {', '.join(sorted(self.config_keys()))})")

    @classmethod
    def config_keys(cls) -> set[str]:
        """The keys a config may give: `name`, the loop's `LOOP_KEYS` and every named parameter of
        the constructors down to this base (a subclass declares its keys as constructor arguments)."""
        keys = {"name", *LOOP_KEYS}
        for c in cls.__mro__[: cls.__mro__.index(Selector)]:
            init = c.__dict__.get("__init__")
            if init is not None:
                keys |= {p.name for p in list(inspect.signature(init).parameters.values())[1:]
                         if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        return keys

    @property
    def metric(self) -> str:
        return self.engine_needs.metric

    def needs(self, step: int) -> Needs:
        return Needs.NONE

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

    def observe(self, fid: dict[str, float]) -> None:
        """The step's `fid_*` metrics once `fid_meas` is known (a selector may fit its model to them)."""

    def state_dict(self) -> dict:
        """What the selector carries from step to step (plain lists and numbers), for checkpoints:
        empty for a selector whose choice is a function of the step's pool alone."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Take back what `state_dict` returned (on resume)."""


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
    """Rows a gradient selector may pick: finite gradient and `|g_i| > 0` (docs/method.md#products)."""
    finite = scores.finite.detach().cpu().numpy().astype(bool)
    if getattr(scores, "nonzero", None) is not None:
        return finite & scores.nonzero.detach().cpu().numpy().astype(bool)
    return finite & (as_np(scores.sq_norms) > 0)


class ScoreTopK(Selector):
    """Top-k of `score(pool)` among `valid(pool)`, ties by pool position, uniform weights."""

    needs_kind = Needs.GRADS

    def __init__(self, name: str, **kw: Any) -> None:
        super().__init__(name=name, **kw)
        self.name = name

    def needs(self, step: int) -> Needs:
        return self.needs_kind

    def score(self, pool: Pool) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def valid(self, pool: Pool) -> np.ndarray:
        return candidates(pool.scores)

    def select(self, pool: Pool) -> Selection:
        return uniform(topk(self.score(pool), pool.k, valid=self.valid(pool)))
