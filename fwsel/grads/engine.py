"""GradEngine: per-sample gradient products and the one-pass update (METHOD sections 3-4)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .capture import Capture, check_peft, requires_grad
from .loss import concat_batches, sequence_losses, take_rows
from .metric import ADAM_Q, METRICS, adam_diag, group_of, state_vec

DIRS = ("momentum", "decay")


@dataclass
class Scores:
    """Products over the captured parameters, on the CPU, in float64."""

    K: torch.Tensor  # [N, N] <g_i, M g_j>
    b: torch.Tensor  # [N, 1 + n_dir] <g_i, M u> for u = g_T, then each extra direction
    y2: float  # <g_T, M g_T>
    dir_gram: torch.Tensor  # [1 + n_dir, 1 + n_dir] <u_a, M u_b> among (g_T, extra dirs...)
    losses: torch.Tensor  # [N] pool losses
    target_losses: torch.Tensor  # [v] target losses
    sq_norms: torch.Tensor  # [N] diag(K)
    finite: torch.Tensor  # [N] bool; False rows of K, b are 0 and never enter the update
    poor_frac: float | None = None  # adam: fraction of coordinates with (1-b2) q > b2 v
    aux: dict = field(default_factory=dict)  # metric -> {"b": [N], "sq_norms": [N], "y2": float}


class GradEngine:
    """Scores a pool against a target batch from one forward and one backward, then updates.

    `metric`: sgd | adam | adam2; `adam_q`: pool | state | taylor; `loss_chunk_tokens`: head
    chunk size; `micro_batch_size`: rows per forward/backward (None: all at once);
    `aux_metrics`: other metrics whose N-vectors (b for g_T, squared norms, y2) are also returned.
    """

    def __init__(self, model, optimizer, metric="sgd", *, adam_q="pool", loss_chunk_tokens=4096,
                 micro_batch_size=None, aux_metrics=()):
        for m in (metric, *aux_metrics):
            if m not in METRICS:
                raise ValueError(f"metric must be one of {METRICS}, got {m!r}")
        if adam_q not in ADAM_Q:
            raise ValueError(f"adam_q must be one of {ADAM_Q}, got {adam_q!r}")
        if optimizer is None and any(m != "sgd" for m in (metric, *aux_metrics)):
            raise ValueError("the adam metrics need the optimizer")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError("micro_batch_size must be positive or None")
        check_peft(model)
        self.model, self.optimizer, self.metric = model, optimizer, metric
        self.adam_q, self.loss_chunk_tokens = adam_q, loss_chunk_tokens
        self.micro_batch_size, self.aux_metrics = micro_batch_size, tuple(aux_metrics)
        self.cap = Capture(model)
        if not self.cap.sites:
            raise ValueError("no trainable nn.Linear to capture (LoRA adapters or full fine-tuning)")
        self._pool: dict | None = None  # the scored pool rows, kept for the fallback backward
        self._finite: torch.Tensor | None = None

    # ------------------------------------------------------------------ scoring
    def score(self, pool_batch: dict, target_batch: dict, extra_dirs=(), k=None) -> Scores:
        """One forward and one backward over pool + target rows; products in float64."""
        bad = [d for d in extra_dirs if d not in DIRS]
        if bad:
            raise ValueError(f"unknown extra_dirs {bad}; known: {DIRS}")
        check_peft(self.model)
        self._free()
        batch = concat_batches(pool_batch, target_batch)
        n = pool_batch["input_ids"].shape[0]
        rows = batch["input_ids"].shape[0]
        losses = torch.empty(rows, dtype=torch.float64)
        mb = self.micro_batch_size or rows
        cap = self.cap
        with torch.enable_grad(), cap.scoring(rows):
            for s in range(0, rows, mb):
                sub = {key: val[s : s + mb] for key, val in batch.items()}
                cap.offset, cap.mb_rows = s, sub["input_ids"].shape[0]
                out = sequence_losses(self.model, sub, self.loss_chunk_tokens, on_chunk=cap.on_chunk)
                fin = torch.isfinite(out.losses)
                total = out.losses[fin].sum()
                if total.requires_grad:
                    torch.autograd.backward(total, inputs=[cap.dummy])
                losses[s : s + cap.mb_rows] = out.losses.detach().double().cpu()
        n, losses = self._exchange(n, losses)  # seam: fwsel.grads.dist gathers every rank's rows here
        buf = cap.buf
        finite = torch.isfinite(losses) & torch.isfinite(buf).all(1).cpu()
        if not bool(finite.all()):
            buf[~finite.to(buf.device)] = 0
        self._finite, self._pool = finite[:n], {key: val[:n] for key, val in batch.items()}
        scores = self._products(n, finite, tuple(extra_dirs), k)
        scores.losses, scores.target_losses = losses[:n], losses[n:]
        return scores

    def _exchange(self, n: int, losses: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Between capture and products: (pool rows, losses) of what the products see. Here the
        rows just captured; a sharded engine (fwsel.grads.dist) swaps in every rank's rows."""
        return n, losses

    def _products(self, n, finite, dirs, k) -> Scores:
        buf, f64 = self.cap.buf, torch.float64
        n_bad = int((~finite[:n]).sum())
        nf, nt = n - n_bad, int(finite[n:].sum())
        if nt == 0:
            warnings.warn("no target row has a finite loss and gradient: g_T = 0")
        k_eff = min(k or nf, nf) if nf > 0 else 1
        groups = group_of(self.optimizer)
        metrics = (self.metric, *[a for a in self.aux_metrics if a != self.metric])
        nd = 1 + len(dirs)
        K, B, dir_gram = (torch.zeros(*shape, dtype=f64) for shape in ((n, n), (n, nd), (nd, nd)))
        aux = {a: {"b": torch.zeros(n, dtype=f64), "sq_norms": torch.zeros(n, dtype=f64), "y2": 0.0}
               for a in self.aux_metrics}
        poor, coords = 0, 0
        for blk in self.cap.blocks:
            Gp, Gt = buf[:n, blk.start : blk.end], buf[n:, blk.start : blk.end]
            gT = Gt.sum(0) / max(nt, 1)
            diag = {"sgd": None}
            if any(m != "sgd" for m in metrics):
                D, p = adam_diag(blk.param, self.optimizer, groups, Gp, n_bad, k_eff, self.adam_q)
                diag.update(adam=D, adam2=D * D)
                poor, coords = poor + p, coords + D.numel()
            M = diag[self.metric]
            GM = Gp if M is None else Gp * M
            K += (GM @ Gp.T).to(device="cpu", dtype=f64)
            U = torch.stack([gT, *[self._direction(d, blk.param, gT, M) for d in dirs]])
            B += (GM @ U.T).to(device="cpu", dtype=f64)
            dir_gram += ((U if M is None else U * M) @ U.T).to(device="cpu", dtype=f64)
            for a in self.aux_metrics:
                Ma = diag[a]
                sq = (Gp * Gp).sum(1) if Ma is None else (Gp * Gp) @ Ma
                ga = gT if Ma is None else gT * Ma
                aux[a]["b"] += (Gp @ ga).to(device="cpu", dtype=f64)
                aux[a]["sq_norms"] += sq.to(device="cpu", dtype=f64)
                aux[a]["y2"] += float((gT * ga).sum())
        return Scores(K=K, b=B, y2=float(dir_gram[0, 0]), dir_gram=dir_gram, losses=None,
                      target_losses=None, sq_norms=K.diagonal().clone(), finite=finite[:n].clone(),
                      poor_frac=poor / coords if coords else None, aux=aux)

    def _direction(self, name, p, gT, M):
        if name == "momentum":  # u = m (AdamW's exp_avg)
            return state_vec(self.optimizer, p, "exp_avg", gT)
        theta = p.detach().reshape(-1).to(gT)  # "decay": u = M^{-1} theta
        return theta if M is None else theta / M

    # ------------------------------------------------------------------ update
    def apply_update(self, indices, weights) -> None:
        """Add (1/|S|) sum_S w_i g_i into .grad; fallback parameters get a weighted backward."""
        buf = self.cap.buf
        if buf is None:
            raise RuntimeError("apply_update needs a score() first (and only one update per score)")
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64).reshape(-1))
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64).reshape(-1))
        if idx.numel() != w.numel():
            raise ValueError("indices and weights differ in length")
        ok = self._finite[idx]
        if not bool(ok.all()):
            warnings.warn(f"dropping non-finite candidates {idx[~ok].tolist()} from the update")
            idx, w = idx[ok], w[ok]
        try:
            if idx.numel():
                coef = w / idx.numel()
                gsum = coef.to(buf) @ buf[idx.to(buf.device)]
                for blk in self.cap.blocks:
                    p = blk.param
                    g = gsum[blk.start : blk.end].view_as(p).to(p.dtype)
                    p.grad = g.clone() if p.grad is None else p.grad.add_(g)
                if self.cap.fallback:
                    self._fallback_backward(idx, coef)
        finally:
            self._free()

    def _fallback_backward(self, idx, coef) -> None:
        """Weighted backward over the selected rows for the parameters not captured."""
        mb = self.micro_batch_size or idx.numel()
        params = self.cap.fallback
        with torch.enable_grad(), requires_grad(self.cap.captured, False):
            for s in range(0, idx.numel(), mb):
                sub = take_rows(self._pool, idx[s : s + mb].to(self._pool["input_ids"].device))
                losses = sequence_losses(self.model, sub, self.loss_chunk_tokens).losses
                total = (losses * coef[s : s + mb].to(losses)).sum()
                if total.requires_grad:
                    torch.autograd.backward(total, inputs=params)

    def _free(self) -> None:
        self.cap.buf, self._pool = None, None

    def close(self) -> None:
        """Remove the hooks; the engine is unusable afterwards."""
        self._free()
        self.cap.close()
