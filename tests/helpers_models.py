"""Tiny Llama / Qwen3 models and random collated batches for tests (no network, < 0.1 s each)."""

from __future__ import annotations

import torch

VOCAB = 64
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_config(kind: str = "llama", tie: bool = False, attn: str = "sdpa", **over):
    """A 2-layer, width-32 config of `kind` (llama | qwen3).

    sdpa, not eager: eager attention runs its softmax in float32 even for float64 models, so
    padding alone moves a row's logits by ~1e-8 and no fp64 oracle could match to 1e-10.
    """
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


def captured_params(model):
    """What the engine should capture: trainable Linear weights/biases not tied to an embedding."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = {id(p) for m in base.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    out = []
    for m in base.modules():
        if isinstance(m, torch.nn.Linear):
            out += [p for p in (m.weight, m.bias) if p is not None and p.requires_grad and id(p) not in emb]
    return out


def row_loss(model, batch, i):
    """Row i's mean-token loss from the model's own full logits, the row alone and unpadded."""
    n = int(batch["attention_mask"][i].sum())
    logits = model(input_ids=batch["input_ids"][i : i + 1, :n]).logits[0, :-1].to(torch.float64)
    y = batch["labels"][i, 1:n]
    return torch.nn.functional.cross_entropy(logits[y != -100], y[y != -100])


def oracle_grads(model, batch, params):
    """[rows, P] per-sample gradients from a batch-size-1 loop, and the losses."""
    gs, ls = [], []
    for i in range(batch["input_ids"].shape[0]):
        loss = row_loss(model, batch, i)
        gs.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
        ls.append(loss.detach())
    return torch.stack(gs).to(torch.float64), torch.stack(ls)


def oracle_metric(optimizer, params, G, metric, adam_q="pool", k=None):
    """Diagonal of M (float64, [P]) straight from docs/method.md#adamw-geometry and optimizer.state."""
    if metric == "sgd":
        return torch.ones(G.shape[1], dtype=torch.float64)
    N, k = G.shape[0], k or G.shape[0]
    parts, col = [], 0
    for p in params:
        g = next(gr for gr in optimizer.param_groups if any(q is p for q in gr["params"]))
        b2, eps = g["betas"][1], g["eps"]
        st = optimizer.state.get(p, {})
        t = float(st["step"]) if "step" in st else 0.0
        v = st["exp_avg_sq"].reshape(-1).double() if "exp_avg_sq" in st else torch.zeros(p.numel()).double()
        Gp = G[:, col : col + p.numel()]
        col += p.numel()
        if adam_q == "pool":
            q = Gp.mean(0) ** 2 + (1 / k - 1 / N) * Gp.var(0, unbiased=True)
        elif adam_q == "taylor":
            q = torch.zeros_like(v)
        elif t == 0:
            parts.append(torch.ones_like(v))
            continue
        else:
            q = v / (1 - b2**t)
        D = 1 / (((b2 * v + (1 - b2) * q) / (1 - b2 ** (t + 1))).sqrt() + eps)
        parts.append(D if metric == "adam" else D * D)
    return torch.cat(parts)
