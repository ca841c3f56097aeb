"""`engine.projection_dim`: per-sample gradients compressed to p random features (approximate).

null (the default) keeps gradients exact. Two sketches, both unbiased (`E <f_i, f_j> = <g_i, g_j>`),
with the same seed on every rank and every step (`engine.projection`):
* `countsketch` (default): each coordinate goes, with a random sign, into one of `p` buckets
  (`f = S g`, one scatter-add per row). Its error shrinks like `1/sqrt(p)`, as a dense Gaussian
  projection's does, while it stores `P` indices and signs instead of a `P x p` matrix (hundreds
  of GB at the 1B shape). It needs the materialised rows, which fwsel keeps anyway (LoRA).
* `factored`: each captured weight block `G_i` (`d_out x d_in`) becomes `R_out G_i R_in^T`
  (`p_out x p_in`, Gaussian `R`s of variance `1/p`; dims split evenly over the blocks and within a
  block in proportion to its sides). It could act on the captured factors without ever forming
  `G_i` (full fine-tuning at scale), but an inner product's error shrinks only like `p^(-1/4)`
  (each side alone has `sqrt(p)` dims): measured on the tiny model, its relative error of `K` at
  4096 dims is 0.14-0.21 against 0.04 for the count sketch.

The metric `M` is applied before sketching (features of `M^(1/2) g`, so `K ~ <g_i, M g_j>`); with
`adam_q=pool`, `D` comes from the pool's summed gradients and squares (one all-reduce of `2P + 1`
numbers in the buffer dtype: pool q needs per-coordinate statistics; `state` and `taylor` need
none). Every product the selector sees (`K`, `b`, `y2`, the extra directions and the
aux metrics) comes from the same sketch, so the selection problem stays consistent (`K` positive
semi-definite). The update itself uses the exact rows.
"""

from __future__ import annotations

import math
import warnings

import torch

from fwsel.rng import int_seed

from .metric import adam_diag, group_of, state_vec
from .metric import q_from_sums as summed_pool_q  # pool q from sums over every rank


