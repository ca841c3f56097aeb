"""How close ftw's step can come to greats' step: the passes its AdamW geometry cannot avoid, timed in the loop.

    python benchmarks/ftw_floor.py                    # budget 0.25, the default config
    python benchmarks/ftw_floor.py --budget 0.1 --steps 60

ftw forms the same Gram and dot products as greats, on rows scaled by AdamW's `sqrt(D)`
(docs/method.md#adamw-geometry). On top of them it needs at least: pool q's column
statistics (one read of every pool row, since `D` depends on all of them), `D` itself (a
pass over the coordinates), the scaling (with a BLAS Gram, a read and a write of every pool
row; a fused Gram kernel could skip it) and OMP's refits in place of greats' greedy pick.
Trainers for full, greats and ftw step in turn in one process (one thread), as in
`step_cost.py`. A fourth, greats trainer serves as a probe: right after its backward, before
its products, it times one read pass (column sums) and one read-and-write pass (an in-place
scale by 1, which changes nothing) over its pool rows, the cache as ftw's products find it.
ftw's `D` and both selectors' `select` are timed inside their own steps. Prints one JSON line
and the floors as ratios to `full`: greats' step plus those costs, with and without the
scaling pass, and an ideal one (greats' step plus the statistics read alone: `D` fused into it,
the scaling into the Gram, OMP free).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_cost import compose  # noqa: E402


def timed(store: list, f):
    """`f`, appending each call's wall time to `store`."""
    def g(*a, **kw):
        t0 = time.perf_counter()
        out = f(*a, **kw)
        store.append(time.perf_counter() - t0)
        return out
    return g


def probe_passes(engine, store: dict) -> None:
    """Before each of `engine`'s products: one read and one read-and-write pass over its pool
    rows, in alternating order (the first of the two finds the colder cache)."""
    import torch

    products = engine._products

    def run(n, *args, **kw):
        rows = engine._rows[:n]
        ones = torch.ones(n, dtype=rows.dtype)
        passes = [("read", lambda: ones @ rows), ("read_write", lambda: rows.mul_(1.0))]
        for name, f in passes[:: 1 if len(store["read"]) % 2 else -1]:
            t0 = time.perf_counter()
            f()
            store[name].append(time.perf_counter() - t0)
        return products(n, *args, **kw)

    engine._products = run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the medians")
    args = ap.parse_args()
    import logging

    import torch
    from hydra import initialize_config_module

    import fwsel.grads.engine as engine_mod
    from fwsel.loop import Trainer
    from fwsel.outputs import RunWriter
    from fwsel.tracking import NoTracker

    torch.set_num_threads(1)
    logging.getLogger("fwsel").setLevel(logging.ERROR)
    with initialize_config_module("fwsel.conf", version_base="1.3"):
        arms = {a: Trainer(compose(a.split(":")[0], args.budget, args.steps, []), RunWriter("", enabled=False),
                           NoTracker()) for a in ("full", "greats", "ftw", "greats:probe")}
    t = {key: [] for key in ("read", "read_write", "adam_diag", "select_ftw", "select_greats")}
    for arm in ("ftw", "greats"):
        arms[arm].selector.select = timed(t[f"select_{arm}"], arms[arm].selector.select)
    adam_diag = engine_mod.adam_diag_run
    adam_diag_timed = timed(t["adam_diag"], adam_diag)  # only ftw's steps are timed
    secs = {a: [] for a in arms}
    for step in range(args.steps):
        for a, tr in arms.items():
            engine_mod.adam_diag_run = adam_diag_timed if a == "ftw" else adam_diag
            row = tr.train_step(step)
            if a == "greats:probe" and step == 0:
                probe_passes(tr.engine, t)
            if step >= args.skip:
                secs[a].append(row["sec_step"])
    engine_mod.adam_diag_run = adam_diag
    for tr in arms.values():
        tr.close()
    med = {a: statistics.median(v) for a, v in secs.items()}
    cost = {key: statistics.median(v[args.skip:]) for key, v in t.items()}
    extra = cost["read"] + cost["adam_diag"] + cost["select_ftw"] - cost["select_greats"]
    full = med["full"]
    out = {"budget": args.budget, "steps": args.steps, "skip": args.skip, "load1": os.getloadavg()[0],
           "sec_step": {a: round(v, 5) for a, v in med.items() if a != "greats:probe"},
           "cost": {key: round(v, 5) for key, v in cost.items()},
           "ratio": {a: round(med[a] / full, 3) for a in ("greats", "ftw")},
           "floor_blas": round((med["greats"] + extra + cost["read_write"]) / full, 3),
           "floor_fused": round((med["greats"] + extra) / full, 3),
           "floor_ideal": round((med["greats"] + cost["read"]) / full, 3)}
    print(json.dumps(out))
    ms = {key: f"{1000 * v:.2f} ms" for key, v in cost.items()}
    print(f"\nfull {1000 * full:.1f} ms; greats {out['ratio']['greats']:.2f}x, ftw {out['ratio']['ftw']:.2f}x")
    print(f"ftw's extras over greats: statistics read {ms['read']}, D {ms['adam_diag']}, scaling "
          f"{ms['read_write']}, select {ms['select_ftw']} (greats {ms['select_greats']})")
    print(f"floor: {out['floor_blas']:.2f}x with a BLAS Gram, {out['floor_fused']:.2f}x with the scaling "
          f"fused into the Gram, {out['floor_ideal']:.2f}x ideal (the statistics read alone)")


if __name__ == "__main__":
    main()
