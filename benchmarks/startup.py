"""Start-up cost of the CLI, before and after, measured side by side.

Arms: this tree, and a git revision (`--before`, default: the commit before the lazy
imports) unpacked to a temp dir and put first on PYTHONPATH. Each command runs as a fresh
process, arms interleaved, `--repeats` times; medians and the after/before ratio are printed,
plus whether the command imported torch or transformers. One torch thread per process.

    python benchmarks/startup.py [--before REV] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = ("import sys, runpy; sys.argv = ['fwsel', *sys.argv[1:]]\n"
         "try:\n    from fwsel.cli import main; main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
         "print('HEAVY=' + ','.join(m for m in ('torch', 'transformers') if m in sys.modules), file=sys.stderr)")


def unpack(rev: str, into: str) -> str:
    """The tree at `rev`, with conf/ where the package expects it (fwsel/conf)."""
    os.makedirs(into)
    tar = subprocess.run(["git", "-C", ROOT, "archive", rev, "fwsel", "conf"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=tar, check=True)
    os.symlink(os.path.join(into, "conf"), os.path.join(into, "fwsel", "conf"))
    return into


def timed(args: list[str], pythonpath: str | None, cwd: str) -> tuple[float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    heavy = [line for line in p.stderr.splitlines() if line.startswith("HEAVY=")]
    return wall, (heavy[-1][6:] if heavy else "?") or "-"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", default="343f4f5", help="git revision of the 'before' arm")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="fwsel-startup-")
    try:
        old = unpack(args.before, os.path.join(tmp, "before"))
        os.makedirs(os.path.join(tmp, "runs"))
        run = os.path.join(tmp, "runs", "one")  # a finished run for compare and export to read
        timed(["train", "experiment=smoke", "steps=2", "eval_every=2", "selector=random", f"hydra.run.dir={run}"],
              None, tmp)
        commands = {
            "fwsel --help": ["--help"],
            "fwsel train --help": ["train", "--help"],
            "fwsel compare --help": ["compare", "--help"],
            "fwsel compare <run dir>": ["compare", run, "--out", os.path.join(tmp, "cmp")],
            "fwsel export-selection --help": ["export-selection", "--help"],
            "fwsel export-selection <run>": ["export-selection", run, "--out", os.path.join(tmp, "sel.jsonl")],
            "default run, 1 step (smoke)": ["train", "experiment=smoke", "steps=1", "eval_every=1",
                                            "target.eval_size=16", "progress=false"],
        }
        res: dict = {}
        for r in range(args.repeats):
            for name, cmd in commands.items():
                for arm, path in (("before", old), ("after", None)):
                    runs = cmd[0] == "train" and "--help" not in cmd
                    extra = [f"hydra.run.dir={tmp}/runs/{arm}-{r}-{len(res)}"] if runs else []
                    wall, heavy = timed([*cmd, *extra], path, tmp)
                    res.setdefault((name, arm), []).append((wall, heavy))
        print(f"start-up wall time, median of {args.repeats} (arms interleaved; before = {args.before}, "
              f"one torch thread, {os.cpu_count()} cores shared with other work)")
        print(f"{'command':<32} {'before s':>9} {'after s':>9} {'after/before':>13}  imports torch/transformers "
              "(before -> after)")
        for name in commands:
            b, a = ([w for w, _ in res[(name, arm)]] for arm in ("before", "after"))
            hb, ha = res[(name, "before")][-1][1], res[(name, "after")][-1][1]
            print(f"{name:<32} {statistics.median(b):>9.2f} {statistics.median(a):>9.2f} "
                  f"{statistics.median(a) / statistics.median(b):>13.2f}  {hb} -> {ha}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
