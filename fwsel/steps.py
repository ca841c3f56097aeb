"""What one step of the loop (fwsel.loop) produces, phase by phase: the scores of the pool
(`Scored`), the update it trained (`Update`), and the fixed part of its metrics row (`StepRow`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class StepRow:
    """The fixed part of a metrics.jsonl row, in the order written (step 0's row: None where
    nothing was trained). The selector's `sel_*`, diagnostics.fidelity's `fid_*`, the stream's
    `data_*` counts and, on evaluation steps, `target_eval_*` follow."""

    step: int  # optimizer steps taken
    examples_seen: int = 0  # pool rows drawn so far (N per step)
    examples_trained: int = 0  # rows trained on so far
    tokens_trained: int = 0  # supervised tokens trained on so far
    lr: float | None = None  # the LR of this step's update
    train_loss: float | None = None  # weighted mean loss of the rows trained (None: no update)
    grad_norm: float | None = None  # the update's norm before clipping
    nonfinite_rows: int | None = None  # candidates dropped this step for a non-finite loss or gradient
    skipped_steps: int | None = None  # steps without an update so far
    sec_step: float | None = None  # wall time of the step
    sec_select: float | None = None  # of which scoring and selecting
    selected_per_source: dict | None = None  # rows trained per source tag
    weight_per_source: dict | None = None  # summed weight per source tag


SUMMARY_TOTALS = ("nonfinite_rows", "skipped_steps")  # run totals summary.json reports


@dataclass
class Scored:
    """What the score phase computed for one pool (`finite`: rows that may train)."""

    target: dict | None = None  # the target batch (scored under Needs.GRADS)
    scores: object = None  # fwsel.grads.Scores under Needs.GRADS
    losses: torch.Tensor | None = None  # per-row losses under Needs.LOSSES
    finite: np.ndarray | None = None


@dataclass
class Update:
    """What the update phase did: rows trained (pool positions), weights, and its numbers."""

    idx: list = field(default_factory=list)
    w: np.ndarray = field(default_factory=lambda: np.zeros(0))
    train_loss: float | None = None
    tokens: int = 0
    norm: float = 0.0
    nonfinite: int = 0  # candidates dropped for a non-finite loss or gradient
    fid: dict = field(default_factory=dict)
