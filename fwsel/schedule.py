"""Optimizer and LR schedule from the `optim` group."""

from __future__ import annotations

import math

import torch

from fwsel.errors import ConfigError

SCHEDULES = ("linear", "cosine", "constant")


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """LR multiplier for the step about to be taken (`step` = steps already done)."""
    if step < warmup:
        return step / warmup  # 0 at the first step: selection must cope with LR = 0
    if schedule == "constant":
        return 1.0
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 - frac if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))


def build_optimizer(ocfg, params, steps: int):
    if ocfg.name != "adamw":
        raise ConfigError(f"optim.name must be adamw, got {ocfg.name!r}")
    if ocfg.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule must be one of {'|'.join(SCHEDULES)}, got {ocfg.schedule!r}")
    opt = torch.optim.AdamW(params, lr=float(ocfg.lr), betas=tuple(float(b) for b in ocfg.betas),
                            eps=float(ocfg.eps), weight_decay=float(ocfg.weight_decay))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, int(ocfg.warmup_steps), steps, ocfg.schedule))
    return opt, sched
