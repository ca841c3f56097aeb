"""Torch threads and the OpenMP wait policy, chosen before torch is imported.

On a small machine that other work shares, OpenMP's default busy-waiting threads fight a
busy core for every parallel region: a 2-core run with one core taken was ~30x slower per
step than one thread. Passive waiting avoids that but costs ~1.8x per step on an idle
machine at the tiny default size (idle threads sleep, and waking them is slow). So
`fwsel train` sets, unless the user already did:

* `OMP_NUM_THREADS` = the cores this process may use (`os.sched_getaffinity`) minus the
  other runnable tasks at start-up (`/proc/loadavg`), at least 1: no thread starts on a
  core that is already busy;
* `OMP_WAIT_POLICY=PASSIVE` only when the thread count exceeds those free cores (an explicit
  `threads=N` on a busy machine); otherwise OpenMP's default, the fast one when the threads
  have their cores.

The `threads=N` override (or `FWSEL_THREADS=N`) wins over the guess, and `resume=<dir>` reuses
the thread count that run recorded; an `OMP_NUM_THREADS` already in the environment is kept
as it is (unless `threads=N` is given). Nothing here imports torch.
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def busy_cores() -> int:
    """Other tasks runnable right now (the 4th field of /proc/loadavg counts this process too)."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return 0
    return max(0, running - 1)


def choose(requested=None) -> int:
    """`requested` (an int, or None/"auto") or the free cores at start-up, at least 1."""
    if requested not in (None, "auto", ""):
        if not str(requested).isdigit() or int(requested) < 1:
            from fwsel.errors import ConfigError

            raise ConfigError(f"threads must be auto or an integer >= 1, got {requested!r}")
        return int(requested)
    cores = usable_cores()
    return max(1, min(cores, cores - busy_cores()))


def _values(args: list[str], key: str) -> list[str]:
    from fwsel.cli import override_values

    return override_values(args, key)


def requested_in(args: list[str]) -> str | None:
    """The value of a `threads=` override, else FWSEL_THREADS, else (with `resume=<dir>`) the
    threads that run used (a different count may round differently: resume stays exact), else None."""
    vals = _values(args, "threads")
    if vals or os.environ.get("FWSEL_THREADS"):
        return vals[-1] if vals else os.environ.get("FWSEL_THREADS")
    resume = _values(args, "resume")
    if resume:
        import json

        try:
            with open(os.path.join(os.path.expanduser(resume[-1]), "summary.json"), encoding="utf-8") as f:
                n = json.load(f).get("threads")
            return str(n) if isinstance(n, int) and n >= 1 else None
        except (OSError, ValueError):
            return None
    return None


def configure(args: list[str], env=os.environ) -> dict:
    """Set the environment for this process's OpenMP before torch loads; returns what was set."""
    out = {}
    req = requested_in(args)
    explicit = bool(_values(args, "threads") or os.environ.get("FWSEL_THREADS"))
    if (explicit and req not in (None, "auto", "")) or "OMP_NUM_THREADS" not in env:  # else the user's env stands
        out["OMP_NUM_THREADS"] = str(choose(req))
    n = out.get("OMP_NUM_THREADS", env.get("OMP_NUM_THREADS", ""))
    if "OMP_WAIT_POLICY" not in env and n.isdigit() and int(n) > choose(None):  # more threads than free cores
        out["OMP_WAIT_POLICY"] = "PASSIVE"
    env.update(out)
    return out

