"""`ftw`: Filter-then-Weight in the linearised AdamW geometry (docs/method.md#update-matching, #filter-then-weight).

Filter by OMP with NNLS refits on the scale-free update-matching problem (from `K`, `b`, `y2`
alone), weight by the last refit, normalise to mean 1 with the order-preserving cap, fall back
when the support is empty. Every choice of docs/method.md#options-and-defaults is a constructor key (see
`conf/selector/ftw.yaml`); how gradients are computed (exact or sketched) is the `engine:` group's.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from fwsel.selectors.adam_step import CLIP_EPS, AdamRegram, clip_factor, clipped_step
from fwsel.selectors.base import (
    EngineNeeds,
    Needs,
    Pool,
    Product,
    Selection,
    Selector,
    as_np,
    candidates,
    choice,
    topk,
    uniform,
)
from fwsel.selectors.omp import nnls_gram, omp, prune_small, ridge_lambda, ridged
from fwsel.selectors.scoring import greedy_interaction, less_scores
from fwsel.selectors.weights import normalise_and_cap

log = logging.getLogger("fwsel")
FALLBACK_NONE, FALLBACK_TOPK, FALLBACK_SKIP = 0, 1, 2  # `sel_fallback` codes
STOPS = ("k", "tol", "gain", "w_min", "max_iter")  # `sel_omp_stop` codes: why OMP stopped


def adam_constants(optimizer) -> tuple[float, float, int]:
    """(beta1, weight decay, steps taken) of an AdamW-like optimizer, for the drift terms."""
    if optimizer is None:
        raise ValueError("selector.momentum_correction needs the optimizer in the pool")
    groups = optimizer.param_groups
    b1, lam = float(groups[0]["betas"][0]), float(groups[0]["weight_decay"])
    if any(float(g["betas"][0]) != b1 or float(g["weight_decay"]) != lam for g in groups):
        raise ValueError("selector.momentum_correction needs one beta1 and weight decay for all groups")
    steps = [int(st["step"]) for st in optimizer.state.values() if "step" in st]
    return b1, lam, max(steps, default=0)


def explained_and_scale(K, b, y2: float, S: list[int], w: np.ndarray) -> tuple[float, float]:
    """For the applied direction `sum_S w_i g_i`: the explained fraction at its best scale
    `t >= 0` (`1 - residual / y2` = the squared cosine with the target) and `alpha* = t sum(w)`
    (for NNLS weights, the `sum(u)` of the refit up to the ridge)."""
    if not S or y2 <= 0:
        return 0.0, 0.0
    bw = float(b[S] @ w)
    wkw = float(w @ K[np.ix_(S, S)] @ w)
    if bw <= 0 or wkw <= 0:
        return 0.0, 0.0
    return min(bw * bw / (wkw * y2), 1.0), bw / wkw * float(w.sum())


def overlap(S: list[int], other: list[int]) -> float:
    """Fraction of the selection that `other` also holds."""
    return len(set(S) & set(other)) / len(S) if S else 0.0


class FTW(Selector):
    def __init__(
        self,
        name: str,
        geometry: str = "adam",
        filter: str = "omp",
        weights: str = "nnls",
        metric: str = "D",
        adam_q: str = "pool",
        momentum_correction: bool = False,
        alpha: float = 1.0,
        fill: str = "none",
        w_max: float = 5.0,
        ridge: float = 1e-3,
        ridge_mode: str = "pool",
        omp_tol: float = 1e-3,
        min_gain: float = 0.0,
        w_min: float = 0.0,
        temper: float = 1.0,
        redundancy: float | None = None,
        clip_q: str = "prev",
        self_q: int = 0,
        objective: str = "match",
        entry: str = "cosine",
        alpha_fit: bool = False,
        empty_support: str = "topk",
        warmup_steps: int = 0,
        log_overlap_less: bool = False,
        **kw: Any,
    ) -> None:
        super().__init__(name=name, **kw)
        self.name = name
        self.geometry = choice("geometry", geometry, ("adam", "sgd"))
        self.filter = choice("filter", filter, ("omp", "greedy", "topk"))
        self.weights = choice("weights", weights, ("nnls", "uniform"))
        self.metric_key = choice("metric", metric, ("D", "D2"))
        self.adam_q = choice("adam_q", adam_q, ("pool", "state", "taylor"))
        self.fill = choice("fill", fill, ("none", "alignment"))
        self.ridge_mode = choice("ridge_mode", ridge_mode, ("pool", "self"))
        self.clip_q = choice("clip_q", clip_q, ("none", "prev", "fixed_point"))
        self.self_q = int(choice("self_q", self_q, (0, 1, 2)))
        self.objective = choice("objective", objective, ("match", "step"))
        self.entry = choice("entry", entry, ("cosine", "raw"))
        if self.objective == "step" and filter != "omp":
            raise ValueError("selector.objective=step solves the matching problem with filter=omp")
        pool_D = geometry == "adam" and metric == "D" and adam_q == "pool" and not momentum_correction
        if (self.self_q or self.objective == "step") and not pool_D:
            raise ValueError(
                "selector.self_q / objective=step re-form the adam metric D with adam_q=pool "
                "(geometry=adam, metric=D, no momentum_correction)"
            )
        if not pool_D:  # clip_q (a default) models q_pool's clipping: nothing to scale in other geometries
            self.clip_q = "none"
        self.empty_support = choice("empty_support", empty_support, ("topk", "skip"))
        self.momentum_correction = bool(momentum_correction)
        for key, val, lo in (
            ("alpha", alpha, 0.0),
            ("w_max", w_max, 1.0),  # mean 1 needs room above 1
            ("ridge", ridge, 0.0),
            ("omp_tol", omp_tol, 0.0),
            ("min_gain", min_gain, 0.0),
            ("w_min", w_min, 0.0),
            ("warmup_steps", warmup_steps, 0.0),
        ):
            if not isinstance(val, (int, float)) or not (val > lo if key == "alpha" else val >= lo):
                raise ValueError(f"selector.{key} must be a number {'>' if key == 'alpha' else '>='} {lo}, got {val!r}")
        if self.momentum_correction and (geometry != "adam" or metric != "D"):
            raise ValueError(
                "selector.momentum_correction needs geometry=adam and metric=D "
                "(the drift target holds D^-1 theta, the engine's decay direction for M = D)"
            )
        if not (isinstance(temper, (int, float)) and 0 < temper <= 1):
            raise ValueError(f"selector.temper must be in (0, 1], got {temper!r}")
        if redundancy is not None and not (isinstance(redundancy, (int, float)) and redundancy >= 0):
            raise ValueError(f"selector.redundancy must be null or a number >= 0, got {redundancy!r}")
        if redundancy is not None and filter != "greedy":
            raise ValueError("selector.redundancy sets the scale of filter=greedy's gain (set filter=greedy)")
        self.alpha, self.w_max, self.ridge, self.omp_tol = float(alpha), float(w_max), float(ridge), float(omp_tol)
        self.min_gain, self.w_min, self.temper = float(min_gain), float(w_min), float(temper)
        self.redundancy = None if redundancy is None else float(redundancy)
        self.alpha_fit = bool(alpha_fit)
        self._warned_plain = False
        self._fit = np.zeros(2)  # running sums of (measured - first order) * Q and Q^2 (alpha_fit)
        self._pending: tuple[float, float] | None = None  # this step's (first order, Q)
        self.warmup_steps = int(warmup_steps)
        m = "sgd" if geometry == "sgd" else ("adam" if metric == "D" else "adam2")
        aux = ("adam2",) if log_overlap_less and m != "adam2" else ()  # a diagnostic: one more metric per step
        self.engine_needs = EngineNeeds(
            m, Product.B | Product.K | Product.Y2, aux_metrics=aux, adam_q=self.adam_q if m != "sgd" or aux else "pool",
            clip_q=self.clip_q == "prev",  # the engine scales pool q by the previous clip factor: no second Gram
        )
        self.log_overlap_less = bool(log_overlap_less)

    def needs(self, step: int) -> Needs:
        return Needs.NONE if step < self.warmup_steps else Needs.GRADS

    def extra_dirs(self, step: int) -> tuple:
        drift = self.momentum_correction or (self.fidelity and self.metric == "adam")
        return ("momentum", "decay") if drift else ()

    def predict_change(self, pool, indices, weights, clip):
        """The linearised AdamW quadratic and its first-order part (fwsel.fidelity); SGD first
        order for geometry=sgd; nothing for metric=D2 (no curvature model) or warm-up steps."""
        from fwsel.fidelity import adam_quadratic, sgd_first_order

        if pool.scores is None or self.metric == "adam2":
            return {}
        u = clip * np.asarray(weights, dtype=np.float64) / len(indices)
        if self.metric == "sgd":
            return {"fid_pred": sgd_first_order(pool.scores, indices, u, pool.lr)}
        b1, lam, t = adam_constants(pool.optimizer)
        c, beta = (1 - b1) / (1 - b1 ** (t + 1)), b1 / (1 - b1 ** (t + 1))
        args = (pool.scores, indices, u, pool.lr * c, [beta / c, lam / c])
        pred, lin = adam_quadratic(*args, curvature=self.alpha), adam_quadratic(*args, curvature=0.0)
        self._pending = (lin, (pred - lin) / self.alpha)  # prediction = first order + alpha * Q
        return {"fid_pred": pred, "fid_pred_linear": lin}

    def observe(self, fid) -> None:
        """`alpha_fit`: a running least-squares fit of measured = first order + alpha Q (half-life
        ~35 steps), the curvature scale the run actually has."""
        meas, pending, self._pending = fid.get("fid_meas"), self._pending, None
        if self.alpha_fit and meas is not None and pending is not None and np.isfinite(meas):
            lin, q = pending
            self._fit = 0.98 * self._fit + np.array([(meas - lin) * q, q * q])

    def state_dict(self) -> dict:
        return {"fit": self._fit.tolist()}  # alpha_fit's running sums: a resume continues the fit

    def load_state_dict(self, state: dict) -> None:
        if "fit" in state:
            self._fit = np.asarray(state["fit"], dtype=np.float64)

    def current_alpha(self) -> float:
        """`alpha`, or with `alpha_fit` the fitted curvature scale (clamped to [0.01, 100]; `alpha`
        until a fit exists)."""
        if not self.alpha_fit:
            return self.alpha
        if not self.fidelity:
            raise ValueError("selector.alpha_fit fits alpha to measured changes: it needs diagnostics.fidelity=true")
        return float(np.clip(self._fit[0] / self._fit[1], 1e-2, 1e2)) if self._fit[1] > 0 else self.alpha

    def problem(self, pool: Pool) -> tuple[np.ndarray, np.ndarray, float]:
        """`(K, b, y2)`; with `momentum_correction` the target is
        `g_T/alpha - b1/(1-b1) m - lam (1-b1^(t+1))/(1-b1) D^-1 theta` (docs/method.md#update-matching)."""
        s = pool.scores
        K, B = as_np(s.K), as_np(s.b).reshape(len(s.K), -1)
        if not self.momentum_correction:
            return K, B[:, 0], float(s.y2)
        b1, lam, t = adam_constants(pool.optimizer)
        coef = np.array([1.0 / self.current_alpha(), -b1 / (1 - b1), -lam * (1 - b1 ** (t + 1)) / (1 - b1)])
        return K, B @ coef, float(coef @ as_np(s.dir_gram) @ coef)

    def filter_and_weight(self, K, b, y2, k, valid) -> tuple[list[int], np.ndarray, dict]:
        """Stage 1 and 2 before normalisation: the support and its (unnormalised) weights."""
        lam = ridge_lambda(K, self.ridge, self.ridge_mode)
        info: dict[str, float] = {}
        if self.filter == "omp":
            res = omp(K, b, y2, k, lam, self.omp_tol, valid, min_gain=self.min_gain, w_min=self.w_min, entry=self.entry)
            S, u = res.support, res.u
            info["omp_iters"] = float(res.iters)
            info["omp_stop"] = float(STOPS.index(res.stop))
        else:
            if self.filter == "greedy":  # gain b_i - (alpha/k)(K_ii/2 + sum_{j in S} K_ij)
                c = self.greedy_scale(K, b, k, valid)
                S = greedy_interaction(b - 0.5 * c * np.diag(K), K, k, c, valid)[0]
                info["greedy_scale"] = c
            else:
                S = topk(b, k, valid=valid)
            u = np.ones(len(S))
            if self.weights == "nnls" and S:
                u = nnls_gram(ridged(K, S, lam), b[S])
        if self.weights == "nnls":
            S, u = [i for i, x in zip(S, u) if x > 0], u[u > 0]
            S, u = prune_small(K, b, lam, S, u, self.w_min)
        if self.weights == "uniform":
            u = np.ones(len(S))
        keep = u > 0
        return [i for i, kept in zip(S, keep) if kept], u[keep] ** self.temper, info

    def plain_only(self, pool: Pool) -> bool:
        """`clip_q=fixed_point` alone degrades to the engine's own products where they cannot be
        re-formed (sketched or token-Gram gradients), with one warning; `self_q` and `objective=step`
        refuse. (`clip_q=prev` needs no re-forming: the engine scales pool q while scoring.)"""
        why = AdamRegram.unsupported(getattr(pool, "engine", None))
        if why is None or self.self_q or self.objective == "step":
            return False
        if not self._warned_plain:
            log.warning("selector.clip_q=%s is off for this run (re-forming the products: %s)", self.clip_q, why)
            self._warned_plain = True
        return True

    def step_consistent(self, pool: Pool, problem, valid):
        """Choose in the metric of the step AdamW will take (fwsel.selectors.adam_step): `clip_q=prev`
        scales q by the previous step's squared clip factor; `fixed_point` chooses, takes the chosen
        update's own factor and re-solves once; `self_q` passes re-solve under the chosen update's own
        second moment. Each re-solve is one more Gram."""
        k = pool.k
        rg = AdamRegram(getattr(pool, "engine", None), pool.optimizer, k)
        max_norm = getattr(pool, "max_norm", None)
        K2 = rg.l2_gram() if self.objective == "step" else None
        if K2 is not None and max_norm is None:
            raise ValueError("selector.objective=step models the clipped step: it needs optim.max_grad_norm")

        def solve(K, b, y2):
            if K2 is None:
                return self.filter_and_weight(K, b, y2, k, valid)
            info = {}

            def fit(A):
                S, x, d = self.filter_and_weight(A, b, y2 * self.current_alpha(), k, valid)
                info.update(d)
                return S, x

            S, x, mu = clipped_step(K, K2, b, max_norm, self.current_alpha(), fit)
            info["step_mu"] = mu
            return S, x, info

        c = float(getattr(pool, "clip_prev", 1.0)) if self.clip_q == "prev" else 1.0  # the engine applied it
        S, u, diag = solve(*problem)
        passes = ["clip"] * (self.clip_q == "fixed_point") + ["self"] * self.self_q
        for kind in passes:
            if not S:
                break
            g_hat = rg.update(S, normalise_and_cap(u, self.w_max)[0])
            if self.clip_q != "none":
                c = clip_factor(float(torch.linalg.vector_norm(g_hat)), max_norm, CLIP_EPS)
            problem = rg.products(c * c * (rg.q_pool if kind == "clip" else g_hat * g_hat))
            S, u, diag = solve(*problem)
        diag["clip_model"] = c
        return S, u, diag, problem

    def greedy_scale(self, K, b, k: int, valid) -> float:
        """`alpha / k` of the greedy gain: fixed (`alpha`), or with `redundancy = r` set each step so
        that on the top-k-by-b set T the predicted penalty `scale/2 1^T K_TT 1` is `r sum_T b_i`
        (scale-free: the same ratio of redundancy to alignment at any gradient scale or LR)."""
        if self.redundancy is None:
            return self.current_alpha() / k
        T = topk(b, k, valid=valid)
        quad = float(K[np.ix_(T, T)].sum()) if T else 0.0
        lin = float(np.clip(b[T], 0, None).sum()) if T else 0.0
        return 2 * self.redundancy * lin / quad if quad > 0 and lin > 0 else 0.0

    def select(self, pool: Pool) -> Selection:
        if pool.step < self.warmup_steps:
            sel = uniform(torch.randperm(len(pool.rows), generator=pool.rng)[: pool.k].tolist())
            sel.diagnostics = {"warmup": 1.0}
            return sel
        s, k = pool.scores, pool.k
        K, b, y2 = self.problem(pool)
        valid = candidates(s)
        align = np.divide(b, np.sqrt(np.diag(K)), out=np.full_like(b, -np.inf), where=valid)
        if self.clip_q != "fixed_point" and not self.self_q and self.objective == "match" or self.plain_only(pool):
            S, u, diag = self.filter_and_weight(K, b, y2, k, valid)
            if self.clip_q == "prev":
                diag["clip_model"] = float(getattr(pool, "clip_prev", 1.0))
        else:
            S, u, diag, (K, b, y2) = self.step_consistent(pool, (K, b, y2), valid)
        diag["n_eff"] = float(len(S))
        fallback = FALLBACK_NONE
        if not S:  # u = 0 is the optimum: no candidate has b_i > 0 (or none is usable)
            fallback = FALLBACK_TOPK if self.empty_support == "topk" else FALLBACK_SKIP
            if fallback == FALLBACK_TOPK:
                S = topk(align, k, valid=valid)
            u = np.ones(len(S))
        w, bound, all_max = normalise_and_cap(u, self.w_max)
        if self.fill == "alignment" and fallback == FALLBACK_NONE and len(S) < k:
            rest = valid.copy()
            rest[S] = False
            extra = topk(align, k - len(S), valid=rest)
            S, w = S + extra, np.concatenate([w, np.ones(len(extra))])
        explained, alpha_star = explained_and_scale(K, b, y2, S, w)
        diag.update(
            explained=explained,
            alpha_star=alpha_star,
            n_selected=float(len(S)),
            cap_bound=float(bound),
            cap_all_wmax=float(all_max),
            fallback=float(fallback),
            overlap_topk=overlap(S, topk(b, k, valid=valid)),
            warmup=0.0,
        )
        if self.alpha_fit:
            diag["alpha_fit"] = self.current_alpha()
        if s.poor_frac is not None:
            diag["poor_frac"] = float(s.poor_frac)
        less = self.less_ranking(s)
        if less is not None:
            diag["overlap_less"] = overlap(S, topk(less, k, valid=valid))
        return Selection([int(i) for i in S], np.asarray(w, dtype=np.float64), diag)

    def less_ranking(self, s) -> np.ndarray | None:
        """`less`'s scores (cosine in the D^2 metric), when this step's Scores carry them."""
        if not self.log_overlap_less:
            return None
        aux = (getattr(s, "aux", None) or {}).get("adam2")
        if aux is not None:
            return less_scores(aux["b"], aux["sq_norms"])
        if self.metric == "adam2":
            return less_scores(s.b[:, 0], s.sq_norms)
        return None
