"""The metric `M` of the products: identity, or AdamW's linearised diagonal (docs/method.md#adamw-geometry).

With the coming step's second moment frozen at `v_bar = (b2 v + (1 - b2) q) / (1 - b2^(t+1))`,
`D = 1 / (sqrt(v_bar) + eps)`; `q` replaces the coming batch's `g*g`:
`pool` (u*u + (1/k - 1/N) s2 from the pool's own per-sample gradients: the expected
`g_hat*g_hat` of a uniform k-subset, drawn without replacement), `state` (v / (1 - b2^t),
`D = I` at t = 0) or `taylor` (0). `adam` is `M = D`, `adam2` is `M = D**2`.
"""

from __future__ import annotations

import torch

METRICS = ("sgd", "adam", "adam2")
ADAM_Q = ("pool", "state", "taylor")


def group_of(optimizer) -> dict:
    """id(param) -> its optimizer param group."""
    if optimizer is None:
        return {}
    return {id(p): g for g in optimizer.param_groups for p in g["params"]}


def state_vec(optimizer, p, key: str, like: torch.Tensor) -> torch.Tensor:
    """Flattened optimizer state `key` of `p` (zeros when there is none yet)."""
    st = optimizer.state.get(p, {}) if optimizer is not None else {}
    v = st.get(key)
    return like.new_zeros(like.shape) if v is None else v.detach().reshape(-1).to(like)


def pool_q(Gp, n_bad: int, k: int) -> torch.Tensor:
    """`u*u + (1/k - 1/N) s2` per column of the pool's per-sample gradients `Gp` ([N, cols]).

    Its `n_bad` non-finite rows are already zero and are left out of the mean and variance.
    """
    nf = Gp.shape[0] - n_bad
    u = Gp.sum(0) / max(nf, 1)
    if nf <= 1:
        return u * u
    s2 = (((Gp - u) ** 2).sum(0) - n_bad * u * u).clamp_min(0) / (nf - 1)
    return u * u + (1.0 / k - 1.0 / nf) * s2


def adam_diag(p, optimizer, groups, like: torch.Tensor, adam_q: str, q=None):
    """(D over p's coordinates, number of coordinates where (1-b2) q > b2 v, as a 0-d tensor).

    `like` gives the dtype and device; `q` is p's slice of `pool_q` when `adam_q == "pool"`.
    """
    g = groups.get(id(p))
    if g is None:
        raise ValueError("metric adam needs every captured parameter in the optimizer")
    if g.get("amsgrad", False):
        raise ValueError("metric adam assumes amsgrad=False")
    b2, eps = g["betas"][1], g["eps"]
    st = optimizer.state.get(p, {})
    t = float(st.get("step", 0))
    v = state_vec(optimizer, p, "exp_avg_sq", like.new_empty(p.numel()))
    if adam_q in ("state", "taylor"):  # q is a multiple of v: v_bar = v * scale, three passes
        if adam_q == "state" and t == 0:
            return torch.ones_like(v), torch.tensor(v.numel())
        ratio = 1 / (1 - b2**t) if adam_q == "state" else 0.0  # q = ratio * v
        scale = (b2 + (1 - b2) * ratio) / (1 - b2 ** (t + 1))
        poor = torch.count_nonzero(v) if (1 - b2) * ratio > b2 else torch.tensor(0)
        return (v * scale).sqrt_().add_(eps).reciprocal_(), poor
    if adam_q != "pool":
        raise ValueError(f"adam_q must be one of {ADAM_Q}, got {adam_q!r}")
    vbar = (b2 * v + (1 - b2) * q) / (1 - b2 ** (t + 1))
    poor = ((1 - b2) * q > b2 * v).sum()
    return vbar.sqrt_().add_(eps).reciprocal_(), poor
