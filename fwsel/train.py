"""`fwsel train`: the Hydra entry point (Hydra names the job and log file after this module).

A single run turns a typed error into one logged line, `status: failed` and exit 1; in a
multirun the error is re-raised so Hydra marks only that job failed. SIGINT/SIGTERM end the
run after the current step with a checkpoint, `status: interrupted` and exit 130/143; a
re-run sweep skips finished jobs and resumes unfinished ones (fwsel.checkpoint).
Under torchrun every rank runs this (fwsel.distributed); only rank 0 writes the run dir, and
any failure ends the process, also in a sweep (the other ranks would wait for it forever).
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import time

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import fwsel
from fwsel import distributed
from fwsel.errors import FwselError

log = logging.getLogger("fwsel")

PATH_KEYS = ("data.files", "data.target_files", "model.name_or_path", "data.name")


def _path_suffix(overrides) -> str:
    """Keys whose values are paths stay out of run-dir names; a short hash keeps names unique."""
    paths = sorted(o for o in (overrides or []) if o.split("=", 1)[0].lstrip("+~") in PATH_KEYS)
    return "_" + hashlib.sha1("\n".join(paths).encode()).hexdigest()[:8] if paths else ""


OmegaConf.register_new_resolver("fwsel_path_suffix", _path_suffix, replace=True)


def _progress(cfg, steps: int, start: int = 0):
    """A rich bar on a terminal (not in sweeps); returns (callback, close)."""
    mode = str(cfg.progress).lower()
    if mode == "false" or not distributed.comm().is_main or (mode == "auto" and (not sys.stderr.isatty() or HydraConfig.get().mode == RunMode.MULTIRUN)):
        return None, lambda: None
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[info]}"), TimeRemainingColumn())
    bar.start()
    task = bar.add_task(cfg.selector.name, total=steps, completed=start, info="")

    def update(step: int, row: dict) -> None:
        info = f"loss {row['train_loss']:.3f}" if row.get("train_loss") is not None else ""
        bar.update(task, completed=step, info=info)

    return update, bar.stop


def _quietly(fn, *args, **kw) -> None:
    """Bookkeeping on the way out must not hide the error that got us there (e.g. a full disk)."""
    try:
        fn(*args, **kw)
    except (OSError, FwselError) as e:
        log.warning("%s", e)


def run(cfg: DictConfig, run_dir: str, resume: bool = False) -> dict:
    """Train one job into `run_dir` (continuing its newest checkpoint when `resume`);
    always leaves a summary.json saying how it ended."""
    from fwsel.checkpoint import Checkpointer, graceful_stop, resume_into
    from fwsel.config import validate
    from fwsel.loop import Trainer, pool_size
    from fwsel.outputs import RunWriter
    from fwsel.tracking import build_tracker

    comm = distributed.comm()
    writer = RunWriter(run_dir, enabled=comm.is_main)  # under torchrun only rank 0 writes
    if resume:
        writer.load_summary()
    try:
        if comm.is_main:  # what a re-run sweep compares against
            OmegaConf.save(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)),
                           os.path.join(run_dir, "fwsel_config.yaml"))
    except OSError as e:
        raise FwselError(f"cannot write {run_dir}/fwsel_config.yaml: {e.strerror or e}") from None
    start = time.time()
    writer.update_summary(
        status="running", error=None, signal=None, selector=cfg.selector.name, budget=float(cfg.budget),
        batch_size=int(cfg.batch_size), pool_size=pool_size(int(cfg.batch_size), float(cfg.budget))
        if isinstance(cfg.budget, (int, float)) and cfg.budget > 0 else None,
        target_batch_size=cfg.target.batch_size, seed=cfg.seed, steps=cfg.steps, eval_every=cfg.eval_every,
        steps_done=writer.summary.get("steps_done", 0) if resume else 0, fwsel_version=fwsel.__version__,
        torch_version=torch.__version__, run_dir=run_dir, world_size=comm.world)
    tracker, trainer, close_bar = None, None, lambda: None
    try:
        validate(cfg)
        tracker = build_tracker(cfg, OmegaConf.to_container(cfg, resolve=True), run_dir, rank=comm.rank,
                                run_id=writer.summary.get("wandb_run_id"))
        if getattr(tracker, "run_id", None):
            writer.update_summary(wandb_run_id=tracker.run_id)
        with graceful_stop() as stop:  # a signal from here on ends the run at the next step boundary
            ckpt = Checkpointer(run_dir, cfg.checkpoint_every, cfg.checkpoint_keep, enabled=comm.is_main)
            trainer = Trainer(cfg, writer, tracker, None, ckpt)
            if resume:
                step = resume_into(trainer, ckpt, writer)
                writer.update_summary(resumed_from_step=step, steps_done=step)
            trainer.progress, close_bar = _progress(cfg, int(cfg.steps), trainer.step)
            writer.update_summary(device=str(trainer.device), effective_budget=trainer.k / trainer.N)
            result = trainer.run(stop)
        writer.update_summary(**result)
        if result["status"] == "interrupted":
            name = signal.Signals(stop.signum).name
            writer.update_summary(signal=name, error=f"interrupted by {name}")
            log.warning("interrupted by %s at step %d: checkpoint written; continue with: fwsel train resume=%s",
                        name, trainer.step, run_dir)
    except KeyboardInterrupt:
        _quietly(writer.update_summary, status="interrupted", signal="SIGINT",
                 error="interrupted by the user (the step in progress was abandoned)")
        raise
    except BaseException as e:
        _quietly(writer.update_summary, status="failed", error=f"{type(e).__name__}: {e}".splitlines()[0])
        raise
    finally:
        close_bar()
        if writer.last_eval is not None:  # the last evaluation (null when its loss was not finite)
            _quietly(writer.update_summary, **{k: v for k, v in writer.last_eval.items() if k.startswith("target_eval_")})
        _quietly(writer.update_summary, wall_s=round(time.time() - start, 3))
        if trainer is not None:
            trainer.close()
        if tracker is not None:
            tracker.finish()
        writer.close()
    return writer.summary


FINISHED = ("ok", "exhausted")  # a job that ended by itself: re-running it changes nothing


def changed_keys(old, new, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config dicts (resume-safe keys aside)."""
    from fwsel.checkpoint import RESUME_SAFE

    out = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        if not prefix and key in RESUME_SAFE:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, path + ".")
        elif a != b:
            out.append(path)
    return out


