"""`fwsel train`: the Hydra entry point (Hydra names the job and log file after this module).

A single run turns a typed error into one logged line, `status: failed` and exit 1; in a
multirun that job is recorded in FAILED_JOBS and the sweep goes on (the compare at its end
still runs; `fwsel train` then exits 1). A config or data error before the first metrics line
leaves no run dir behind. SIGINT/SIGTERM end the run after the current step with a checkpoint,
`status: interrupted` and exit 130/143; a re-run sweep skips finished jobs and resumes
unfinished ones (fwsel.checkpoint).
Under torchrun every rank runs this (fwsel.distributed); only rank 0 writes the run dir, and
any failure ends the process, also in a sweep (the other ranks would wait for it forever).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import sys
import time

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import fwsel
from fwsel import distributed
from fwsel.cli import override_key
from fwsel.errors import ConfigError, FwselError
from fwsel.outputs import FINISHED

log = logging.getLogger("fwsel")

PATH_KEYS = ("data.files", "data.target_files", "model.name_or_path", "data.name")
HEARTBEAT_S = 60  # without a progress bar, a log line at least this often
FAILED_JOBS: list[str] = []  # "<job tag>: <error>" of the sweep jobs that failed with a typed error


class CompareCallback(Callback):
    """`hydra.callbacks.compare` (conf/train.yaml): `fwsel compare` on the sweep dir when a multirun
    ends. A job that failed with a typed error does not stop the sweep: `job` records it and
    `fwsel train` exits 1 after this."""

    def on_multirun_end(self, config, **kwargs) -> None:
        from fwsel.compare import compare_sweep

        compare_sweep(config)


def _path_suffix(overrides) -> str:
    """Keys whose values are paths stay out of run-dir names; a short hash keeps names unique."""
    paths = sorted(o for o in (overrides or []) if override_key(o) in PATH_KEYS)
    return "_" + hashlib.sha1("\n".join(paths).encode()).hexdigest()[:8] if paths else ""


OmegaConf.register_new_resolver("fwsel_path_suffix", _path_suffix, replace=True)


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Called after every step: a rich bar on a terminal (not in sweeps, not on ranks > 0), and
    log lines that carry the step, seconds per step and ETA, so a log file or a pipe sees them too:
    one per evaluation (with the sample completions), and a heartbeat every HEARTBEAT_S without a bar."""

    def __init__(self, cfg, steps: int, start: int) -> None:
        self.steps, self.start, self.t0, self.last_log = steps, start, time.time(), time.time()
        self.name, self.bar, self.task = cfg.selector.name, None, None
        mode = str(cfg.progress).lower()
        self.enabled = distributed.comm().is_main
        if self.enabled and (mode == "true" or (mode == "auto" and sys.stderr.isatty()
                                                and HydraConfig.get().mode != RunMode.MULTIRUN)):
            from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(),
                           TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                           TimeRemainingColumn())
            self.bar.start()
            self.task = self.bar.add_task(self.name, total=steps, completed=start, info="")

    def timing(self, step: int, eta: bool = True) -> str:
        done = step - self.start
        if done <= 0:
            return ""
        per = (time.time() - self.t0) / done
        return f"  {per:.3f} s/step" + (f"  ETA {_duration(per * max(self.steps - step, 0))}" if eta else "")

    def __call__(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        loss = row.get("train_loss")
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=f"loss {loss:.3f}" if loss is not None else "")
        if row.get("target_eval_loss") is not None:
            log.info("step %d/%d  train_loss %s  target_eval_loss %.4f  acc %.3f%s", step, self.steps,
                     "-" if loss is None else f"{loss:.4f}", row["target_eval_loss"], row["target_eval_acc"],
                     self.timing(step, eta=row.get("sec_step") is not None))  # a closing eval: no ETA
            for s in row.get("samples") or []:
                log.info("  sample %s: %r -> %r (reference %r)", s["id"], s["prompt"][-60:], s["completion"],
                         s["reference"])
        elif self.bar is None and time.time() - self.last_log >= HEARTBEAT_S:
            log.info("step %d/%d  train_loss %s%s", step, self.steps, "-" if loss is None else f"{loss:.4f}",
                     self.timing(step))
        else:
            return
        self.last_log = time.time()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _quietly(fn, *args, **kw) -> None:
    """Bookkeeping on the way out must not hide the error that got us there (e.g. a full disk)."""
    try:
        fn(*args, **kw)
    except (OSError, FwselError) as e:
        log.warning("%s", e)


# ---------------------------------------------------------------- summary.json, defined here once
def start_fields(cfg, run_dir: str, previous: dict) -> dict:
    """What summary.json says when a run (or its resume) starts."""
    from fwsel.loop import pool_size

    budget_ok = isinstance(cfg.budget, (int, float)) and 0 < cfg.budget
    return {"status": "running", "error": None, "signal": None, "selector": cfg.selector.name,
            "budget": float(cfg.budget), "batch_size": int(cfg.batch_size),
            "pool_size": pool_size(int(cfg.batch_size), float(cfg.budget)) if budget_ok else None,
            "target_batch_size": cfg.target.batch_size, "seed": cfg.seed, "steps": cfg.steps,
            "eval_every": cfg.eval_every, "steps_done": previous.get("steps_done", 0),
            "fwsel_version": fwsel.__version__, "torch_version": torch.__version__, "run_dir": run_dir,
            "world_size": distributed.comm().world, "threads": torch.get_num_threads()}


def trainer_fields(trainer) -> dict:
    """Known once the trainer is built: the device, the budget in effect, the steps (steps=null: from the data)."""
    return {"device": str(trainer.device), "effective_budget": trainer.k / trainer.N, "steps": trainer.steps}


def end_fields(writer, result: dict, derived_steps: bool, wall_s: float) -> dict:
    """How it ended: status, the final evaluation (null when its loss was not finite), totals, wall time."""
    status = result.get("status")
    if status == "exhausted" and derived_steps:  # steps=null: using the data up is the plan
        status = "ok"
    final = {k: v for k, v in (writer.last_eval or {}).items() if k.startswith("target_eval_")}
    return {**result, **({"status": status} if status else {}), **final, "wall_s": round(wall_s, 3)}


# ---------------------------------------------------------------- one job
def _save_config(cfg, run_dir: str) -> None:
    """The resolved config a re-run sweep compares against."""
    if not distributed.comm().is_main:
        return
    try:
        OmegaConf.save(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)),
                       os.path.join(run_dir, "fwsel_config.yaml"))
    except OSError as e:
        raise FwselError(f"cannot write {run_dir}/fwsel_config.yaml: {e.strerror or e}") from None


def _build(cfg, writer, tracker, resume: bool, ckpt):
    """The trainer, positioned at its first step (resumed from the newest checkpoint when asked)."""
    from fwsel.checkpoint import resume_into
    from fwsel.loop import Trainer

    trainer = Trainer(cfg, writer, tracker, None, ckpt)
    if resume:
        step = resume_into(trainer, ckpt, writer)
        writer.update_summary(resumed_from_step=step, steps_done=step)
    writer.update_summary(**trainer_fields(trainer))
    if cfg.steps is None:
        log.info("steps=null: %d steps, the full pools of N=%d in %d rows (data.epochs=%d)", trainer.steps,
                 trainer.N, trainer.data.stream.known_size, int(cfg.data.get("epochs", 1)))
    log.info("threads: %d torch thread(s) (OMP_NUM_THREADS=%s, OMP_WAIT_POLICY=%s; override with threads=N)",
             torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS", "unset"),
             os.environ.get("OMP_WAIT_POLICY", "unset"))
    return trainer


