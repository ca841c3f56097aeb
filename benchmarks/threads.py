"""Default threads under a busy core: torch's defaults against what `fwsel train` now sets.

Runs the default `experiment=smoke` job (20 steps, tiny model) as fresh processes, in two
conditions — "idle" (nothing added) and "busy" (this script starts one spinning process, so
one of the 2 cores is taken, and stops it afterwards) — with four arms interleaved:

  torch default   fwsel.train's Hydra entry called directly: no OMP_* set (what runs did before)
  fwsel default   `fwsel train` as shipped: OMP_WAIT_POLICY=PASSIVE, threads = free cores at start
  1 thread        `fwsel train` with OMP_NUM_THREADS=1
  threads=2       `fwsel train threads=2`: all cores, passive waiting

Prints the median seconds per step (steps 2-20, from metrics.jsonl), the torch threads each
arm ran with, and the two ratios the defaults are judged by: busy fwsel default / 1 thread
(goal <= 1.5) and idle fwsel default / torch default (goal <= 1). Other work on the machine
counts as load too: read the ratios, not the seconds.

    python benchmarks/threads.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

JOB = ["experiment=smoke", "progress=false"]
DIRECT = "import sys; from fwsel.train import main; sys.argv = ['fwsel', *sys.argv[1:]]; main()"
ARMS = {
    "torch default": ([sys.executable, "-c", DIRECT], {}),
    "fwsel default": ([sys.executable, "-m", "fwsel", "train"], {}),
    "1 thread": ([sys.executable, "-m", "fwsel", "train"], {"OMP_NUM_THREADS": "1"}),
    "threads=2": ([sys.executable, "-m", "fwsel", "train", "threads=2"], {}),
}


def run(arm: str, run_dir: str) -> tuple[float, int, float]:
    """(median s/step, torch threads, process wall s) of one job."""
    cmd, extra = ARMS[arm]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", "FWSEL_THREADS"))}
    env.update({"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **extra})
    t = time.perf_counter()
    subprocess.run([*cmd, *JOB, f"hydra.run.dir={run_dir}"], env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        secs = [r["sec_step"] for r in map(json.loads, f) if r.get("sec_step") and r["step"] >= 2]
    with open(os.path.join(run_dir, "summary.json")) as f:
        threads = json.load(f).get("threads", -1)
    return statistics.median(secs), threads, wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="fwsel-threads-")
    res: dict = {}
    for cond in ("idle", "busy"):
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if cond == "busy" else None
        try:
            for r in range(args.repeats):
                for arm in ARMS:
                    name = f"{cond}-{arm}-{r}".replace(" ", "_").replace("=", "")  # Hydra: no '=' in a path
                    res.setdefault((cond, arm), []).append(run(arm, os.path.join(tmp, name)))
        finally:
            if spinner is not None:
                spinner.terminate()
                spinner.wait()
    print(f"median s/step of experiment=smoke (steps 2-20), median over {args.repeats} runs; "
          f"{len(os.sched_getaffinity(0))} cores, other work on the machine not controlled")
    print(f"{'condition':<6} {'arm':<14} {'s/step':>8} {'threads':>8} {'wall s':>7}")
    med = {}
    for (cond, arm), runs in res.items():
        med[(cond, arm)] = statistics.median(s for s, _, _ in runs)
        print(f"{cond:<6} {arm:<14} {med[(cond, arm)]:>8.4f} {'/'.join(str(t) for _, t, _ in runs):>8} "
              f"{statistics.median(w for _, _, w in runs):>7.1f}")
    print(f"busy: fwsel default / 1 thread      = {med[('busy', 'fwsel default')] / med[('busy', '1 thread')]:.2f}"
          f"  (goal <= 1.5; torch default / 1 thread = "
          f"{med[('busy', 'torch default')] / med[('busy', '1 thread')]:.2f})")
    print(f"idle: fwsel default / torch default = {med[('idle', 'fwsel default')] / med[('idle', 'torch default')]:.2f}"
          f"  (goal <= 1)")


if __name__ == "__main__":
    main()
