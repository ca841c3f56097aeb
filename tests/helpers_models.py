"""Tiny Llama / Qwen3 models and random collated batches for tests (no network, < 0.1 s each)."""

from __future__ import annotations

import torch

VOCAB = 64
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_config(kind: str = "llama", tie: bool = False, attn: str = "eager", **over):
    """A 2-layer, width-32 config of `kind` (llama | qwen3)."""
    from transformers import LlamaConfig, Qwen3Config

    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
              tie_word_embeddings=tie, attn_implementation=attn)
    if kind == "qwen3":
        kw["head_dim"] = 8
    kw.update(over)
    return (Qwen3Config if kind == "qwen3" else LlamaConfig)(**kw)


def tiny_model(kind: str = "llama", dtype=torch.float64, seed: int = 0, **cfg):
    """Randomly initialised causal LM in `dtype` (train mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, **cfg)).to(dtype)
    return model.train()


def with_lora(model, r: int = 4, alpha: int = 8, dropout: float = 0.0, targets=PROJ, seed: int = 0,
              random_b: bool = True, **kw):
    """peft LoRA on `targets`; `random_b` also randomises lora_B so lora_A gets gradients."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                     init_lora_weights=not random_b, **kw)
    return get_peft_model(model, cfg).train()


def random_batch(n_rows: int, seed: int = 0, min_len: int = 4, max_len: int = 12, width=None,
                 vocab: int = VOCAB, prompt: bool = True) -> dict:
    """Right-padded rows of random lengths; a random prompt prefix (labels -100) when `prompt`.

    Every row keeps at least one supervised token (labels[t] for t >= 1).
    """
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (n_rows,), generator=g).tolist()
    width = width or max(lens)
    ids = torch.zeros(n_rows, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, n in enumerate(lens):
        ids[i, :n] = torch.randint(1, vocab, (n,), generator=g)
        mask[i, :n] = 1
        start = int(torch.randint(1, n, (1,), generator=g)) if prompt else 1
        labels[i, start:n] = ids[i, start:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
