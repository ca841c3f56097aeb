"""A plain `transformers.Trainer` script with FTW selection: offline, a tiny Llama, a task mixture.

    python examples/hf_trainer.py [OUT_DIR] [--steps 20] [--selector ftw] [--lora]

The changes against the same script on a plain Trainer are marked `# fwsel`. The mixture is
fwsel's embedded one (2-digit additions are the target task; related, noisy, irrelevant and
duplicate rows around it): replace `mixture()` with your own rows, in any of fwsel's formats
(prompt/response, messages, instruction/output, text) with optional `id` and `source` columns.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import datasets
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from fwsel.data.synthetic import SyntheticStream, TargetSplit
from fwsel.data.tokenizer import char_tokenizer
from fwsel.hf import SelectiveTrainer  # fwsel

MIXTURE = {"target": 0.1, "related": 0.2, "noisy": 0.2, "irrelevant": 0.3, "duplicate": 0.2}


def mixture(rows: int, seed: int = 0):
    """(train rows, target select rows, target eval rows) as datasets."""
    split = TargetSplit(0, 64, 64)
    stream = SyntheticStream(seed, MIXTURE, 4, split)
    train = [stream.row(0, i) for i in range(rows)]
    return tuple(datasets.Dataset.from_list(r) for r in (train, split.select, split.eval))


def tiny_model(tok, seed: int = 0, lora: bool = False):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(config)
    if lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    return model


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default="outputs/hf_trainer")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--selector", default="ftw")
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--lora", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    tok = char_tokenizer()
    train, target, target_eval = mixture(32 * a.steps, a.seed)
    args = TrainingArguments(output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=32, learning_rate=3e-3,
                             lr_scheduler_type="constant", logging_steps=5, save_strategy="no", report_to=[],
                             use_cpu=True, seed=a.seed, disable_tqdm=True)
    trainer = SelectiveTrainer(model=tiny_model(tok, a.seed, a.lora), args=args, train_dataset=train,
                               processing_class=tok,
                               target_dataset=target, target_eval_dataset=target_eval,  # fwsel
                               selector=a.selector, budget=a.budget)  # fwsel
    trainer.train()
    metrics = trainer.evaluate()
    result = {**{k: v for k, v in metrics.items() if k.startswith("eval_")},
              "selected_per_source": trainer.selected_per_source()}  # fwsel: rows trained per source
    print(json.dumps(result, indent=1))
    with open(os.path.join(a.out, "result.json"), "w") as f:
        json.dump(result, f)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
