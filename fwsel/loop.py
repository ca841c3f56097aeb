"""The online loop. One step (`Trainer.train_step`), phase by phase: `pool_rows` (the pool),
`score` (gradients and geometry: the engine's products, or losses), the selector's `select`,
`update` (form the weighted update, clip, step; or `_skip`), `log_row` (totals and metrics).

Every random stream is a pure function of (seed, name, step) (see fwsel.rng), so arms see
identical pools and target batches and evaluation touches no training RNG; what a resume
needs beyond the step count (weights, optimizer, dropout RNG, totals) is in fwsel.checkpoint.
A candidate with a non-finite loss or gradient never trains; a step whose update is not
finite is skipped (no optimizer or scheduler step), `max_bad_steps` of them in a row abort.
Under torchrun (fwsel.distributed) every rank runs this same loop on the same pools: forward
and backward passes are sharded across ranks, and what they produce is gathered or summed
so every rank takes the same decisions and rank 0 logs what one process would.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import time
from dataclasses import replace

import numpy as np
import torch

from fwsel import distributed, fidelity, grads
from fwsel.config import build_selector
from fwsel.data import build_data, total_steps
from fwsel.data.collate import Collator
from fwsel.errors import ConfigError, FwselError
from fwsel.evaluate import evaluate, samples
from fwsel.grads.dist import build_engine
from fwsel.grads.loss import sequence_losses
from fwsel.grads.prefilter import head_alignment
from fwsel.modeling import build_model
from fwsel.rng import int_seed, np_rng, torch_gen
from fwsel.schedule import build_optimizer
from fwsel.selectors.adam_step import CLIP_EPS, clip_factor
from fwsel.selectors.base import Needs, Pool, Product
from fwsel.steps import SUMMARY_TOTALS, Scored, StepRow, Update

log = logging.getLogger("fwsel")


class Exhausted(Exception):
    """The stream ran out before `steps`."""


class NonFiniteError(FwselError):
    """Too many steps in a row without a finite update (max_bad_steps)."""


LARGE_POOL = 1024  # pools above this many rows get a warning: every row is scored every step


def pool_size(batch_size: int, budget: float) -> int:
    return max(int(batch_size), int(round(batch_size / budget)))


def usable(positions, weights, ok, labels=None) -> tuple[list[int], np.ndarray]:
    """The picks whose `ok[position]` holds, weights rescaled to mean 1 over them.

    Returns `labels[position]` (default: the positions themselves) for the kept picks.
    """
    w = np.asarray(weights, dtype=np.float64)
    keep = [j for j, i in enumerate(positions) if ok[i]]
    labels = positions if labels is None else labels
    idx, w = [int(labels[j]) for j in keep], w[keep]
    return idx, (w * (len(w) / w.sum()) if len(w) else w)


def n_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def grad_norm(params) -> float:
    """Global L2 norm of the formed update (inf/nan when any entry is non-finite)."""
    gs = [p.grad for p in params if p.grad is not None]
    if not gs:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g).float() for g in gs])))


def clip_update(params, norm: float, max_norm) -> float:
    """Scale the formed update as `torch.nn.utils.clip_grad_norm_` does, with its (finite) total
    norm already known: one norm pass per step, not two. Returns the factor (1: did not bind).

    Per-tensor `mul_` by a Python float: the exactly rounded product in every dtype
    (`clip_grads_with_norm_` would round the factor to bf16 first on bf16 gradients).
    """
    coef = clip_factor(norm, max_norm, CLIP_EPS)
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    return coef


class Trainer:
    def __init__(self, cfg, writer, tracker, progress=None, checkpoints=None) -> None:
        self.cfg, self.writer, self.tracker, self.progress = cfg, writer, tracker, progress
        self.checkpoints = checkpoints  # a fwsel.checkpoint.Checkpointer, or None (no checkpoints)
        self.max_bad_steps = int(cfg.get("max_bad_steps", 5))
        self.bad_reason = ""
        self.comm = distributed.comm()
        self.device = self.comm.device(cfg.device)
        self.k, self.N, self.v = int(cfg.batch_size), pool_size(cfg.batch_size, cfg.budget), int(cfg.target.batch_size)
        self.seed = int(cfg.seed)
        if self.N < self.comm.world:
            raise FwselError(f"the pool (N={self.N}) is smaller than the number of ranks ({self.comm.world})")
        self.data = build_data(cfg)
        self.steps = total_steps(cfg.steps, self.data.stream, self.N)  # steps=null: the data's epochs
        self.selector = build_selector(cfg.selector)
        self.selector.fidelity = bool(cfg.get("diagnostics", {}).get("fidelity", False))
        self.model, self.tokenizer = build_model(cfg, self.device)
        self.comm.broadcast_module(self.model)  # every rank starts from rank 0's weights, as DDP would
        self.collate = Collator(self.tokenizer, self._max_len())
        self.data.attach(self.collate)  # drops rows with no supervised token left after truncation
        self._target_enc: dict = {}  # select-split position -> (ids, labels) (see `target_batch`)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = build_optimizer(cfg.optim, self.params, self.steps)
        self.engine = None  # built on the first step that needs gradients
        self.step = 0
        self.totals = collections.Counter()
        rank = [self.comm.rank] if self.comm.rank else []  # each rank's rows get their own dropout masks
        torch.manual_seed(int_seed(self.seed, "dropout", *rank))  # the only consumer of the global RNG

    def _max_len(self) -> int:
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        return min(int(self.cfg.data.max_len), int(limit or self.cfg.data.max_len))

    # ---- per-step inputs: pure functions of (seed, t) ----
    def target_idx(self, t: int) -> np.ndarray:
        """Positions in the `select` split of step t's target rows."""
        n = len(self.data.select)
        return np_rng(self.seed, "target", t).choice(n, self.v, replace=self.v > n)

    def target_rows(self, t: int) -> list[dict]:
        return [self.data.select[i] for i in self.target_idx(t)]

    def target_batch(self, t: int) -> dict:
        """The collated target rows of step t. The `select` split is fixed, so each of its rows is
        tokenised once (a target batch is re-drawn from it every step)."""
        enc = []
        for i in self.target_idx(t).tolist():
            if i not in self._target_enc:
                self._target_enc[i] = self.collate.encode(self.data.select[i])[:2]
            enc.append(self._target_enc[i])
        return {k: v.to(self.device) for k, v in self.collate.pad(enc).items()}

    def batch(self, rows: list[dict]) -> dict:
        return {k: v.to(self.device) for k, v in self.collate(rows).items()}

    def get_engine(self) -> "grads.GradEngine":
        """Built on the first step that needs gradients, from the `engine:` group and what the
        selector reads (every product under diagnostics.fidelity: the predictions read K)."""
        if self.engine is None:
            needs = self.selector.engine_needs
            if self.selector.fidelity:
                needs = replace(needs, products=Product.all())
            try:
                self.engine = build_engine(self.cfg.engine, needs, self.model, self.optimizer, comm=self.comm,
                                           projection_seed=int_seed(self.seed, "projection"))
            except ValueError as e:  # the model or engine settings do not fit (e.g. a LoRA variant, ghost x ranks)
                raise ConfigError(f"engine: {e}") from None
        return self.engine

    # ---- one step: pool, gradients (score), geometry, select, update, log ----
    def train_step(self, t: int) -> dict:
        t0 = time.perf_counter()
        rows = self.pool_rows(t)
        lr = self.optimizer.param_groups[0]["lr"]
        need = Needs(self.selector.needs(t))
        rows = self.shortlist(t, rows, need)  # selector.prefilter_keep: a cheap first stage
        sc = self.score(t, rows, need)  # gradients and geometry (the engine), or losses
        pool = Pool(rows, self.k, t, lr, torch_gen(self.seed, "selector", t), scores=sc.scores, losses=sc.losses,
                    optimizer=self.optimizer, engine=self.engine if sc.scores is not None else None,
                    clip_prev=self.totals.get("clip_prev", 1.0), max_norm=self.cfg.optim.max_grad_norm)
        sel = self.comm.broadcast_object(self.selector.select(pool))  # rank 0's, should rounding differ
        t_sel = time.perf_counter() - t0
        up = self.update(t, need, pool, sc, sel)
        self.step = t + 1
        return self.log_row(t, rows, sel, up, lr, t0, t_sel)

    def pool_rows(self, t: int) -> list[dict]:
        rows = self.data.stream.pool(t, self.N)
        if len(rows) < self.N:
            raise Exhausted(f"the stream ran out at step {t} ({len(rows)} of {self.N} pool rows left)")
        return rows

    def shortlist(self, t: int, rows: list[dict], need: Needs) -> list[dict]:
        """With `selector.prefilter_keep` (a fraction), a gradient selector sees only that share of
        the pool (at least k rows, pool order kept): the rows whose output-head gradient aligns best
        with the target's, from one no-grad forward (fwsel.grads.prefilter)."""
        keep = self.cfg.selector.get("prefilter_keep")
        m = self.N if keep is None else max(self.k, round(float(keep) * self.N))
        if need is not Needs.GRADS or m >= self.N:
            return rows
        a = head_alignment(self.model, self.batch(rows), self.target_batch(t),
                           int(self.cfg.engine.loss_chunk_tokens))
        a = torch.where(torch.isfinite(a), a, torch.tensor(-math.inf, dtype=a.dtype))
        top = torch.argsort(a, descending=True, stable=True)[:m]
        return [rows[i] for i in sorted(top.tolist())]

    def score(self, t: int, rows: list[dict], need: Needs) -> Scored:
        """Gradients: one forward + one backward over pool + target (the engine's Scores); losses:
        a no-grad forward over the pool; none: nothing (every row counts as finite)."""
        if need is Needs.GRADS:
            target = self.target_batch(t)
            q_scale = self.totals.get("clip_prev", 1.0) ** 2 if self.selector.engine_needs.clip_q else 1.0
            scores = self.get_engine().score(self.batch(rows), target, extra_dirs=self.selector.extra_dirs(t), k=self.k,
                                             q_scale=q_scale)
            return Scored(target, scores, finite=scores.finite.cpu().numpy().astype(bool))
        if need is Needs.LOSSES:
            with torch.no_grad():
                losses = self.shard_losses(self.batch(rows))[1]
            return Scored(losses=losses, finite=torch.isfinite(losses).numpy())
        return Scored(finite=np.ones(self.N, dtype=bool))

    def update(self, t: int, need: Needs, pool: Pool, sc: Scored, sel) -> Update:
        """Form the weighted update of the usable picks, clip it, step; or skip the step."""
        picked, w = usable(sel.indices, sel.weights, sc.finite)  # a non-finite candidate never trains
        idx, w, train_loss, tokens = self.form_update(need, pool.rows, sc.scores, picked, w)
        up = Update(idx, w, train_loss, tokens, norm=grad_norm(self.params),
                    nonfinite=int((~sc.finite).sum()) + len(picked) - len(idx))
        if idx and math.isfinite(up.norm):
            clip = clip_update(self.params, up.norm, self.cfg.optim.max_grad_norm)
            self.totals["clip_prev"] = clip  # ftw clip_q=prev reads it next step (checkpointed with the totals)
            if self.selector.fidelity and sc.scores is not None:  # diagnostics.fidelity: predicted ...
                up.fid = self.selector.predict_change(pool, idx, w, clip)
            self.optimizer.step()
            self.scheduler.step()
            self.totals["bad_in_a_row"] = 0
            if up.fid:  # ... and measured target-loss change (one extra no-grad forward)
                up.fid["fid_meas"] = fidelity.measured_change(self.model, sc.target, sc.scores.target_losses,
                                                              int(self.cfg.engine.loss_chunk_tokens))
                self.selector.observe(up.fid)
        elif not len(sel.indices) and bool(sc.finite.any()):  # e.g. ftw empty_support=skip: no row helps
            self._skip(t, up, f"{self.selector.name} chose no row (empty support)", counts_as_bad=False)
        else:
            self._skip(t, up, f"the update gradient norm is {up.norm}" if idx else
                       f"no selected candidate has a finite loss and gradient ({up.nonfinite} non-finite)",
                       counts_as_bad=True)
        self.optimizer.zero_grad(set_to_none=True)
        return up

    def _skip(self, t: int, up: Update, reason: str, counts_as_bad: bool) -> None:
        """No optimizer or scheduler step; the next step sees the next pool. A bad step (no
        finite update) counts towards max_bad_steps; a declined one (a choice) never aborts."""
        self.totals["skipped_steps"] += 1
        if counts_as_bad:
            self.bad_reason = reason
            self.totals["bad_in_a_row"] += 1
            log.warning("step %d skipped: %s", t + 1, reason)
        else:
            log.info("step %d: %s: no update", t + 1, reason)
        up.idx, up.w, up.train_loss, up.tokens = [], np.zeros(0), None, 0

    def log_row(self, t: int, rows: list[dict], sel, up: Update, lr: float, t0: float, t_sel: float) -> dict:
        """Update the run totals, write the selection, and return the step's metrics row."""
        self.totals["examples_trained"] += len(up.idx)
        self.totals["tokens_trained"] += up.tokens
        self.totals["nonfinite_rows"] += up.nonfinite
        if up.nonfinite:
            log.warning("step %d: dropped %d candidate(s) with a non-finite loss or gradient", t + 1, up.nonfinite)
        srcs, wsum = collections.Counter(), collections.defaultdict(float)
        for i, wi in zip(up.idx, up.w):
            srcs[rows[i]["source"]] += 1
            wsum[rows[i]["source"]] += float(wi)
        self.writer.log_selection(t + 1, [rows[i]["id"] for i in up.idx], up.w)
        row = vars(StepRow(step=t + 1, examples_seen=(t + 1) * self.N, examples_trained=self.totals["examples_trained"],
                           tokens_trained=self.totals["tokens_trained"], lr=lr, train_loss=up.train_loss,
                           grad_norm=up.norm, nonfinite_rows=up.nonfinite, skipped_steps=self.totals["skipped_steps"],
                           sec_step=time.perf_counter() - t0, sec_select=t_sel, selected_per_source=dict(srcs),
                           weight_per_source=dict(wsum)))
        row.update({f"sel_{k}": v for k, v in sel.diagnostics.items()})
        row.update(up.fid)
        row.update(self.data.counts())  # data_skipped / data_unsupervised / data_truncated (file and hf streams)
        return row

    def form_update(self, need: Needs, rows: list[dict], scores, idx: list[int], w: np.ndarray):
        """Write the weighted update of rows `idx` into .grad; returns (idx, w, train_loss, tokens).

        Selectors that score nothing meet a row's loss here first: a non-finite row is dropped
        and the forward redone without it (one NaN row poisons every weight gradient of the batch).
        """
        if not idx:
            return idx, w, None, 0
        if need is Needs.GRADS:  # from the kept per-sample gradients
            self.engine.apply_update(idx, w)
            loss = float((scores.losses[idx].double().cpu().numpy() * w).mean())
            return idx, w, loss, int(scores.n_tokens[idx].sum())
        chosen = self.batch([rows[i] for i in idx])
        with self.comm.reduce_grads(self.params):  # each rank backprops its shard of the chosen rows
            out, losses = self.shard_losses(chosen)
            ok = torch.isfinite(losses).numpy()
            if not ok.all():
                idx, w = usable(list(range(len(idx))), w, ok, idx)
                if idx:
                    chosen = self.batch([rows[i] for i in idx])
                    out, losses = self.shard_losses(chosen)
            if idx and out is not None:
                coef = torch.as_tensor(w[self.comm.shard(len(idx))] / len(idx), dtype=out.losses.dtype,
                                       device=self.device)
                (out.losses * coef).sum().backward()
        if not idx:
            return idx, w, None, 0
        return idx, w, float((losses.numpy() * w).mean()), n_tokens(chosen)

    def shard_losses(self, batch: dict):
        """(LossOut of this rank's shard of `batch`, or None when it has no rows; every row's loss
        as float64 on the CPU, gathered from all ranks)."""
        n = batch["input_ids"].shape[0]
        part = self.comm.shard(n)
        out = None
        if part.stop > part.start:
            out = sequence_losses(self.model, {k: v[part] for k, v in batch.items()},
                                  int(self.cfg.engine.loss_chunk_tokens))
        mine = out.losses.detach().double().cpu() if out is not None else torch.zeros(0, dtype=torch.float64)
        return out, self.comm.gather_rows(mine, n)

    def eval_row(self) -> dict:
        row = evaluate(self.model, self.collate, self.data.eval, self.device, int(self.cfg.engine.loss_chunk_tokens),
                       comm=self.comm)
        n = int(self.cfg.get("eval_samples", 0) or 0)
        if n and self.comm.is_main:  # a few greedy completions to read (no RNG drawn, no collective)
            row["samples"] = samples(self.model, self.collate, self.data.eval, self.device, n)
        return row

    def save_checkpoint(self) -> None:
        """Every rank joins (their RNG states go into rank 0's checkpoint); rank 0 writes."""
        if self.checkpoints is None:
            return
        if self.comm.active:
            from fwsel.checkpoint import rng_state

            self.rank_rng = self.comm.all_gather_object(rng_state())
        self.checkpoints.save(self)

    def run(self, stop=None) -> dict:
        """Steps from `self.step` to `steps`; `stop` (a checkpoint.StopFlag) ends it after a step."""
        cfg = self.cfg
        log.info("pool N=%d, k=%d, target batch v=%d, effective budget k/N=%.4f, stream rows to consume=%d; "
                 "target rows: %d select, %d eval", self.N, self.k, self.v, self.k / self.N, self.steps * self.N,
                 len(self.data.select), len(self.data.eval))
        self.writer.update_summary(target_select_rows=len(self.data.select), target_eval_rows=len(self.data.eval))
        if self.N > LARGE_POOL and self.selector.needs(self.step) is not Needs.NONE:
            log.warning("budget %g makes a pool of N=%d rows, each scored every step: a step costs about N/k = %.0fx "
                        "a plain one (raise budget or lower batch_size for quicker steps)",
                        self.k / self.N, self.N, self.N / self.k)
        size = getattr(self.data.stream, "known_size", None)
        if size is not None and size < self.steps * self.N:
            log.warning("the stream holds %d rows, fewer than steps x N = %d: training stops when it runs out "
                        "(status exhausted; raise data.epochs to read it again, or set steps=null)",
                        size, self.steps * self.N)
        if self.step == 0:
            first = {**vars(StepRow(step=0)), **self.eval_row()}
            self.writer.log_metrics(first)
            self.tracker.log(first, 0)
            self.writer.update_summary(target_eval_loss_initial=first["target_eval_loss"])
            if self.progress is not None:
                self.progress(0, first)
        status = "ok"
        for t in range(self.step, self.steps):
            if self.comm.agree(stop is not None and stop.requested):  # SIGINT/SIGTERM: between steps, all ranks
                status = "interrupted"
                break
            try:
                row = self.train_step(t)
            except Exhausted as e:
                log.warning("%s: stopping", e)
                status = "exhausted"
                break
            if (t + 1) % int(cfg.eval_every) == 0 or t + 1 == self.steps:
                row.update(self.eval_row())  # the progress callback logs it
            self.writer.log_metrics(row)
            self.tracker.log(row, t + 1)
            self.writer.update_summary(steps_done=t + 1)
            if self.progress is not None:
                self.progress(t + 1, row)
            if self.totals["bad_in_a_row"] >= self.max_bad_steps:
                raise NonFiniteError(f"{self.totals['bad_in_a_row']} steps in a row skipped (max_bad_steps), the last "
                                     f"at step {t + 1}: {self.bad_reason}; check the lr, the data and model.dtype")
            if self.checkpoints is not None and self.checkpoints.due(t + 1):
                self.save_checkpoint()
        self.save_checkpoint()  # at the end, also when exhausted or interrupted
        final = {}
        if status == "exhausted" and (self.writer.last_eval or {}).get("step") != self.step:
            final = self.final_eval()
        if self.cfg.get("save_model") and self.comm.is_main:
            from fwsel.hub import save_model

            final["model_dir"] = save_model(self.model, self.tokenizer, os.path.join(self.writer.dir, "model"))
        return {"status": status, **final, **self.counts()}

    def final_eval(self) -> dict:
        """Evaluate where the stream ran out; the evaluation joins that step's metrics row."""
        ev = self.eval_row()
        row = self.writer.add_to_last_metrics(ev)
        self.tracker.log(ev, self.step)
        if self.progress is not None:
            self.progress(self.step, {**row, "sec_step": None})  # no ETA: the run is over
        return {k: v for k, v in ev.items() if k.startswith("target_eval_")}

    def counts(self) -> dict:
        """Run totals for summary.json: non-finite rows and skipped steps, and the data stream's counts."""
        return {**{key: self.totals[key] for key in SUMMARY_TOTALS}, **self.data.counts()}

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