def continue_hint(run_dir: str) -> str:
    """How to go on after an interruption: resume this run, or (in a sweep) re-run the sweep's command."""
    import shlex

    hc = HydraConfig.get() if HydraConfig.initialized() else None
    if hc is None or hc.mode != RunMode.MULTIRUN:
        return f"fwsel train resume={run_dir}"
    args = [a for a in sys.argv[1:] if override_key(a) != "hydra.sweep.dir"]
    return shlex.join(["fwsel", "train", *args, f"hydra.sweep.dir={hc.sweep.dir}"]) + \
        " (the same sweep: finished jobs are skipped, unfinished ones resumed)"


def _report_stop(writer, stop, trainer, run_dir: str) -> None:
    name = signal.Signals(stop.signum).name
    writer.update_summary(signal=name, error=f"interrupted by {name}")
    log.warning("interrupted by %s at step %d: checkpoint written; continue with: %s",
                name, trainer.step, continue_hint(run_dir))


def run(cfg: DictConfig, run_dir: str, resume: bool = False) -> dict:
    """Train one job into `run_dir` (continuing its newest checkpoint when `resume`);
    always leaves a summary.json saying how it ended."""
    from fwsel.checkpoint import Checkpointer, graceful_stop
    from fwsel.outputs import RunWriter
    from fwsel.tracking import build_tracker

    comm = distributed.comm()
    writer = RunWriter(run_dir, enabled=comm.is_main)  # under torchrun only rank 0 writes
    previous = writer.load_summary() if resume else {}
    _save_config(cfg, run_dir)
    if cfg.get("threads", "auto") != "auto":  # `fwsel train` set OMP_NUM_THREADS to it already; a direct call did not
        torch.set_num_threads(int(cfg.threads))
    start = time.time()
    writer.update_summary(**start_fields(cfg, run_dir, previous))
    tracker, trainer, progress, result = None, None, None, {}
    try:
        tracker = build_tracker(cfg, OmegaConf.to_container(cfg, resolve=True), run_dir, rank=comm.rank,
                                run_id=writer.summary.get("wandb_run_id"))
        if getattr(tracker, "run_id", None):
            writer.update_summary(wandb_run_id=tracker.run_id)
        with graceful_stop() as stop:  # a signal from here on ends the run at the next step boundary
            ckpt = Checkpointer(run_dir, cfg.checkpoint_every, cfg.checkpoint_keep, enabled=comm.is_main)
            trainer = _build(cfg, writer, tracker, resume, ckpt)
            trainer.progress = progress = Progress(cfg, trainer.steps, trainer.step)
            result = trainer.run(stop)
        if result["status"] == "interrupted":
            _report_stop(writer, stop, trainer, run_dir)
    except KeyboardInterrupt:
        _quietly(writer.update_summary, status="interrupted", signal="SIGINT",
                 error="interrupted by the user (the step in progress was abandoned)")
        raise
    except BaseException as e:
        _quietly(writer.update_summary, status="failed", error=f"{type(e).__name__}: {e}".splitlines()[0])
        raise
    finally:
        if progress is not None:
            progress.close()
        _quietly(writer.update_summary, **end_fields(writer, result, cfg.steps is None, time.time() - start))
        if trainer is not None:
            trainer.close()
        if tracker is not None:
            tracker.finish()
        writer.close()
    return writer.summary


