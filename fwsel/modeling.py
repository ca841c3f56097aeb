"""Build the model and tokenizer: the embedded tiny Llama, or a pretrained causal LM by name/path.

LoRA goes through the top-level `lora.*` keys (peft, vanilla adapters), so
`lora.enabled=false` turns it off for any model.
"""

from __future__ import annotations

import logging

import torch

from fwsel.rng import int_seed

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`model.dtype` (fwsel.config.validate checks it is allowed for the model kind)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def build_tiny(mcfg, tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=int(mcfg.hidden_size),
        intermediate_size=int(mcfg.intermediate_size), num_hidden_layers=int(mcfg.num_layers),
        num_attention_heads=int(mcfg.num_heads), num_key_value_heads=int(mcfg.num_kv_heads),
        max_position_embeddings=int(mcfg.max_position_embeddings), tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # init has its own stream: (seed, "init")
        torch.manual_seed(int_seed(seed, "init"))
        return LlamaForCausalLM(config)


def add_lora(model, lcfg):
    from peft import LoraConfig, get_peft_model

    targets = lcfg.target_modules  # a list of module names, or peft's "all-linear" (every Linear but the head)
    cfg = LoraConfig(r=int(lcfg.r), lora_alpha=float(lcfg.alpha), lora_dropout=float(lcfg.dropout),
                     target_modules=targets if isinstance(targets, str) else list(targets), bias="none",
                     task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def build_model(cfg, device: torch.device):
    """Returns (model, tokenizer), model on `device` in train mode (`cfg` passed fwsel.config.validate)."""
    m = cfg.model
    if m.kind == "tiny":
        from fwsel.data.tokenizer import char_tokenizer

        dtype = resolve_dtype(m.dtype, device)
        tokenizer = char_tokenizer()
        model = build_tiny(m, tokenizer, int(cfg.seed))
    else:  # hf
        from fwsel.hub import load_pretrained

        dtype = resolve_dtype(m.dtype, device)
        model, tokenizer = load_pretrained(m, dtype)
    model = model.to(device=device, dtype=dtype)
    if m.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int_seed(int(cfg.seed), "lora-init"))
            model = add_lora(model, cfg.lora)
        # adapters stay float32 on a bf16/fp16 base (peft's autocast_adapter_dtype: AdamW steps on
        # half-precision adapters round away); otherwise they take the model dtype (fp64 oracles)
        model = model.to(device=device) if dtype in (torch.bfloat16, torch.float16) else model.to(device, dtype)
    model.train()
    return model, tokenizer
