"""Checkpoints, exact resume and graceful stops.

A checkpoint is `<run dir>/checkpoints/step-XXXXXXXX/` holding
  weights.pt     trainable parameters only (the adapters under LoRA)
  state.pt       optimizer, scheduler, every RNG state, stream position, loop totals, the selector's
                 own state (`Selector.state_dict`: e.g. ftw's alpha_fit sums; empty for most)
  manifest.json  written last: the step and each file's size and sha256 (the completeness marker)
It is written as `step-XXXXXXXX.tmp/` and renamed, so a reader never sees half of one; a file
damaged later (truncated copy, disk trouble) fails its checksum and the previous one is used.

All state goes out through `capture_state` and comes back through `restore_state`; nothing
else touches it. Under torchrun only rank 0 writes (`enabled=(rank == 0)`), every rank's RNG
state is gathered into rank 0's checkpoint, and on resume rank 0 picks the checkpoint that
every rank then loads.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import threading
from contextlib import contextmanager

import numpy as np
import torch

from fwsel.errors import FwselError

log = logging.getLogger("fwsel")

FILES = ("weights.pt", "state.pt")
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step-(\d{8})$")
# Hydra keys that may differ between a run and its resume (with fwsel.outputs.RESUME_SAFE).
RESUME_SAFE_HYDRA = ("hydra.verbose", "hydra/job_logging", "hydra/hydra_logging", "hydra.job_logging",
                     "hydra.hydra_logging")


# ---------------------------------------------------------------- state in, state out
def rng_state() -> dict:
    """Every global generator (per-step generators are rebuilt from (seed, name, step))."""
    np_state = np.random.get_state(legacy=False)
    out = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "numpy": {**np_state, "state": {"key": np_state["state"]["key"].tolist(),
                                            "pos": int(np_state["state"]["pos"])}}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    npst = dict(s["numpy"])
    npst["state"] = {"key": np.asarray(npst["state"]["key"], dtype=np.uint32), "pos": npst["state"]["pos"]}
    np.random.set_state(npst)
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def capture_state(trainer) -> tuple[dict, dict]:
    """(trainable weights, everything else) after `trainer.step` steps."""
    weights = {n: p.detach().cpu().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    stream = trainer.data.stream
    state = {
        "step": trainer.step,
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "rng": rng_state(),
        # the pool at step t is a pure function of t (generated) or rows [t*N, (t+1)*N) of the
        # seeded file stream, re-read and skipped on resume: the row count is kept as a check
        "stream": {"step": trainer.step, "rows_consumed": trainer.step * trainer.N,
                   **({"state": stream.state_dict()} if hasattr(stream, "state_dict") else {})},
        "totals": dict(trainer.totals),
        "selector": trainer.selector.state_dict(),
        "rng_ranks": getattr(trainer, "rank_rng", None),  # under torchrun: every rank's RNG states
    }
    return weights, state


def restore_state(trainer, weights: dict, state: dict, where: str = "checkpoint") -> None:
    """The one way state gets back into a Trainer (resume, and later every rank)."""
    params = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or extra:
        raise FwselError(f"{where} does not match the model: missing {missing[:3]}, unexpected {extra[:3]} "
                         f"(was the run's model or lora config changed?)")
    with torch.no_grad():
        for n, p in params.items():
            if weights[n].shape != p.shape:
                raise FwselError(f"{where}: {n} has shape {tuple(weights[n].shape)}, the model {tuple(p.shape)}")
            p.copy_(weights[n].to(device=p.device, dtype=p.dtype))
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    ranks, comm = state.get("rng_ranks"), getattr(trainer, "comm", None)
    if ranks and comm is not None and comm.rank < len(ranks):
        set_rng_state(ranks[comm.rank])
    stream = trainer.data.stream
    if "state" in state["stream"] and hasattr(stream, "load_state_dict"):
        stream.load_state_dict(state["stream"]["state"])
    trainer.selector.load_state_dict(state.get("selector", {}))  # none in checkpoints of older versions
    trainer.totals.clear()
    trainer.totals.update(state["totals"])
    trainer.step = int(state["step"])


# ---------------------------------------------------------------- the directory
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_write(path: str, data: bytes | None = None, obj=None) -> None:
    with open(path, "wb") as f:
        if obj is not None:
            torch.save(obj, f)
        else:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())


def verify(path: str) -> str | None:
    """None when the checkpoint is complete and intact, else what is wrong (one phrase)."""
    man = os.path.join(path, MANIFEST)
    try:
        with open(man, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError):
        return f"no readable {MANIFEST} (written last: the save did not finish)"
    for name, meta in files.items():
        p = os.path.join(path, name)
        size = os.path.getsize(p) if os.path.exists(p) else None
        if size != meta["bytes"]:
            return f"{name} has {size if size is not None else 'no'} bytes, the manifest says {meta['bytes']}"
        if _sha256(p) != meta["sha256"]:
            return f"{name} fails its sha256 checksum"
    return None


class Checkpointer:
    """Writes, lists, prunes and loads the checkpoints of one run dir; `enabled=False` writes nothing."""

    def __init__(self, run_dir: str, every: int | None, keep: int, enabled: bool = True) -> None:
        self.root = os.path.join(run_dir, "checkpoints")
        self.every, self.keep, self.enabled = (int(every) if every else None), int(keep), enabled
        self.last_saved: int | None = None

    def path(self, step: int) -> str:
        return os.path.join(self.root, f"step-{step:08d}")

    def steps(self) -> list[int]:
        """Steps of the checkpoint dirs present (complete or not), oldest first."""
        if not os.path.isdir(self.root):
            return []
        return sorted(int(m.group(1)) for m in map(STEP_DIR.match, os.listdir(self.root)) if m)

    def due(self, step: int) -> bool:
        return self.every is not None and step % self.every == 0

    def save(self, trainer) -> str | None:
        step = trainer.step
        if not self.enabled or self.last_saved == step:
            return None
        final, tmp = self.path(step), self.path(step) + ".tmp"
        weights, state = capture_state(trainer)
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            _fsync_write(os.path.join(tmp, "weights.pt"), obj=weights)
            _fsync_write(os.path.join(tmp, "state.pt"), obj=state)
            files = {n: {"bytes": os.path.getsize(os.path.join(tmp, n)), "sha256": _sha256(os.path.join(tmp, n))}
                     for n in FILES}
            _fsync_write(os.path.join(tmp, MANIFEST), json.dumps({"step": step, "files": files}, indent=1).encode())
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FwselError(f"cannot write checkpoint {final}: {e.strerror or e}") from None
        self.last_saved = step
        self.prune()
        return final

    def prune(self) -> None:
        for step in self.steps()[:-self.keep]:
            shutil.rmtree(self.path(step), ignore_errors=True)
        for tmp in glob.glob(os.path.join(self.root, "step-*.tmp")):
            shutil.rmtree(tmp, ignore_errors=True)  # a save killed half-way

    def load(self, step: int) -> tuple[dict, dict]:
        """(weights, state) of the checkpoint of `step`; FwselError saying what is wrong with it."""
        path = self.path(step)
        problem = verify(path)
        if problem is None:
            try:
                weights = torch.load(os.path.join(path, "weights.pt"), map_location="cpu", weights_only=True)
                state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
                return weights, state
            except Exception as e:  # noqa: BLE001 - intact bytes that still do not load
                problem = f"does not load ({type(e).__name__}: {str(e).splitlines()[0]})"
        raise FwselError(f"checkpoint {path} is damaged: {problem}")

    def load_latest(self) -> tuple[int, dict, dict] | None:
        """(step, weights, state) of the newest intact checkpoint; damaged newer ones are removed."""
        for step in reversed(self.steps()):
            try:
                return (step, *self.load(step))
            except FwselError as e:
                log.warning("%s; using the previous one", e)
            if self.enabled:
                shutil.rmtree(self.path(step), ignore_errors=True)
        return None


def resume_into(trainer, ckpt: Checkpointer, writer) -> int:
    """Load the newest intact checkpoint into `trainer` and cut the logs back to its step.

    Under torchrun rank 0 picks the checkpoint; the other ranks load that one from the run dir
    (which must be on a filesystem they all see)."""
    comm = trainer.comm
    found = ckpt.load_latest() if comm.is_main else None
    step = comm.broadcast_object(found[0] if found else 0)
    if not comm.is_main and step > 0:
        try:
            found = (step, *ckpt.load(step))
        except FwselError as e:
            raise FwselError(f"rank {comm.rank}: {e} (rank 0 resumes from it: is the run dir on a filesystem "
                             f"every node sees?)") from None
    if found is None:
        log.warning("no complete checkpoint in %s: restarting from step 0", ckpt.root)
        step = 0
    else:
        step, weights, state = found
        restore_state(trainer, weights, state, where=ckpt.path(step))
        ckpt.last_saved = step
        log.info("resuming from step %d (%s)", step, ckpt.path(step))
    writer.truncate_to(step if step > 0 else -1)  # step 0's eval row is rewritten by a fresh start
    return step


# ---------------------------------------------------------------- signals
class StopFlag:
    """Set by the first SIGINT/SIGTERM; the loop ends after the current step and checkpoints."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None


@contextmanager
def graceful_stop():
    """SIGINT/SIGTERM set a StopFlag; a second signal abandons the step (KeyboardInterrupt)."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.requested:
            raise KeyboardInterrupt
        flag.signum = signum
        log.warning("%s: finishing the current step, then writing a checkpoint (again to abandon it)",
                    signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)
