"""Step time of `fwsel.hf.SelectiveTrainer(selector="ftw")` against a plain `transformers.Trainer`.

    OMP_NUM_THREADS=1 python benchmarks/hf_step.py [--rounds 3] [--steps 6] [--n 32] [--size small] [--context 0]

Arms, each a whole `Trainer.train()` of `--steps` optimizer steps on a fresh model, run in
interleaved rounds in one process on one torch thread: `ftw` (the pool of N rows scored in
the AdamW geometry, k = N/4 kept, the one-pass update), `random` (k of N, one weighted
backward: the cost of the Trainer machinery around a k-row update), `plain N` (a plain Trainer
step on the same N rows) and `plain k` (a plain Trainer step on k rows). A step is timed from
the Trainer's `on_step_begin` to `on_step_end` callback (data loading, training_step, clipping,
optimizer and scheduler step); the first step of each run is dropped; medians over all steps.
Rows are the embedded mixture's (~10 tokens); `--context L` puts L random letters before each
prompt (longer rows, same supervised tokens): the engine's products cost ~N^2 P whatever the
row length, the forward and backward grow with it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import string
import time

import numpy as np
import torch

SIZES = {"tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2),
         "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4)}


def model_for(tok, size: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **SIZES[size]))


def step_times(arm: str, rows, target, tok, a) -> list[float]:
    import datasets
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from fwsel.data.collate import Collator
    from fwsel.hf import SelectiveTrainer

    times, t0 = [], [0.0]

    class Clock(TrainerCallback):
        def on_step_begin(self, *args, **kw):
            t0[0] = time.perf_counter()

        def on_step_end(self, *args, **kw):
            times.append(time.perf_counter() - t0[0])

    k = max(1, round(a.n / 4))
    bs = k if arm == "plain k" else a.n
    args = TrainingArguments(output_dir=os.path.join(a.out, arm.replace(" ", "_")), max_steps=a.steps,
                             per_device_train_batch_size=bs, learning_rate=1e-3, save_strategy="no", report_to=[],
                             use_cpu=True, disable_tqdm=True, logging_steps=10**6, seed=0)
    model = model_for(tok, a.size)
    if a.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    if arm.startswith("plain"):
        enc = Collator(tok, 128)
        data = datasets.Dataset.from_list([dict(zip(("input_ids", "labels"), enc.encode(r)[:2])) for r in rows])
        tr = Trainer(model=model, args=args, train_dataset=data,
                     data_collator=DataCollatorForSeq2Seq(tok, padding=True), callbacks=[Clock()])
    else:
        tr = SelectiveTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                              processing_class=tok, target_dataset=target, selector=arm, budget=0.25,
                              callbacks=[Clock()])
    tr.train()
    return times[1:]


def with_context(rows: list[dict], n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{**r, "prompt": "".join(rng.choice(list(string.ascii_lowercase), n)) + " " + r["prompt"]} if n else r
            for r in rows]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--n", type=int, default=32, help="pool rows per step (per_device_train_batch_size)")
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--lora", action="store_true", help="LoRA r=8 on every Linear instead of full fine-tuning")
    p.add_argument("--context", type=int, default=0, help="random letters before each prompt")
    p.add_argument("--arms", default="ftw,random,plain N,plain k", help="comma-separated; selector names or plain N|k")
    p.add_argument("--out", default="/tmp/fwsel_hf_step")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    import transformers

    from fwsel.data.tokenizer import char_tokenizer
    from fwsel.hf.demo import mixture

    tok = char_tokenizer()
    train, target, _ = mixture(a.n * a.steps)
    rows, target = (with_context(d.to_list(), a.context, seed) for seed, d in enumerate((train, target)))
    arms = a.arms.split(",")
    got = {arm: [] for arm in arms}
    for _ in range(a.rounds):  # interleaved: every round runs each arm once
        for arm in arms:
            got[arm] += step_times(arm, rows, target, tok, a)
    med = {arm: statistics.median(v) for arm, v in got.items()}
    print(f"# SelectiveTrainer step vs plain Trainer step: model {a.size} ({SIZES[a.size]}), N={a.n}, "
          f"context {a.context}, "
          f"{'LoRA r=8 all-linear' if a.lora else 'full fine-tuning'}, "
          f"k={max(1, round(a.n / 4))}, target batch 8, {a.rounds} rounds x {a.steps - 1} timed steps per arm")
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{platform.processor() or platform.machine()}, 1 torch thread")
    print("| arm | median step (ms) | / plain N |\n|---|---|---|")
    for arm in arms:
        print(f"| {arm} | {1e3 * med[arm]:.1f} | {med[arm] / med['plain N']:.2f}x |")
    if "ftw" in med:
        print(f"\nftw / plain N = {med['ftw'] / med['plain N']:.2f}x; "
              f"ftw / plain k = {med['ftw'] / med['plain k']:.2f}x")


if __name__ == "__main__":
    main()