def split_dims(p: int, d_out: int, d_in: int) -> tuple[int, int]:
    """(p_out, p_in) with p_out * p_in <= max(p, 1), shared in proportion to the sides."""
    if p >= d_out * d_in:
        return d_out, d_in
    p_out = min(d_out, max(1, round(math.sqrt(p * d_out / d_in))))
    return p_out, min(d_in, max(1, p // p_out))


KINDS = ("countsketch", "factored")


def build(kind: str, blocks, dim: int, seed: int, device, dtype):
    if kind not in KINDS:
        raise ValueError(f"engine.projection must be one of {'|'.join(KINDS)}, got {kind!r}")
    if int(dim) < 1:
        raise ValueError(f"engine.projection_dim must be null or an integer >= 1, got {dim!r}")
    return (CountSketch if kind == "countsketch" else Projector)(blocks, int(dim), seed, device, dtype)


class CountSketch:
    """The fixed count sketch of one engine's buffer columns (`P` bucket indices and signs)."""

    def __init__(self, blocks, dim: int, seed: int, device, dtype) -> None:
        g = torch.Generator().manual_seed(int_seed(seed, "countsketch"))
        P = blocks[-1].end
        self.blocks, self.dim = blocks, int(dim)
        self.idx = torch.randint(0, self.dim, (P,), generator=g).to(device)
        self.sign = (torch.randint(0, 2, (P,), generator=g) * 2 - 1).to(device, dtype)

    def __call__(self, G: torch.Tensor, scales=None) -> torch.Tensor:
        """Rows `[r, P]` -> `[r, dim]`; `scales[j]` multiplies block j first."""
        if scales is not None and any(x is not None for x in scales):
            ones = [G.new_ones(b.end - b.start) for b in self.blocks]
            G = G * torch.cat([o if x is None else x.reshape(-1) for o, x in zip(ones, scales)])
        return G.new_zeros(G.shape[0], self.dim).index_add_(1, self.idx, G * self.sign)

    def vector(self, u_blocks: list[torch.Tensor]) -> torch.Tensor:
        return self(torch.cat([u.reshape(-1) for u in u_blocks])[None])[0]


class Projector:
    """The fixed factored projection of one engine's captured blocks (buffer columns -> features)."""

    def __init__(self, blocks, dim: int, seed: int, device, dtype) -> None:
        per = max(1, int(dim) // len(blocks))
        self.parts, off = [], 0
        for j, blk in enumerate(blocks):
            shape = tuple(blk.param.shape)
            d_out, d_in = shape if len(shape) == 2 else (1, blk.end - blk.start)
            p_out, p_in = split_dims(per, d_out, d_in)
            g = torch.Generator().manual_seed(int_seed(seed, "projection", j))

            def draw(p, d, g=g):
                if p == d:
                    return None  # this side stays exact
                return (torch.randn(p, d, generator=g, dtype=torch.float64) / math.sqrt(p)).to(device, dtype)

            self.parts.append((blk, d_out, d_in, draw(p_out, d_out), draw(p_in, d_in), off, off + p_out * p_in))
            off += p_out * p_in
        self.dim = off

    def __call__(self, G: torch.Tensor, scales=None) -> torch.Tensor:
        """Rows `[r, P]` of buffer columns -> `[r, dim]`; `scales[j]` multiplies block j first."""
        out = G.new_empty(G.shape[0], self.dim)
        for j, (blk, d_out, d_in, R_out, R_in, lo, hi) in enumerate(self.parts):
            X = G[:, blk.start : blk.end]
            if scales is not None and scales[j] is not None:
                X = X * scales[j]
            X = X.reshape(-1, d_out, d_in)
            if R_out is not None:
                X = torch.matmul(R_out, X)
            if R_in is not None:
                X = torch.matmul(X, R_in.T)
            out[:, lo:hi] = X.reshape(G.shape[0], -1)
        return out

    def vector(self, u_blocks: list[torch.Tensor]) -> torch.Tensor:
        """One direction given block by block (flattened, in buffer order) -> `[dim]`."""
        return self(torch.cat([u.reshape(-1) for u in u_blocks])[None])[0]


def features(proj, comm, opt, blocks, local: torch.Tensor, losses: torch.Tensor, n_loc: int, k, dirs, *,
             metrics: tuple, adam_q: str, q_scale: float = 1.0):
    """This rank's projected rows `[rows, dim * n_metrics]` (non-finite rows: NaN), the extra
    directions' features (main metric `metrics[0]`), and Adam's poor fraction.

    `proj` is the sketch, `comm` the process group, `opt` the optimizer, `blocks` the captured
    blocks (buffer column ranges); `local` (this rank's rows: `n_loc` pool, then target) is
    zeroed where not finite."""
    fin = torch.isfinite(losses).to(local.device) & torch.isfinite(local.sum(1))
    local[~fin] = 0
    groups = group_of(opt)
    D, poor, coords = [None] * len(blocks), 0, 0
    if any(m != "sgd" for m in metrics):
        Gp = local[:n_loc]
        if adam_q == "pool":
            stats = torch.cat([Gp.sum(0), (Gp * Gp).sum(0), fin[:n_loc].sum().to(Gp)[None]])  # 2P + 1, buffer dtype
            comm.all_reduce_(stats)
            P, nf = local.shape[1], int(stats[-1])
            k_eff = min(k or nf, nf) if nf > 0 else 1
        for j, blk in enumerate(blocks):
            if adam_q == "pool":
                s1, s2 = stats[blk.start : blk.end], stats[P + blk.start : P + blk.end]
                D[j], pj = adam_diag(blk.param, opt, groups, s1, "pool", q_scale * summed_pool_q(s1, s2, nf, k_eff))
            else:  # state | taylor: D from the optimizer state alone
                D[j], pj = adam_diag(blk.param, opt, groups, local[0, blk.start : blk.end], adam_q)
            poor, coords = poor + int(pj), coords + D[j].numel()
    root = {"sgd": [None] * len(blocks), "adam": [d.sqrt() if d is not None else None for d in D],
            "adam2": D}
    feats = torch.cat([proj(local, root[m]) for m in metrics], 1)
    feats[~fin] = float("nan")  # the base engine drops non-finite rows by looking at the features
    dir_feats, r_m = [], root[metrics[0]]
    for d in dirs:
        if d == "momentum":  # <g, M m> = <M^1/2 g, M^1/2 m>
            us = [state_vec(opt, b.param, "exp_avg", local[0, b.start : b.end]) for b in blocks]
            us = [u if r is None else u * r for u, r in zip(us, r_m)]
        else:  # "decay": <g, theta> = <M^1/2 g, M^-1/2 theta>
            us = [b.param.detach().reshape(-1).to(local) for b in blocks]
            us = [u if r is None else u / r for u, r in zip(us, r_m)]
        dir_feats.append(proj.vector(us))
    return feats, dir_feats, (poor / coords if coords else None)


def products(buf, n: int, finite, dir_feats, poor_frac, *, dim: int, metrics: tuple, aux_metrics: tuple):
    """Scores from gathered features (`buf` `[N + v, dim * len(metrics)]` in the order of
    `metrics`, the main metric first; non-finite rows zero)."""
    from .engine import Scores

    f64 = torch.float64
    nt = int(finite[n:].sum())
    if nt == 0:
        warnings.warn("no target row has a finite loss and gradient: g_T = 0")
    out = {}  # metric -> (pool features, sketched g_T)
    for i, m in enumerate(metrics):
        F = buf[:, i * dim : (i + 1) * dim].to(f64)
        out[m] = (F[:n], F[n:].sum(0) / max(nt, 1))
    Fp, gT = out[metrics[0]]
    U = torch.stack([gT, *[u.to(f64) for u in dir_feats]])
    K, B, G = (Fp @ Fp.T).cpu(), (Fp @ U.T).cpu(), (U @ U.T).cpu()
    aux = {a: {"b": (Fa @ ga).cpu(), "sq_norms": (Fa * Fa).sum(1).cpu(), "y2": float(ga @ ga)}
           for a, (Fa, ga) in ((a, out[a]) for a in aux_metrics)}
    return Scores(K=K, b=B, y2=float(G[0, 0]), dir_gram=G, losses=None, target_losses=None,
                  sq_norms=K.diagonal().clone(), finite=finite[:n].clone(), poor_frac=poor_frac, aux=aux)
