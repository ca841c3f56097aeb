"""In-loop cost of a selection step against a `full` step over the same pools (CPU, one thread).

    python benchmarks/step_cost.py                      # default config, budgets 0.25 and 0.1
    python benchmarks/step_cost.py --repeats 3 --steps 40 --budgets 0.25 0.1 0.05
    python benchmarks/step_cost.py --budgets 0.05 --arms full ftw "ftw[selector.prefilter_keep=0.25]"

Every (arm, budget) pair is a `fwsel.loop.Trainer` built from the packaged config (the
defaults plus `--extra` overrides) in this one process. The trainers step in turn, one step
each per round, so the machine's load moves all arms alike; each keeps its own `sec_step`
(what metrics.jsonl logs: pool, scoring, selection, update, optimizer step). After `--skip`
warm-up steps the medians per arm are taken; `--repeats` builds every trainer afresh and runs
again, and the table reports the median over repeats of those medians, as a ratio to `full`
at the same budget, with the range of the repeats' own ratios in brackets. Prints one JSON
line (every median) and a markdown table for the README.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ARMS = ("full", "random", "tracin", "greats", "ftw")


def compose(arm: str, budget: float, steps: int, extra: list[str]):
    """The config of one arm: a selector name, optionally with its own overrides in brackets
    (`ftw[selector.prefilter_keep=0.25]`)."""
    from hydra import compose as hydra_compose

    name, _, own = arm.partition("[")
    own = [o for o in own.rstrip("]").split(",") if o]
    return hydra_compose("train", overrides=[f"selector={name}", f"budget={budget}", f"steps={steps}",
                                             "progress=false", *extra, *own])


def one_run(arms, budgets, steps, skip, extra) -> dict:
    """{(arm, budget): median sec_step of steps skip..steps} from one interleaved run."""
    import logging

    from fwsel.loop import Trainer
    from fwsel.outputs import RunWriter
    from fwsel.tracking import NoTracker

    logging.getLogger("fwsel").setLevel(logging.ERROR)
    trainers = {(a, b): Trainer(compose(a, b, steps, extra), RunWriter("", enabled=False), NoTracker())
                for b in budgets for a in arms}
    secs = {key: [] for key in trainers}
    for t in range(steps):
        for key, tr in trainers.items():
            row = tr.train_step(t)
            if t >= skip:
                secs[key].append(row["sec_step"])
    for tr in trainers.values():
        tr.close()
    return {key: statistics.median(v) for key, v in secs.items()}


def ratio_range(runs: list, a: str, b: float) -> tuple[float, float]:
    """The lowest and highest ratio to `full` over the repeats (each repeat's own medians)."""
    r = [run[(a, b)] / run[("full", b)] for run in runs]
    return min(r), max(r)


def table(med: dict, arms, budgets, N, runs=()) -> str:
    """Ratios to `full` at each budget; with several repeats, each repeat's range in brackets
    (a target near a ratio is only met or missed beyond that spread)."""
    head = "| budget | " + " | ".join(f"{a}" for a in arms) + " |"
    lines = [head, "|" + "---|" * (len(arms) + 1)]
    for b in budgets:
        full = med[("full", b)] if "full" in arms else None
        cells = []
        for a in arms:
            if a == "full" or full is None:
                cells.append(f"{1000 * med[(a, b)]:.1f} ms")
                continue
            cell = f"{med[(a, b)] / full:.2f}x"
            if len(runs) > 1:
                lo, hi = ratio_range(runs, a, b)
                cell += f" ({lo:.2f}-{hi:.2f})"
            cells.append(cell)
        lines.append(f"| {b} (N = {N[b]}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="+", default=list(ARMS))
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.25, 0.1])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the medians")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--extra", nargs="*", default=[], help="config overrides for every arm")
    args = ap.parse_args()
    import torch
    from hydra import initialize_config_module

    torch.set_num_threads(1)
    with initialize_config_module("fwsel.conf", version_base="1.3"):
        N = {b: compose("full", b, args.steps, args.extra) for b in args.budgets}
        from fwsel.loop import pool_size

        N = {b: pool_size(int(c.batch_size), float(c.budget)) for b, c in N.items()}
        runs = []
        for r in range(args.repeats):
            t0 = time.time()
            runs.append(one_run(args.arms, args.budgets, args.steps, args.skip, args.extra))
            print(f"# repeat {r + 1}: {time.time() - t0:.0f} s", file=sys.stderr)
    med = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    out = {"extra": args.extra, "steps": args.steps, "skip": args.skip, "repeats": args.repeats,
           "threads": torch.get_num_threads(), "load1": os.getloadavg()[0],
           "sec_step": {f"{a}@{b}": round(v, 5) for (a, b), v in med.items()},
           "per_repeat": [{f"{a}@{b}": round(v, 5) for (a, b), v in run.items()} for run in runs]}
    if "full" in args.arms:
        out["ratio"] = {f"{a}@{b}": round(v / med[("full", b)], 3) for (a, b), v in med.items()}
        out["ratio_range"] = {f"{a}@{b}": [round(x, 3) for x in ratio_range(runs, a, b)] for a, b in med}
    print(json.dumps(out))
    print()
    print(table(med, args.arms, args.budgets, N, runs if "full" in args.arms else ()))


if __name__ == "__main__":
    main()
