"""CPU benchmark of the gradient engine. Not a test: prints a markdown table.

    python benchmarks/engine.py            # every size but llama full FT (about 10 min on 2 cores)
    python benchmarks/engine.py --all      # ... and llama full FT (~3 min more)
    python benchmarks/engine.py --quick    # tiny 16x128 and the wide config, fewer repeats (~3 min)

Per case, arms on the same N + v rows (same dtype and attention, optimizer step left out):
`plain` forward + backward of the summed per-row losses with no hooks; `engine` GradEngine
score (capture, K, b) + one-pass update of k = N/4 rows; `func` torch.func vmap(grad) per-sample
gradients (eager attention) + the same products. Timing: one subprocess per case, `--warmup`
untimed then `--repeats` timed calls with the arms interleaved, medians; each engine arm is built
before and closed after its call (no hooks stay registered for the others). Memory: every arm
once more in its own fresh subprocess, peak resident set size (sampled every ms) above the level
after building model, optimizer state and batches, under MALLOC_MMAP_THRESHOLD_=131072 (without
it glibc keeps freed blocks and the peak RSS of identical runs varied 2x). Heavy cases (the
Llama-shaped config, 1-2 min per call here) are timed by that single call only, without the
mmap setting (it slows allocation; their tensors are mostly above glibc's 32 MB mmap limit
anyway), and skip torch.func (marked).
Last: Spearman correlation of the token-Gram path's rank-1-D Gram with the exact Adam Gram on
the pool after 20 real training steps (tiny full fine-tuning on the synthetic task stream).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

CONFIGS = {  # llama_config arguments
    "tiny": dict(hidden=64, layers=2, heads=4, kv=2, inter=128, vocab=101),  # conf/model/tiny.yaml, char vocab
    "llama": dict(hidden=512, layers=4, heads=8, kv=4, inter=1408, vocab=8192),
    "wide": dict(hidden=1024, layers=2, heads=16, kv=4, inter=2816, vocab=2048),
}
STD = {"plain": ("plain", {}), "engine adam": ("engine", {"metric": "adam"}), "func": ("func", {})}
HEAVY = {"plain": ("plain", {}), "engine adam": ("engine", {"metric": "adam"})}
WIDE = {"plain": ("plain", {}),
        "engine sgd auto(token Gram)": ("engine", {"metric": "sgd"}),
        "engine adam state ghost(rank-1)": ("engine", {"metric": "adam", "adam_q": "state", "grad_path": "ghost"}),
        "engine sgd materialize": ("engine", {"metric": "sgd", "grad_path": "materialize"}),
        "func": ("func", {})}
CASES = {  # name: (config, setting, N, v, T, arms, heavy)
    "tiny-16x128-lora": ("tiny", "lora", 16, 8, 128, STD, False),
    "tiny-16x128-full": ("tiny", "full", 16, 8, 128, STD, False),
    "tiny-32x512-lora": ("tiny", "lora", 32, 8, 512, STD, False),
    "tiny-32x512-full": ("tiny", "full", 32, 8, 512, STD, False),
    "wide-16x16-full": ("wide", "full", 16, 8, 16, WIDE, False),
    "llama-16x1024-lora": ("llama", "lora", 16, 8, 1024, HEAVY, True),
    "llama-16x1024-full": ("llama", "full", 16, 8, 1024, HEAVY, True),
}
QUICK = ["tiny-16x128-lora", "tiny-16x128-full", "wide-16x16-full"]
OPTIONAL = ["llama-16x1024-full"]  # ~3 min more: only with --all or --cases
QUICK_SKIP = {"wide-16x16-full": ("engine sgd materialize", "func")}  # slow, GBs of memory


def arms_of(name):
    """The case's arms; --quick leaves out QUICK_SKIP."""
    skip = QUICK_SKIP.get(name, ()) if ARGS.quick else ()
    return {k: v for k, v in CASES[name][5].items() if k not in skip}


