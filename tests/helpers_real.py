"""Tiny pretrained-style checkpoints on disk (Llama and Qwen3, saved with save_pretrained) and
their BPE tokenizers, trained here on local text: what `model.name_or_path=<dir>` loads.

* llama: BOS `<s>`, EOS `</s>`, pad `<pad>`, no chat template (the plain template is used).
* qwen: no BOS, EOS `<|im_end|>`, NO pad token (fwsel pads with EOS), a ChatML chat template.
Both have `max_position_embeddings=64`, so rows are cut to 64 tokens whatever data.max_len says.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris.",
    "### Instruction:\nAdd the numbers.\n\n### Input:\n12 and 30\n\n### Response:\n42",
    "user: hello there\nassistant: hi, how can I help?", "Question: 2+2=? A. 3 B. 4 C. 5 D. 6 Answer: B",
    "reverse the word stone: enots", "Translate to German: good morning -> guten Morgen",
] * 20
MAX_POS = 64


def train_tokenizer(specials, **tokens):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **tokens)


def make_checkpoint(path, kind: str, seed: int = 0) -> str:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    if kind == "llama":
        tok = train_tokenizer(["<pad>", "<s>", "</s>"], bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    else:
        tok = train_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos_token="<|im_end|>")
        tok.chat_template = CHATML
    kw = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=MAX_POS, tie_word_embeddings=False,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlamaConfig(**kw) if kind == "llama" else Qwen3Config(head_dim=8, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    """{'llama': dir, 'qwen': dir}: loadable offline by path."""
    root = tmp_path_factory.mktemp("ckpts")
    return {k: make_checkpoint(root / k, k, seed=i) for i, k in enumerate(("llama", "qwen"))}


def write_jsonl(path, rows) -> str:
    os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def hf_cfg(name_or_path, over=None):
    """A config with just what build_model reads, for model=hf; `over`: {dotted key: value}."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({
        "seed": 0,
        "model": {"kind": "hf", "name_or_path": name_or_path, "dtype": "auto", "gradient_checkpointing": False,
                  "tokenizer": None, "revision": None, "trust_remote_code": False, "attn_implementation": "sdpa"},
        "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}})
    for key, value in (over or {}).items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg
