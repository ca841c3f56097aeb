"""The online loop. One step: pool, gradients, geometry, select, update, log.

Every random stream is a pure function of (seed, name, step) (see fwsel.rng), so arms see
identical pools and target batches, evaluation touches no training RNG, and a run resumes
from the step count alone.
"""

from __future__ import annotations

import collections
import logging
import time

import numpy as np
import torch
from hydra.utils import instantiate

from fwsel.data import build_data
from fwsel.data.collate import Collator
from fwsel.errors import FwselError
from fwsel.evaluate import evaluate
from fwsel import grads
from fwsel.grads.loss import sequence_losses
from fwsel.modeling import build_model, resolve_device
from fwsel.rng import int_seed, np_rng, torch_gen
from fwsel.schedule import build_optimizer
from fwsel.selectors.base import Pool

log = logging.getLogger("fwsel")


class Exhausted(Exception):
    """The stream ran out before `steps`."""


def pool_size(batch_size: int, budget: float) -> int:
    return max(int(batch_size), int(round(batch_size / budget)))


class Trainer:
    def __init__(self, cfg, writer, tracker, progress=None) -> None:
        self.cfg, self.writer, self.tracker, self.progress = cfg, writer, tracker, progress
        self.device = resolve_device(cfg.device)
        self.k, self.N, self.v = int(cfg.batch_size), pool_size(cfg.batch_size, cfg.budget), int(cfg.target.batch_size)
        self.steps, self.seed = int(cfg.steps), int(cfg.seed)
        self.data = build_data(cfg)
        self.selector = instantiate(cfg.selector, _convert_="all")
        self.model, self.tokenizer = build_model(cfg, self.device)
        self.collate = Collator(self.tokenizer, self._max_len())
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = build_optimizer(cfg.optim, self.params, self.steps)
        self.engine = None  # built on the first step that needs gradients
        self.step = 0
        self.totals = collections.Counter()
        torch.manual_seed(int_seed(self.seed, "dropout"))  # the only consumer of the global RNG

    def _max_len(self) -> int:
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        return min(int(self.cfg.data.max_len), int(limit or self.cfg.data.max_len))

    # ---- per-step inputs: pure functions of (seed, t) ----
    def target_rows(self, t: int) -> list[dict]:
        sel = self.data.select
        idx = np_rng(self.seed, "target", t).choice(len(sel), self.v, replace=self.v > len(sel))
        return [sel[i] for i in idx]

    def batch(self, rows: list[dict]) -> dict:
        return {k: v.to(self.device) for k, v in self.collate(rows).items()}

    def get_engine(self) -> "grads.GradEngine":
        if self.engine is None:
            self.engine = grads.GradEngine(self.model, self.optimizer, metric=self.selector.metric,
                                     loss_chunk_tokens=int(self.cfg.loss_chunk_tokens),
                                     micro_batch_size=self.cfg.micro_batch_size,
                                     grad_path=self.cfg.get("grad_path", "auto"),
                                     **dict(self.selector.engine_kwargs))
        return self.engine

    # ---- one step ----
    def train_step(self, t: int) -> dict:
        t0 = time.perf_counter()
        rows = self.data.stream.pool(t, self.N)  # pool
        if len(rows) < self.N:
            raise Exhausted(f"the stream ran out at step {t} ({len(rows)} of {self.N} pool rows left)")
        lr = self.optimizer.param_groups[0]["lr"]
        need = self.selector.needs(t)
        scores = losses = None
        if need == "grads":  # gradients and geometry: one forward + one backward over pool + target
            scores = self.get_engine().score(self.batch(rows), self.batch(self.target_rows(t)),
                                             extra_dirs=self.selector.extra_dirs(t), k=self.k)
        elif need == "losses":
            with torch.no_grad():
                losses = sequence_losses(self.model, self.batch(rows), int(self.cfg.loss_chunk_tokens)).losses
        sel = self.selector.select(Pool(rows, self.k, t, lr, torch_gen(self.seed, "selector", t),
                                        scores=scores, losses=losses, optimizer=self.optimizer))  # select
        idx = list(sel.indices)
        if not idx:
            raise FwselError(f"selector {self.selector.name} selected no rows at step {t}")
        w = np.asarray(sel.weights, dtype=np.float64)
        w = w * (len(w) / w.sum())  # mean 1 over the chosen rows
        t_sel = time.perf_counter() - t0
        chosen = self.batch([rows[i] for i in idx])
        if need == "grads":  # update from the kept per-sample gradients
            self.engine.apply_update(idx, w)
            train_loss = float((scores.losses[idx].double().cpu().numpy() * w).mean())
        else:
            out = sequence_losses(self.model, chosen, int(self.cfg.loss_chunk_tokens))
            loss = (out.losses * torch.as_tensor(w, dtype=out.losses.dtype, device=self.device)).mean()
            loss.backward()
            train_loss = float(loss.detach())
        if self.cfg.optim.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, float(self.cfg.optim.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = t + 1

        self.totals["examples_trained"] += len(idx)  # log
        self.totals["tokens_trained"] += int((chosen["labels"][:, 1:] != -100).sum())
        srcs, wsum = collections.Counter(), collections.defaultdict(float)
        for i, wi in zip(idx, w):
            srcs[rows[i]["source"]] += 1
            wsum[rows[i]["source"]] += float(wi)
        self.writer.log_selection(t + 1, [rows[i]["id"] for i in idx], w)
        row = {"step": t + 1, "examples_seen": (t + 1) * self.N,
               "examples_trained": self.totals["examples_trained"],
               "tokens_trained": self.totals["tokens_trained"], "lr": lr, "train_loss": train_loss,
               "sec_step": time.perf_counter() - t0, "sec_select": t_sel,
               "selected_per_source": dict(srcs), "weight_per_source": dict(wsum)}
        row.update({f"sel_{k}": v for k, v in sel.diagnostics.items()})
        return row

    def eval_row(self) -> dict:
        return evaluate(self.model, self.collate, self.data.eval, self.device, int(self.cfg.loss_chunk_tokens))

    def run(self) -> dict:
        cfg = self.cfg
        log.info("pool N=%d, k=%d, target batch v=%d, effective budget k/N=%.4f, stream rows to consume=%d",
                 self.N, self.k, self.v, self.k / self.N, self.steps * self.N)
        size = getattr(self.data.stream, "known_size", None)
        if size is not None and size < self.steps * self.N:
            log.warning("the stream holds %d rows, fewer than steps x N = %d: training stops when it runs out",
                        size, self.steps * self.N)
        if self.step == 0:
            first = {"step": 0, "examples_seen": 0, "examples_trained": 0, "tokens_trained": 0, "lr": None,
                     "train_loss": None, "sec_step": None, "sec_select": None,
                     "selected_per_source": None, "weight_per_source": None, **self.eval_row()}
            self.writer.log_metrics(first)
            self.tracker.log(first, 0)
            self.writer.update_summary(target_eval_loss_initial=first["target_eval_loss"])
        status = "ok"
        for t in range(self.step, self.steps):
            try:
                row = self.train_step(t)
            except Exhausted as e:
                log.warning("%s: stopping", e)
                status = "exhausted"
                break
            if (t + 1) % int(cfg.eval_every) == 0 or t + 1 == self.steps:
                row.update(self.eval_row())
                log.info("step %d  train_loss %.4f  target_eval_loss %.4f  acc %.3f", t + 1,
                         row["train_loss"], row["target_eval_loss"], row["target_eval_acc"])
            self.writer.log_metrics(row)
            self.tracker.log(row, t + 1)
            self.writer.update_summary(steps_done=t + 1)
            if self.progress is not None:
                self.progress(t + 1, row)
        final = self.eval_row() if status == "exhausted" else {}
        return {"status": status, **final}

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
