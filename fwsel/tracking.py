"""Trackers: a no-op object by default, so the loop has no `if use_wandb:` branches."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


class NoTracker:
    def log(self, row: dict, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker(NoTracker):
    def __init__(self, tcfg, cfg_dict: dict, run_dir: str, job_type: str) -> None:
        import wandb

        mode = tcfg.mode
        if mode == "online" and not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
            log.warning("tracker=wandb: no WANDB_API_KEY and WANDB_MODE unset: logging offline under %s", run_dir)
            mode = "offline"
        group = tcfg.group or os.path.basename(os.path.dirname(os.path.abspath(run_dir)))
        self.run = wandb.init(project=tcfg.project, entity=tcfg.entity, mode=mode, dir=run_dir,
                              config=cfg_dict, group=group, job_type=job_type, reinit="finish_previous",
                              name=os.path.basename(run_dir))

    def log(self, row: dict, step: int) -> None:
        flat = {k: v for k, v in row.items() if isinstance(v, (int, float)) and v is not None}
        for key in ("selected_per_source", "weight_per_source"):
            for src, v in (row.get(key) or {}).items():
                flat[f"{key}/{src}"] = v
        self.run.log(flat, step=step)

    def finish(self) -> None:
        self.run.finish()


def build_tracker(cfg, cfg_dict: dict, run_dir: str, rank: int = 0):
    if cfg.tracker.name == "none" or rank != 0:
        return NoTracker()
    return WandbTracker(cfg.tracker, cfg_dict, run_dir, job_type=cfg.selector.name)
