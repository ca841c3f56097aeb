"""Bytes moved per step by the distributed path at the Llama-3.2-1B shape (LoRA r=16 on q,k,v,o,gate,up,down).

    .venv/bin/python benchmarks/dist_bytes.py [--rows-pool 24] [--rows-target 8] [--r 16]

P (per-sample LoRA gradient size) is counted from a peft model built on the meta device (no
weights, no download), then checked against sum r (d_in + d_out). Features are fp32. Per step:
* gather: every rank ends up holding the [N + v, F] matrix (F = P exact, F = p sketched); with
  all_gather each rank receives (W - 1)/W of it.
* pool-q statistics (adam_q=pool with a sketch only): one all-reduce of 2P + 1 numbers.
* update: one all-reduce of the P trainable gradients (+1 flag each parameter tensor).
Ring all-reduce traffic per rank is 2 (W - 1)/W times the buffer.
"""

from __future__ import annotations

import argparse

import torch

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_size(r: int) -> tuple[int, int]:
    """(trainable LoRA numbers, trainable tensors) of Llama-3.2-1B with LoRA r on PROJ."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)
    with torch.device("meta"):
        model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=r, target_modules=list(PROJ)))
    params = [p for p in model.parameters() if p.requires_grad]
    shapes = {"q_proj": (2048, 2048), "k_proj": (2048, 512), "v_proj": (2048, 512), "o_proj": (2048, 2048),
              "gate_proj": (2048, 8192), "up_proj": (2048, 8192), "down_proj": (8192, 2048)}
    by_hand = 16 * sum(r * (d_in + d_out) for d_in, d_out in shapes.values())
    total = sum(p.numel() for p in params)
    assert total == by_hand, (total, by_hand)
    return total, len(params)


def mb(x: float) -> str:
    return f"{x / 2**20:10.2f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows-pool", type=int, default=24)
    ap.add_argument("--rows-target", type=int, default=8)
    ap.add_argument("--r", type=int, default=16)
    a = ap.parse_args()
    P, tensors = lora_size(a.r)
    rows, f32 = a.rows_pool + a.rows_target, 4
    print(f"Llama-3.2-1B, LoRA r={a.r} on {','.join(PROJ)}: P = {P:,} per-sample numbers ({tensors} tensors); "
          f"N + v = {a.rows_pool} + {a.rows_target} = {rows} rows, fp32")
    update = (P + tensors) * f32
    stats = (2 * P + 1) * f32
    print(f"{'features':>24} {'gathered [N+v, F]':>18} {'recv/rank W=2':>15} {'recv/rank W=8':>15}"
          f" {'+ all-reduce buffers':>22}")
    for name, F, extra in [("exact (P)", P, update)] + [
            (f"sketch p={p}", p, update + stats) for p in (1024, 8192, 65536)]:
        g = rows * F * f32
        print(f"{name:>24} {mb(g):>18} {mb(g / 2):>15} {mb(g * 7 / 8):>15} {mb(extra):>22}")
    print(f"all-reduce buffers: update {mb(update).strip()} (every mode), pool-q statistics {mb(stats).strip()} "
          f"(sketch with adam_q=pool only); ring traffic per rank ~2(W-1)/W x buffer")
    print(f"exact / sketch p=8192 gathered: {P / 8192:.0f}x")


if __name__ == "__main__":
    main()
