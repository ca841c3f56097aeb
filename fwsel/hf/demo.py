"""What the offline examples share: fwsel's embedded mixture as datasets and a tiny Llama.

A user's script replaces both with its own rows and model; they exist so that
`examples/hf_trainer.py` and `examples/trl_sft.py` run anywhere without a hub.
"""

from __future__ import annotations

import json
import os

MIXTURE = {"target": 0.1, "related": 0.2, "noisy": 0.2, "irrelevant": 0.3, "duplicate": 0.2}


def as_trl(row: dict) -> dict:
    """fwsel's prompt/response row in TRL's prompt/completion format."""
    return {"id": row["id"], "source": row["source"], "prompt": row["prompt"], "completion": row["response"]}


def mixture(rows: int, seed: int = 0, convert=None):
    """(train rows, target select rows, target eval rows) as `datasets.Dataset`s, each row through `convert`."""
    import datasets

    from fwsel.data.synthetic import SyntheticStream, TargetSplit

    convert = convert or (lambda r: r)
    split = TargetSplit(0, 64, 64)
    stream = SyntheticStream(seed, MIXTURE, 4, split)
    parts = ([stream.row(0, i) for i in range(rows)], split.select, split.eval)
    return tuple(datasets.Dataset.from_list([convert(r) for r in part]) for part in parts)


def tiny_model(tok, seed: int = 0, lora: bool = False):
    """A 2-layer Llama built from a config (random init), optionally with LoRA on every Linear."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(config)
    if lora:
        from peft import LoraConfig, get_peft_model

        lora_config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora_config)
    return model


def example_args(description: str, out: str, argv=None):
    """The examples' shared command line."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("out", nargs="?", default=out)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--selector", default="ftw")
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--lora", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def report(trainer, out: str) -> dict:
    """Evaluate, print and save the target metrics and the rows trained per source."""
    metrics = trainer.evaluate()
    result = {**{k: v for k, v in metrics.items() if k.startswith("eval_")},
              "selected_per_source": trainer.selected_per_source()}
    print(json.dumps(result, indent=1))
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f)
    return result
