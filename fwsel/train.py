"""`fwsel train`: the Hydra entry point (Hydra names the job and log file after this module).

A single run turns a typed error into one logged line, `status: failed` and exit 1; in a
multirun the error is re-raised so Hydra marks only that job failed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import fwsel
from fwsel.errors import FwselError

log = logging.getLogger("fwsel")

PATH_KEYS = ("data.files", "data.target_files", "model.name_or_path", "data.name")


def _path_suffix(overrides) -> str:
    """Keys whose values are paths stay out of run-dir names; a short hash keeps names unique."""
    paths = sorted(o for o in (overrides or []) if o.split("=", 1)[0].lstrip("+~") in PATH_KEYS)
    return "_" + hashlib.sha1("\n".join(paths).encode()).hexdigest()[:8] if paths else ""


OmegaConf.register_new_resolver("fwsel_path_suffix", _path_suffix, replace=True)


def _progress(cfg, steps: int):
    """A rich bar on a terminal (not in sweeps); returns (callback, close)."""
    mode = str(cfg.progress).lower()
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    if mode == "false" or (mode == "auto" and (not sys.stderr.isatty() or multirun)):
        return None, lambda: None
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[info]}"), TimeRemainingColumn())
    bar.start()
    task = bar.add_task(cfg.selector.name, total=steps, info="")

    def update(step: int, row: dict) -> None:
        info = f"loss {row['train_loss']:.3f}" if row.get("train_loss") is not None else ""
        bar.update(task, completed=step, info=info)

    return update, bar.stop


def run(cfg: DictConfig, run_dir: str) -> dict:
    """Train one job into `run_dir`; always leaves a summary.json saying how it ended."""
    from fwsel.config import validate
    from fwsel.loop import Trainer, pool_size
    from fwsel.outputs import RunWriter, read_jsonl
    from fwsel.tracking import build_tracker

    writer = RunWriter(run_dir)
    OmegaConf.save(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)),
                   os.path.join(run_dir, "fwsel_config.yaml"))  # what a re-run sweep compares against
    start = time.time()
    writer.update_summary(
        status="running", error=None, selector=cfg.selector.name, budget=float(cfg.budget),
        batch_size=int(cfg.batch_size), pool_size=pool_size(int(cfg.batch_size), float(cfg.budget))
        if isinstance(cfg.budget, (int, float)) and cfg.budget > 0 else None,
        target_batch_size=cfg.target.batch_size, seed=cfg.seed, steps=cfg.steps, eval_every=cfg.eval_every,
        steps_done=0, fwsel_version=fwsel.__version__, torch_version=torch.__version__, run_dir=run_dir)
    tracker, trainer, close_bar = None, None, lambda: None
    try:
        validate(cfg)
        tracker = build_tracker(cfg, OmegaConf.to_container(cfg, resolve=True), run_dir)
        progress, close_bar = _progress(cfg, int(cfg.steps))
        trainer = Trainer(cfg, writer, tracker, progress)
        writer.update_summary(device=str(trainer.device), effective_budget=trainer.k / trainer.N)
        result = trainer.run()
        writer.update_summary(**result)
    except KeyboardInterrupt:
        writer.update_summary(status="interrupted", error="interrupted by the user")
        raise
    except BaseException as e:
        writer.update_summary(status="failed", error=f"{type(e).__name__}: {e}".splitlines()[0])
        raise
    finally:
        close_bar()
        evals = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r.get("target_eval_loss") is not None]
        if evals:
            writer.update_summary(**{k: v for k, v in evals[-1].items() if k.startswith("target_eval_")})
        writer.update_summary(wall_s=round(time.time() - start, 3))
        if trainer is not None:
            trainer.close()
        if tracker is not None:
            tracker.finish()
        writer.close()
    return writer.summary


IGNORED_KEYS = ("tracker", "progress", "resume")  # may differ between a finished job and its re-run


def changed_keys(old, new, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        if not prefix and key in IGNORED_KEYS:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, path + ".")
        elif a != b:
            out.append(path)
    return out


def already_done(cfg: DictConfig, run_dir: str) -> bool:
    """A re-run sweep skips a job whose summary says ok with the same config; a changed config is refused."""
    import json

    from fwsel.errors import ConfigError

    snap, summ = os.path.join(run_dir, "fwsel_config.yaml"), os.path.join(run_dir, "summary.json")
    new = OmegaConf.to_container(cfg, resolve=True)
    if os.path.exists(snap) and os.path.exists(summ):
        diff = changed_keys(OmegaConf.to_container(OmegaConf.load(snap)), new)
        if diff:
            raise ConfigError(f"{run_dir} already holds a job with a different config (changed: {', '.join(diff)}); "
                              f"use a new hydra.sweep.dir")
        with open(summ) as f:
            return json.load(f).get("status") == "ok"
    return False


@hydra.main(version_base="1.3", config_path="pkg://fwsel.conf", config_name="train")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    try:
        if hc.mode == RunMode.MULTIRUN and already_done(cfg, run_dir):
            log.info("skipping %s: finished with the same config", run_dir)
            return
        summary = run(cfg, run_dir)
    except FwselError as e:
        log.error("%s", e)
        if hc.mode == RunMode.MULTIRUN:
            raise
        sys.exit(1)
    log.info("run dir: %s  (status %s, target_eval_loss %.4f)", run_dir, summary["status"],
             summary.get("target_eval_loss") or float("nan"))
    print(run_dir)
