"""Trackers: a no-op object by default, so the loop has no `if use_wandb:` branches."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


class NoTracker:
    run_id = None

    def log(self, row: dict, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker(NoTracker):
    """wandb.init that never hangs a run: online trouble (no network, bad key) -> offline, with a warning.

    `run_id`: continue that wandb run (a resumed fwsel run logs into the same wandb run).
    """

    def __init__(self, tcfg, cfg_dict: dict, run_dir: str, job_type: str, run_id: str | None = None) -> None:
        import wandb

        mode = tcfg.mode
        if mode == "online" and not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
            log.warning("tracker=wandb: no WANDB_API_KEY and WANDB_MODE unset: logging offline under %s", run_dir)
            mode = "offline"
        group = tcfg.group or os.path.basename(os.path.dirname(os.path.abspath(run_dir)))
        kw = dict(project=tcfg.project, entity=tcfg.entity, dir=run_dir, config=cfg_dict, group=group,
                  job_type=job_type, reinit="finish_previous", name=os.path.basename(run_dir),
                  id=run_id, resume="allow" if run_id else None)
        if mode == "online":
            try:
                self.run = wandb.init(mode="online", settings=wandb.Settings(
                    init_timeout=float(tcfg.get("init_timeout", 30))), **kw)
            except Exception as e:  # noqa: BLE001 - wandb raises several types for "cannot reach the server"
                log.warning("tracker=wandb: online init failed (%s): logging offline under %s; upload later with "
                            "`wandb sync`", f"{type(e).__name__}: {e}".splitlines()[0], run_dir)
                mode = "offline"
        if mode != "online":
            self.run = wandb.init(mode=mode, **kw)
        self.run_id = getattr(self.run, "id", None)

    def log(self, row: dict, step: int) -> None:
        flat = {k: v for k, v in row.items() if isinstance(v, (int, float)) and v is not None}
        for key in ("selected_per_source", "weight_per_source"):
            for src, v in (row.get(key) or {}).items():
                flat[f"{key}/{src}"] = v
        if row.get("samples"):  # eval prompts with the greedy completion next to the reference
            import wandb

            cols = ("id", "prompt", "reference", "completion")
            flat["samples"] = wandb.Table(columns=["step", *cols],
                                          data=[[step, *(s[c] for c in cols)] for s in row["samples"]])
        self.run.log(flat, step=step)

    def finish(self) -> None:
        self.run.finish()


def build_tracker(cfg, cfg_dict: dict, run_dir: str, rank: int = 0, run_id: str | None = None):
    if cfg.tracker.name == "none" or rank != 0:
        return NoTracker()
    return WandbTracker(cfg.tracker, cfg_dict, run_dir, job_type=cfg.selector.name, run_id=run_id)