def job_state(cfg: DictConfig, run_dir: str) -> str:
    """"new" (nothing there), "done" (finished with the same config) or "resume" (left unfinished).

    A run dir holding a job with a different config is refused (its results would mix)."""
    import json

    from fwsel.errors import ConfigError

    snap, summ = os.path.join(run_dir, "fwsel_config.yaml"), os.path.join(run_dir, "summary.json")
    if os.path.exists(snap):
        diff = changed_keys(OmegaConf.to_container(OmegaConf.load(snap)), OmegaConf.to_container(cfg, resolve=True))
        if diff:
            raise ConfigError(f"{run_dir} already holds a job with a different config (changed: {', '.join(diff)}); "
                              f"use a new run or sweep dir")
    if os.path.exists(summ):
        with open(summ) as f:
            return "done" if json.load(f).get("status") in FINISHED else "resume"
    leftovers = ("metrics.jsonl", "checkpoints")
    return "resume" if any(os.path.exists(os.path.join(run_dir, x)) for x in leftovers) else "new"


@hydra.main(version_base="1.3", config_path="pkg://fwsel.conf", config_name="train")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    try:
        if cfg.resume and os.path.abspath(str(cfg.resume)) != os.path.abspath(run_dir):
            from fwsel.errors import ConfigError

            raise ConfigError(f"resume={cfg.resume}: resume through `fwsel train resume=<run dir>` "
                              f"(it writes into that dir; this job's dir is {run_dir})")
        comm = distributed.comm()  # rank 0 reads the run dir, every rank acts on what it found
        state = job_state(cfg, run_dir) if comm.is_main and (cfg.resume or hc.mode == RunMode.MULTIRUN) else "new"
        state = comm.broadcast_object(state)
        if state == "done":
            log.info("%s already finished with this config: nothing to %s", run_dir,
                     "resume" if cfg.resume else "re-run (skipped)")
            return
        summary = run(cfg, run_dir, resume=state == "resume")
    except FwselError as e:
        log.error("%s", e)
        if hc.mode == RunMode.MULTIRUN and not distributed.comm().active:
            raise
        sys.exit(1)
    except KeyboardInterrupt:
        log.error("interrupted: the step in progress was abandoned; the last checkpoint is intact")
        sys.exit(130)
    if summary["status"] == "interrupted":
        sys.exit(128 + signal.Signals[summary["signal"]].value)  # 130 SIGINT, 143 SIGTERM; stops a sweep too
    if not distributed.comm().is_main:
        return
    log.info("run dir: %s  (status %s, target_eval_loss %.4f)", run_dir, summary["status"],
             summary.get("target_eval_loss") or float("nan"))
    print(run_dir)
