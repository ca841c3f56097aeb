"""GPU benchmark of the gradient engine on a Llama-3.2-1B-shaped model; prints ONE JSON line.

    python benchmarks/gpu_engine.py                       # bf16, LoRA r=16, N=24, v=8, T=1024 (< 5 min)
    python benchmarks/gpu_engine.py --seq 4096 --grad-ckpt  # long rows, as many as fit
    python benchmarks/gpu_engine.py --tiny                # CPU smoke check of this script (seconds)

Imports only torch, transformers, peft and fwsel.grads (through the sibling arms.py). Random init
(no download). Arms on the same N + v rows, optimizer step left out: `plain` (forward + backward
of the summed per-row losses, chunked head, no hooks), `engine` (GradEngine adam geometry:
capture, K, b, one-pass update of k = N/4 rows), `func` (torch.func vmap(grad), eager attention,
when it fits). Timing: `--warmup` untimed then `--repeats` timed calls, arms interleaved, medians,
fewer repeats if the 5-minute budget runs short. Memory: CUDA peak allocated during one call above
the allocation at its start (model, optimizer state, batches). If N + v rows do not fit, smaller
pools are tried and the largest that fits is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from arms import ARMS, Peak, build, llama_config, rows, sync  # noqa: E402

LLAMA_1B = dict(hidden=2048, layers=16, heads=32, kv=8, inter=8192, vocab=128256, tie=True, theta=500000.0)
TINY = dict(hidden=64, layers=2, heads=4, kv=2, inter=128, vocab=256, tie=True, theta=500000.0)
SIZES = [(24, 8), (16, 8), (12, 4), (8, 4), (6, 2), (4, 2), (2, 1)]  # (N, v), tried in order


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def free(device):
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def call(label, built, pool, target, k, device, spec):
    """(seconds, peak bytes above the start) of one call of an arm built fresh (hooks only while it lives)."""
    kind, kw = spec[label]
    model, opt = built
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    arm = ARMS[kind](model, opt, pool, target, k=k, **kw)
    try:
        with Peak(device) as pk:
            sync(device)
            t = time.perf_counter()
            arm()
            sync(device)
            t = time.perf_counter() - t
    finally:
        getattr(arm, "close", lambda: None)()
        del arm
        for p in params:
            p.grad = None
        free(device)
    return t, pk.delta


def main(a):
    t_start = time.perf_counter()
    device = "cpu" if a.tiny else "cuda"
    dtype = torch.bfloat16
    shape = TINY if a.tiny else LLAMA_1B
    T = 32 if a.tiny else a.seq
    cfg = llama_config(**shape, T=T)
    built = build(cfg, "lora", dtype=dtype, device=device, r=16, checkpointing=a.grad_ckpt)
    spec = {"plain": ("plain", {"chunk": a.chunk}), "engine": ("engine", {"metric": "adam", "chunk": a.chunk}),
            "func": ("func", {})}
    out = {"config": "tiny" if a.tiny else "llama-3.2-1b-shape", "dtype": str(dtype).split(".")[-1], "lora_r": 16,
           "T": T, "grad_ckpt": a.grad_ckpt, "loss_chunk_tokens": a.chunk, "device": device if a.tiny else
           torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
           "notes": []}
    sizes = [(4, 2)] if a.tiny else [(a.n, a.v)] + [s for s in SIZES if s[0] + s[1] < a.n + a.v]
    fit = None
    for N, v in sizes:  # the largest pool where plain and engine both fit
        pool, target = rows(N, T, shape["vocab"], 1, device), rows(v, T, shape["vocab"], 2, device)
        try:
            for label in ("plain", "engine"):
                call(label, built, pool, target, max(N // 4, 1), device, spec)
            fit = (N, v)
            break
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            if not is_oom(e):
                raise
            out["notes"].append(f"N+v={N + v}: oom")
            free(device)
    if fit is None:
        out["error"] = "no size fits"
        print(json.dumps(out))
        return
    N, v = fit
    k = max(N // 4, 1)
    out.update(N=N, v=v, k=k, largest_fit_rows=N + v)
    pool, target = rows(N, T, shape["vocab"], 1, device), rows(v, T, shape["vocab"], 2, device)
    arms = ["plain", "engine"] + ([] if a.no_func or a.grad_ckpt else ["func"])  # HF checkpointing breaks vmap
    times, peaks = {x: [] for x in arms}, {}
    last = 0.0  # seconds of the last round of arms
    for it in range(a.warmup + a.repeats):
        if it > a.warmup and time.perf_counter() - t_start + last > a.budget_s:
            out["notes"].append(f"budget: stopped after {it - a.warmup} timed repeats")
            break
        t_round = time.perf_counter()
        for label in list(arms):
            try:
                t, pk = call(label, built, pool, target, k, device, spec)
            except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
                if label != "func":
                    raise
                out["notes"].append("func: oom at this size" if is_oom(e) else f"func: {str(e)[:80]}")
                arms.remove(label)
                free(device)
                continue
            peaks[label] = max(peaks.get(label, 0), pk)
            if it >= a.warmup:
                times[label].append(t)
        last = time.perf_counter() - t_round
    med = {x: statistics.median(ts) for x, ts in times.items() if ts}
    out.update({f"{x}_s": round(t, 4) for x, t in med.items()})
    out["engine_over_plain"] = round(med["engine"] / med["plain"], 4)
    if "func" in med:
        out["func_over_plain"] = round(med["func"] / med["plain"], 4)
        out["engine_over_func"] = round(med["engine"] / med["func"], 4)
    out["peak_gib"] = {x: round(b / 2**30, 3) for x, b in peaks.items()}
    tiny_peak = peaks["plain"] < 2**20  # the CPU smoke model: RSS deltas are noise
    out["mem_engine_over_plain"] = None if tiny_peak else round(peaks["engine"] / peaks["plain"], 4)
    out.update(repeats=len(times["plain"]), warmup=a.warmup, wall_s=round(time.perf_counter() - t_start, 1))
    print(json.dumps(out))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: smoke check of the script")
    ap.add_argument("--n", type=int, default=24, help="pool rows N")
    ap.add_argument("--v", type=int, default=8, help="target rows v")
    ap.add_argument("--seq", type=int, default=1024, help="tokens per row T")
    ap.add_argument("--grad-ckpt", action="store_true", help="non-reentrant gradient checkpointing")
    ap.add_argument("--chunk", type=int, default=4096, help="loss_chunk_tokens of the head")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-func", action="store_true", help="skip the torch.func arm")
    ap.add_argument("--budget-s", type=float, default=270.0, help="stop repeating after about this long")
    args = ap.parse_args()
    if args.tiny:
        torch.set_num_threads(1)
        args.warmup, args.repeats = 1, 2
    main(args)
