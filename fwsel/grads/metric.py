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


def pool_q(Gp, n_bad: int, k: int, out=None) -> torch.Tensor:
    """`u*u + (1/k - 1/N) s2` per column of the pool's per-sample gradients `Gp` ([N, cols]).

    Its `n_bad` non-finite rows are already zero and are left out of the mean and variance.
    From the column sums of `g` and `g*g`: a zero row adds nothing to either. On the CPU row by
    row into two cache-sized sums (each row read once, no [N, cols] temporary: half the time of
    the two matrix-vector products); elsewhere those products (one temporary, `out` when given).
    """
    if Gp.device.type == "cpu" and Gp.shape[0] > 0:
        s1, s2 = Gp[0].clone(), Gp[0] * Gp[0]
        for g in Gp[1:]:
            s1.add_(g)
            s2.addcmul_(g, g)
        return q_from_sums(s1, s2, Gp.shape[0] - n_bad, k)
    ones = Gp.new_ones(Gp.shape[0])
    return q_from_sums(ones @ Gp, ones @ torch.mul(Gp, Gp, out=out), Gp.shape[0] - n_bad, k)


def q_from_sums(s1, s2, nf: int, k: int) -> torch.Tensor:
    """`pool_q` from the pool's summed gradients `s1` and squares `s2` over its `nf` finite rows."""
    u = s1 / max(nf, 1)
    q = u * u
    if nf > 1:
        q = q + (1.0 / k - 1.0 / nf) * ((s2 - nf * u * u).clamp_min(0) / (nf - 1))
    return q


def adam_diag(p, optimizer, groups, like: torch.Tensor, adam_q: str, q=None):
    """(D over p's coordinates, number of coordinates where (1-b2) q > b2 v, as a 0-d tensor).

    `like` gives the dtype and device; `q` is p's slice of `pool_q` when `adam_q == "pool"`.
    """
    v = state_vec(optimizer, p, "exp_avg_sq", like.new_empty(p.numel()))
    return _diag(v, *_settings(p, optimizer, groups), adam_q, q)


def adam_diag_run(params, optimizer, groups, like: torch.Tensor, adam_q: str, q=None):
    """`adam_diag` over consecutive parameters, their coordinates concatenated (`q` likewise):
    one set of ops per stretch of parameters sharing (beta2, eps, step), not one per parameter."""
    settings = [_settings(p, optimizer, groups) for p in params]
    parts, poor, off, i = [], 0, 0, 0
    while i < len(params):
        j = i + 1
        while j < len(params) and settings[j] == settings[i]:
            j += 1
        vs = [state_vec(optimizer, p, "exp_avg_sq", like.new_empty(p.numel())) for p in params[i:j]]
        v = vs[0] if len(vs) == 1 else torch.cat(vs)
        D, pr = _diag(v, *settings[i], adam_q, None if q is None else q[off : off + v.numel()])
        parts.append(D)
        poor, off, i = poor + pr, off + v.numel(), j
    return (parts[0] if len(parts) == 1 else torch.cat(parts)), poor


def spread(d: int, n: int):
    """About `n` of `d` positions, evenly spread (None: all, when `d <= n`)."""
    return None if d <= n else torch.linspace(0, d - 1, n).round().long().unique()


def sample_columns(v: torch.Tensor, n: int, width: int = 8):
    """(v[:, cols], cols) for about `n` columns of `v` in runs of `width` spread evenly (cols None:
    every column, when there are at most `n`). Whole runs read whole cache lines, so the sample
    costs what it holds."""
    d = v.shape[1]
    if d <= n:
        return v, None
    if d % width:
        cols = spread(d, n).to(v.device)
        return v.index_select(1, cols), cols
    runs = spread(d // width, max(n // width, 1)).to(v.device)
    cols = (runs[:, None] * width + torch.arange(width, device=v.device)).reshape(-1)
    return v.reshape(v.shape[0], -1, width).index_select(1, runs).reshape(v.shape[0], -1), cols


def adam_diag_sample(p, optimizer, groups, like: torch.Tensor, adam_q: str, samples: int = 64):
    """AdamW's D of a 2-D weight `p` on about `samples` of its rows (every column) and `samples`
    of its columns (every row), for `fwsel.grads.ghost.rank1_sampled`: (D[rows], D[:, cols],
    rows, cols, poor count estimated from the sampled rows). `adam_q`: state or taylor (q a
    multiple of v). A wide layer's full D is a few passes over every coordinate per step."""
    v = optimizer.state.get(p, {}).get("exp_avg_sq") if optimizer is not None else None
    v = torch.zeros(p.shape, dtype=like.dtype, device=like.device) if v is None else v.detach()
    rows = spread(v.shape[0], samples)
    vr = v if rows is None else v.index_select(0, rows.to(v.device))
    vc, cols = sample_columns(v, samples)
    settings = _settings(p, optimizer, groups)
    Dr, poor = _diag(vr.to(like), *settings, adam_q, None)
    Dc, _ = _diag(vc.to(like), *settings, adam_q, None)
    return Dr, Dc, rows, cols, poor * (v.numel() / max(vr.numel(), 1))


def _settings(p, optimizer, groups) -> tuple:
    """(beta2, eps, steps taken) of `p`'s group and state."""
    g = groups.get(id(p))
    if g is None:
        raise ValueError("metric adam needs every captured parameter in the optimizer")
    if g.get("amsgrad", False):
        raise ValueError("metric adam assumes amsgrad=False")
    return g["betas"][1], g["eps"], float(optimizer.state.get(p, {}).get("step", 0))


def _diag(v, b2, eps, t, adam_q: str, q):
    """D and the poor count from the second moment `v` (and `q` for adam_q=pool)."""
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


def direction(name: str, optimizer, params, gT: torch.Tensor, M):
    """An extra direction `u` over `params`' coordinates (concatenated like `gT`): `momentum` (AdamW's
    exp_avg) or `decay` (`M^-1 theta`, so `<g, M u>` is `<g, theta>`)."""
    if name == "momentum":
        parts = [state_vec(optimizer, p, "exp_avg", gT.new_empty(p.numel())) for p in params]
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    parts = [p.detach().reshape(-1).to(gT) for p in params]
    theta = parts[0] if len(parts) == 1 else torch.cat(parts)
    return theta if M is None else theta / M