# ---------------------------------------------------------------- a run dir seen again
def changed_keys(old, new, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config dicts (resume-safe keys aside)."""
    from fwsel.outputs import RESUME_SAFE

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


LEFT_BY_A_START = (".hydra", "fwsel_config.yaml", "summary.json", "metrics.jsonl", "selected.jsonl", "checkpoints")


def discard_unstarted(run_dir: str, log_name: str) -> bool:
    """Remove what a job that failed before its first step wrote (nothing else); True when the dir is gone."""
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isdir(run_dir) or (os.path.isfile(metrics) and os.path.getsize(metrics) > 0):
        return False
    for name in (*LEFT_BY_A_START, log_name):
        path = os.path.join(run_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.remove(path)
    try:
        os.rmdir(run_dir)  # only when nothing else is in it
    except OSError:
        return False
    return True


class JobTag(logging.Filter):
    """Prefix every log line of a sweep job with its override dir name (parallel jobs interleave)."""

    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "_fwsel_tagged", False):
            record.msg, record._fwsel_tagged = f"[{self.tag}] {record.msg}", True
        return True


def job_tag(hc) -> str:
    """A sweep job's log prefix: its run dir's name (path keys only show as the dir's hash suffix)."""
    return (hc.job.override_dirname or f"job {hc.job.num}") + _path_suffix(hc.overrides.task)


def final_line(summary: dict, run_dir: str) -> str:
    loss, acc = summary.get("target_eval_loss"), summary.get("target_eval_acc")
    first = summary.get("target_eval_loss_initial")
    return (f"done: status {summary['status']}, step {summary.get('steps_done')}/{summary.get('steps')}, "
            f"target_eval_loss {'n/a' if loss is None else f'{loss:.4f}'}"
            + ("" if first is None else f" (step 0: {first:.4f})")
            + f", exact match {'n/a' if acc is None else f'{acc:.3f}'}, wall {_duration(summary.get('wall_s') or 0)}; "
            f"run dir: {run_dir}")


@hydra.main(version_base="1.3", config_path="pkg://fwsel.conf", config_name="train")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    tag = JobTag(job_tag(hc)) if hc.mode == RunMode.MULTIRUN else None
    handlers = logging.getLogger().handlers if tag else []
    for h in handlers:
        h.addFilter(tag)
    try:
        job(cfg, hc)
    finally:
        for h in handlers:
            h.removeFilter(tag)


def job(cfg: DictConfig, hc) -> None:
    """One job: skip it if finished, else validate, train (or resume) and report; exit codes for the CLI."""
    from fwsel.config import validate

    run_dir, multirun = hc.runtime.output_dir, hc.mode == RunMode.MULTIRUN
    state = None  # "new" only once job_state found nothing there: only then may a failure remove the dir
    try:
        if cfg.resume and os.path.abspath(str(cfg.resume)) != os.path.abspath(run_dir):
            raise ConfigError(f"resume={cfg.resume}: resume through `fwsel train resume=<run dir>` "
                              f"(it writes into that dir; this job's dir is {run_dir})")
        comm = distributed.comm()  # rank 0 reads the run dir, every rank acts on what it found
        state = job_state(cfg, run_dir) if comm.is_main and (cfg.resume or multirun) else "new"
        state = comm.broadcast_object(state)
        if state == "done":
            log.info("%s already finished with this config: nothing to %s", run_dir,
                     "resume" if cfg.resume else "re-run (skipped)")
            return
        validate(cfg)
        summary = run(cfg, run_dir, resume=state == "resume")
    except FwselError as e:
        gone = state == "new" and distributed.comm().is_main \
            and discard_unstarted(run_dir, f"{hc.job.name}.log")  # a config or data error before the first metrics
        log.error("%s%s", e, " (nothing started: no run dir kept)" if gone else "")
        if multirun and not distributed.comm().active:  # the other jobs go on; the CLI exits 1 at the end
            FAILED_JOBS.append(f"{job_tag(hc)}: {e}")
            return
        sys.exit(1)
    except KeyboardInterrupt:
        from fwsel.checkpoint import MANIFEST, Checkpointer

        ck = Checkpointer(run_dir, None, 1, enabled=False)  # the manifest is written last: a complete save
        saved = [s for s in ck.steps() if os.path.isfile(os.path.join(ck.path(s), MANIFEST))]
        log.error("interrupted: the step in progress was abandoned; %s; continue with: %s",
                  f"the last checkpoint (step {saved[-1]}) is intact" if saved
                  else "no checkpoint was written yet, so continuing starts again from step 0",
                  continue_hint(run_dir))
        sys.exit(130)
    if summary["status"] == "interrupted":
        sys.exit(128 + signal.Signals[summary["signal"]].value)  # 130 SIGINT, 143 SIGTERM; stops a sweep too
    if not distributed.comm().is_main:
        return
    log.info("%s", final_line(summary, run_dir))
    print(run_dir)