def setup(name):
    """((model, optimizer), pool, target, k, arms) for one case."""
    import torch

    from arms import build, llama_config, rows

    cname, setting, N, v, T, _, _ = CASES[name]
    arms = arms_of(name)
    c = CONFIGS[cname]
    model, opt = build(llama_config(**c, T=T), setting)
    pool, target = rows(N, T, c["vocab"], 1), rows(v, T, c["vocab"], 2)
    torch.manual_seed(0)
    return (model, opt), pool, target, max(N // 4, 1), arms


def make_arm(label, built, pool, target, k, arms):
    from arms import ARMS

    kind, kw = arms[label]
    model, opt = built
    return ARMS[kind](model, opt, pool, target, k=k, **kw), [p for p in model.parameters() if p.requires_grad]


def child_time(name, warmup, repeats, func_max_s):
    from arms import timed

    built, pool, target, k, arms = setup(name)
    times, notes = {a: [] for a in arms}, {}
    for it in range(warmup + repeats):
        for label in arms:
            if label in notes:
                continue
            try:
                arm, params = make_arm(label, built, pool, target, k, arms)
                t = timed(arm, "cpu", params)
                getattr(arm, "close", lambda: None)()
            except RuntimeError as e:  # an allocation failure: mark the arm
                notes[label] = "oom" if "memory" in str(e).lower() or "alloc" in str(e).lower() else str(e)[:60]
                continue
            if it >= warmup:
                times[label].append(t)
            if label == "func" and t > func_max_s:
                notes[label] = f"dropped: {t:.0f} s/call > {func_max_s:.0f} s"
                times[label] = [t]
    print(json.dumps({"times": times, "notes": notes}))


def child_mem(name, label):
    from arms import Peak, timed

    built, pool, target, k, arms = setup(name)
    arm, params = make_arm(label, built, pool, target, k, arms)
    try:
        with Peak("cpu") as pk:
            t = timed(arm, "cpu", params)
        print(json.dumps({"delta": pk.delta, "time": t}))
    except RuntimeError as e:
        print(json.dumps({"error": str(e)[:80]}))


def child_spearman(steps, hidden):
    """Rank-1 Adam Gram vs the exact one on the pool after `steps` real steps of full fine-tuning."""
    import tempfile

    import numpy as np
    import torch
    from hydra import compose, initialize_config_module
    from scipy.stats import spearmanr

    from fwsel.grads import GradEngine
    from fwsel.loop import Trainer
    from fwsel.outputs import RunWriter
    from fwsel.tracking import NoTracker

    over = ["selector=random", f"steps={steps + 1}", "device=cpu", "batch_size=8", "budget=0.25",
            f"model.hidden_size={hidden}", f"model.intermediate_size={2 * hidden}"]
    with initialize_config_module(config_module="fwsel.conf", version_base="1.3"):
        cfg = compose("train", overrides=over)
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(cfg, RunWriter(d, enabled=False), NoTracker())
        for t in range(steps):
            tr.train_step(t)
        pool, target = tr.batch(tr.data.stream.pool(steps, tr.N)), tr.batch(tr.target_rows(steps))
        K = {}
        for key, kw in {"exact_state": dict(metric="adam", adam_q="state", grad_path="materialize"),
                        "rank1_state": dict(metric="adam", adam_q="state", grad_path="ghost"),
                        "exact_pool": dict(metric="adam", adam_q="pool", grad_path="materialize"),
                        "sgd": dict(metric="sgd", grad_path="materialize")}.items():
            sc = GradEngine(tr.model, tr.optimizer, loss_chunk_tokens=4096, **kw).score(pool, target, k=tr.k)
            K[key] = sc.K.numpy()
            if key == "rank1_state":
                err = sc.ghost["rank1_err_max"]
    iu = np.triu_indices(tr.N)
    rho = {f"{a} vs {b}": float(spearmanr(K[a][iu], K[b][iu])[0])
           for a, b in (("rank1_state", "exact_state"), ("rank1_state", "exact_pool"), ("sgd", "exact_state"))}
    print(json.dumps({"hidden": hidden, "steps": steps, "N": tr.N, "rho": rho, "rank1_err_max": err}))


def run_child(args, timeout, mem=False):
    cmd = [sys.executable, os.path.abspath(__file__), *args, "--threads", str(ARGS.threads)]
    cmd += ["--quick"] if ARGS.quick else []
    env = {**os.environ, "OMP_NUM_THREADS": str(ARGS.threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    if mem:  # a fixed mmap threshold: freed blocks go back to the OS, so RSS follows live memory
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout {timeout}s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:100]}
    return json.loads(lines[-1])


def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "-"


def report_case(name, reps, warm):
    """Time (interleaved, one process) and memory (one process per arm); print the case's rows."""
    heavy = CASES[name][6]
    arms = arms_of(name)
    timing = {"times": {}, "notes": {}} if heavy else run_child(
        ["--child", "time", "--case", name, "--repeats", str(reps), "--warmup", str(warm)], ARGS.timeout)
    if "error" in timing:
        print(f"| {name} | - | - | - | - | - | - | {timing['error']} |")
        return
    mem = {label: run_child(["--child", "mem", "--case", name, "--arm", label], ARGS.timeout, mem=not heavy)
           for label in arms}  # heavy: the call is also the timing, so no mmap setting (its blocks are > 32 MB)
    med = {}
    for label in arms:
        ts = timing["times"].get(label) or ([mem[label]["time"]] if "time" in mem[label] else [])
        med[label] = statistics.median(ts) if ts else None
    for label in arms:
        m, mm = med[label], mem[label]
        note = timing["notes"].get(label) or mm.get("error") or ("1 call; func skipped (heavy)" if heavy else "")
        peak = f"{mm['delta'] / 2**20:.0f}" if "delta" in mm else "-"
        print(f"| {name} | {label} | {f'{m:.3f}' if m else '-'} | {ratio(m, med['plain'])} | "
              f"{ratio(m, med.get('func'))} | {peak} | {ratio(mm.get('delta'), mem['plain'].get('delta'))} | {note} |")
    sys.stdout.flush()


def main():
    import torch

    names = ARGS.cases.split(",") if ARGS.cases else QUICK if ARGS.quick else \
        [c for c in CASES if ARGS.all or c not in OPTIONAL]
    reps = ARGS.repeats or (3 if ARGS.quick else 5)
    warm = ARGS.warmup if ARGS.warmup is not None else (1 if ARGS.quick else 2)
    print(f"torch {torch.__version__}, {ARGS.threads} thread(s), fp32, CPU; load avg {os.getloadavg()[0]:.1f}")
    print(f"timing: {warm} warm-up + {reps} timed calls per arm, arms interleaved, medians (heavy: 1 call)")
    print("memory: each arm once in a fresh process, peak RSS (1 ms samples) above the post-build level, "
          "MALLOC_MMAP_THRESHOLD_=131072\n")
    print("| case | arm | s/step | / plain | / func | peak MiB | mem / plain | note |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        report_case(name, reps, warm)
    print()
    for hidden in ([64] if ARGS.quick else [64, 256]):
        r = run_child(["--child", "spearman", "--hidden", str(hidden)], ARGS.timeout)
        if "error" in r:
            print(f"spearman hidden={hidden}: {r['error']}")
            continue
        rho = ", ".join(f"{k} {v:.4f}" for k, v in r["rho"].items())
        print(f"Spearman of K's upper triangle on the pool after {r['steps']} steps of tiny full fine-tuning "
              f"(hidden {r['hidden']}, N={r['N']}): {rho}; max relative rank-1 error of D {r['rank1_err_max']:.3f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny 16x128 + wide, 1 warm-up + 3 repeats")
    ap.add_argument("--all", action="store_true", help="also the optional cases (" + ", ".join(OPTIONAL) + ")")
    ap.add_argument("--cases", help="comma-separated case names instead (" + ", ".join(CASES) + ")")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per arm (default 5, quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls per arm first (default 2, quick 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every child (1: steadier when shared)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per child process")
    ap.add_argument("--func-max-s", type=float, default=30.0, help="drop torch.func after a call this slow")
    ap.add_argument("--child", choices=["time", "mem", "spearman"], help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--arm", help=argparse.SUPPRESS)
    ap.add_argument("--hidden", type=int, default=64, help=argparse.SUPPRESS)
    ARGS = ap.parse_args()
    if ARGS.child:
        import torch

        torch.set_num_threads(ARGS.threads)
        if ARGS.child == "time":
            child_time(ARGS.case, ARGS.warmup, ARGS.repeats, ARGS.func_max_s)
        elif ARGS.child == "mem":
            child_mem(ARGS.case, ARGS.arm)
        else:
            child_spearman(20, ARGS.hidden)
    else:
        main()
