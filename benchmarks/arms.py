"""Benchmark arms shared by engine.py (CPU) and gpu_engine.py: imports only torch, transformers,
peft and fwsel.grads, so it runs on the bare GPU image.

Each arm is one training step's gradient work on the same N + v rows, optimizer step left out:
`plain` (sum of per-row losses, forward + backward, no hooks), `engine` (GradEngine: capture,
K, b and the one-pass update of k rows), `func` (torch.func vmap(grad) per-sample gradients
with eager attention, then the same K, b and update).
"""

from __future__ import annotations

import gc
import os
import threading
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

from fwsel.grads import GradEngine, sequence_losses
from fwsel.grads.loss import unwrap

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_config(hidden, layers, heads, kv, inter, vocab, T, attn="sdpa", tie=False, theta=10000.0):
    return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                       max_position_embeddings=max(T, 128), tie_word_embeddings=tie, rope_theta=theta,
                       attn_implementation=attn)


def build(cfg, setting, dtype=torch.float32, device="cpu", r=16, seed=0, checkpointing=False):
    """Random-init model (train mode) with LoRA r on all seven projections or full fine-tuning,
    an AdamW over its trainable parameters that has taken one step (so Adam state exists)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if setting == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed + 1)
        lcfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=PROJ, init_lora_weights=False)
        model = get_peft_model(model, lcfg).to(device=device, dtype=dtype)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(1, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed)).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    sequence_losses(model, batch).losses.sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def rows(n, T, vocab, seed, device="cpu"):
    """n rows of exactly T tokens, the first quarter a prompt (labels -100)."""
    ids = torch.randint(1, vocab, (n, T), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, : T // 4] = -100
    return {k: v.to(device) for k, v in
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}.items()}


class Plain:
    """Forward + backward of the summed per-row losses over pool + target (no hooks)."""

    def __init__(self, model, opt, pool, target, chunk=4096, **_):
        self.model, self.chunk = model, chunk
        self.batch = {k: torch.cat([pool[k], target[k]]) for k in pool}

    def __call__(self):
        sequence_losses(self.model, self.batch, self.chunk).losses.sum().backward()


class Engine:
    """GradEngine.score + apply_update on the first k rows (weights 1); hooks only while it lives."""

    def __init__(self, model, opt, pool, target, k, metric="adam", chunk=4096, **kw):
        self.engine = GradEngine(model, opt, metric, loss_chunk_tokens=chunk, **kw)
        self.pool, self.target, self.k = pool, target, k

    def __call__(self):
        sc = self.engine.score(self.pool, self.target, k=self.k)
        self.engine.apply_update(list(range(self.k)), [1.0] * self.k)
        self.ghost = sc.ghost.get("layers", 0)

    def close(self):
        self.engine.close()


class Func:
    """torch.func per-sample gradients of every trainable parameter, K, b, update. vmap(grad) needs
    eager attention (sdpa fails under vmap with a mask): the call switches the model to eager and back."""

    def __init__(self, model, opt, pool, target, k, chunk_size=None, **_):
        self.model, self.k, self.chunk_size = model, k, chunk_size
        self.base = unwrap(model)
        self.n = pool["input_ids"].shape[0]
        self.batch = {key: torch.cat([pool[key], target[key]]) for key in pool}
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
        self.frozen.update(dict(model.named_buffers()))

    def _loss(self, params, ids, mask, labels):
        out = torch.func.functional_call(self.model, (params, self.frozen), (),
                                         {"input_ids": ids[None], "attention_mask": mask[None], "use_cache": False})
        y = labels[1:]
        sup = (y != -100).to(torch.float32)
        ce = F.cross_entropy(out.logits[0, :-1].float(), y.clamp_min(0), reduction="none")
        return (ce * sup).sum() / sup.sum()

    def __call__(self):
        params = {n: p.detach() for n, p in self.trainable.items()}
        b = self.batch
        prev = self.base.config._attn_implementation
        self.base.set_attn_implementation("eager")
        try:
            g = torch.func.vmap(torch.func.grad(self._loss), in_dims=(None, 0, 0, 0), chunk_size=self.chunk_size)(
                params, b["input_ids"], b["attention_mask"], b["labels"])
        finally:
            self.base.set_attn_implementation(prev)
        G = torch.cat([g[n].reshape(g[n].shape[0], -1).float() for n in self.trainable], 1)
        del g
        Gp = G[: self.n]
        self.K, self.b = Gp @ Gp.T, Gp @ G[self.n :].mean(0)
        upd = G[: self.k].mean(0)
        col = 0
        for p in self.trainable.values():
            u = upd[col : col + p.numel()].view_as(p).to(p.dtype)
            col += p.numel()
            p.grad = u if p.grad is None else p.grad.add_(u)


ARMS = {"plain": Plain, "engine": Engine, "func": Func}


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, params):
    """Seconds for one call, gradients cleared first (outside the clock)."""
    for p in params:
        p.grad = None
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Peak:
    """Peak memory above the level at entry: CUDA max_memory_allocated, or on the CPU the resident
    set size sampled every millisecond by a thread (torch kernels release the GIL)."""

    def __init__(self, device):
        self.cuda = str(device).startswith("cuda")

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = rss()
            self.stop = False
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.stop = True
            self.thread.join()
            self.peak = max(self.peak, rss())
        self.delta = self.peak - self.base
        return False
