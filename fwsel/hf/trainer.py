"""`SelectionMixin` and `SelectiveTrainer`: a fwsel selector and the gradient engine inside a
`transformers.Trainer`'s own training step (the package docstring says what a step does)."""

from __future__ import annotations

import collections
import inspect
import json
import os
import warnings
from dataclasses import replace

import numpy as np
import torch
from transformers import Trainer

from fwsel.distributed import Comm
from fwsel.errors import ConfigError
from fwsel.grads.loss import concat_batches, sequence_losses, take_rows
from fwsel.hf.configs import build_selector, engine_config
from fwsel.hf.rows import COLUMNS, ROWS, TENSORS, RowCollator, rows_of, with_ids
from fwsel.loop import usable
from fwsel.outputs import JsonlLog, read_jsonl
from fwsel.rng import int_seed, np_rng, torch_gen
from fwsel.selectors.base import Pool

STATE_FILE = "fwsel_selection.json"


class SelectionMixin:
    """Put first in the bases of any `transformers.Trainer` subclass: `class T(SelectionMixin, SFTTrainer)`.

    `target_dataset`: rows the selector scores against (`target_batch_size` of them, resampled each
    step from (seed, step)); `target_eval_dataset`: rows `evaluate()` reports `eval_target_loss` on
    (also the Trainer's `eval_dataset` when none is given); `selector`: a name of fwsel's selector
    configs (`ftw`, `greats`, `tracin`, `random`, `full`, ...) or a `Selector`; `selector_kwargs`:
    overrides of that config; `budget`: the fraction of each pool trained on; `engine_kwargs`:
    overrides of `conf/engine/default.yaml` (how products are computed: grad_path, projection_dim, ...).
    """

    def __init__(self, *args, target_dataset=None, selector="ftw", selector_kwargs=None, budget: float = 0.25,
                 target_batch_size: int = 8, target_eval_dataset=None, engine_kwargs=None, **kwargs) -> None:
        if not (isinstance(budget, (int, float)) and 0 < budget <= 1):
            raise ConfigError(f"budget must be in (0, 1], got {budget!r}")
        self.selector = build_selector(selector, selector_kwargs)
        self.budget, self.target_batch_size = float(budget), int(target_batch_size)
        self.engine_kwargs = dict(engine_kwargs or {})
        bound = inspect.signature(super().__init__).bind_partial(*args, **kwargs)
        a = bound.arguments
        a["train_dataset"] = with_ids(a.get("train_dataset"))
        if a.get("eval_dataset") is None and target_eval_dataset is not None:
            a["eval_dataset"] = target_eval_dataset
        super().__init__(*bound.args, **bound.kwargs)
        if self.args.gradient_accumulation_steps > 1 and not hasattr(Trainer, "get_batch_samples"):
            raise ConfigError("gradient_accumulation_steps > 1 needs transformers >= 4.46 (Trainer.get_batch_samples "
                              "hands over a step's micro-batches together)")
        from transformers.data.data_collator import DataCollatorWithPadding, default_data_collator

        inner = self.data_collator
        if a.get("data_collator") is None and (inner is default_data_collator
                                               or isinstance(inner, DataCollatorWithPadding)):
            inner = None  # the Trainer's own defaults cannot pad labels: fwsel pads
        self.data_collator = RowCollator(self.processing_class, self._max_len(), inner)
        self.target_select, self.target_eval = rows_of(target_dataset), rows_of(target_eval_dataset)
        if self.selector_needs_target() and not self.target_select:
            raise ConfigError(f"selector {self.selector.name!r} scores rows against a target: pass target_dataset")
        self._engine, self._group, self._sel_log = None, None, None
        self._diag = collections.defaultdict(list)
        self._sources = collections.Counter()
        self.selection_totals = collections.Counter()

    # ---- setup helpers
    def _max_len(self) -> int:
        limits = [getattr(self.args, "max_length", None),
                  getattr(getattr(self.model, "config", None), "max_position_embeddings", None),
                  getattr(self.processing_class, "model_max_length", None)]
        return int(min(x for x in limits + [1 << 20] if isinstance(x, int) and x > 0))

    def selector_needs_target(self) -> bool:
        return self.selector.needs(10**9) == "grads"

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None:
            self._signature_columns = list(dict.fromkeys([*self._signature_columns, *COLUMNS]))

    def _rank(self) -> tuple[int, int]:
        return self.args.process_index, self.args.world_size

    def _optimizer(self):
        return getattr(self.optimizer, "optimizer", self.optimizer)  # under accelerate's wrapper

    def _engine_for_step(self):
        if self._engine is None:
            from fwsel.grads.dist import build_engine

            opt, needs = self._optimizer(), self.selector.engine_needs
            adam_like = all("betas" in g and "eps" in g and not g.get("amsgrad", False) for g in opt.param_groups)
            if not adam_like and any(m != "sgd" for m in (needs.metric, *needs.aux_metrics)):
                warnings.warn(f"selector {self.selector.name!r} uses the AdamW geometry but the optimizer is "
                              f"{type(opt).__name__}: scoring in the SGD metric instead", stacklevel=2)
                needs = replace(needs, metric="sgd", aux_metrics=())
            cfg = engine_config(self.engine_kwargs, self.args.per_device_train_batch_size)
            try:
                self._engine = build_engine(cfg, needs, self.model, opt, comm=Comm(),
                                            projection_seed=int_seed(self.args.seed, "projection"))
            except ValueError as e:  # the model or engine settings do not fit (e.g. a LoRA variant)
                raise ConfigError(f"engine: {e}") from None
        return self._engine

    # ---- the step
    def get_batch_samples(self, *args, **kwargs):
        samples, n_items = super().get_batch_samples(*args, **kwargs)
        self._group = samples  # every micro-batch of the coming optimizer step: one pool
        return samples, n_items

    def training_step(self, model, inputs, num_items_in_batch=None):
        group = self._group if self._group and any(b is inputs for b in self._group) else [inputs]
        if inputs is not group[0]:  # the first micro-batch did the whole step
            inputs.pop(ROWS, None)
            return torch.zeros((), device=self.args.device)
        model.train()
        if callable(getattr(self.optimizer, "train", None)):
            self.optimizer.train()
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ConfigError("fwsel.hf selection writes .grad itself: DeepSpeed and FSDP are not supported (DDP is)")
        rows = [r for b in group for r in b.pop(ROWS)]
        for j, r in enumerate(rows):  # an iterable dataset has no row index: (step, position) names the row
            if r["id"] is None:
                r["id"] = f"{self.state.global_step}:{j}"
        parts = [self._prepare_inputs({k: b[k] for k in TENSORS}) for b in group]
        pool = parts[0]
        for p in parts[1:]:
            pool = concat_batches(pool, p)
        return self._select_and_update(pool, rows)

    def _select_and_update(self, pool: dict, rows: list[dict]) -> torch.Tensor:
        t, (rank, world) = self.state.global_step, self._rank()
        sup = (pool["labels"][:, 1:] != -100).any(1).cpu().numpy()
        if not sup.all():  # a row with no supervised token has no loss: never a candidate
            keep = np.flatnonzero(sup)
            pool = take_rows(pool, torch.as_tensor(keep, device=pool["input_ids"].device))
            rows = [rows[i] for i in keep]
            self.selection_totals["unsupervised_rows"] += int((~sup).sum())
        n = len(rows)
        k = max(1, int(round(self.budget * n)))
        need = self.selector.needs(t) if n else "none"
        scores = losses = None
        finite = np.ones(n, dtype=bool)
        with self.accelerator.autocast():
            if need == "grads":
                scores = self._engine_for_step().score(pool, self._target_batch(t), self.selector.extra_dirs(t), k=k)
                finite = scores.finite.cpu().numpy().astype(bool)
            elif need == "losses":
                with torch.no_grad():
                    losses = self._row_losses(pool).detach().double().cpu()
                finite = torch.isfinite(losses).numpy()
        lr = self._optimizer().param_groups[0]["lr"]
        sel = self.selector.select(Pool(rows, k, t, lr, torch_gen(self.args.seed, "selector", t, rank), scores=scores,
                                        losses=losses, optimizer=self._optimizer())) if n else None
        idx, w = usable(sel.indices, sel.weights, finite) if sel else ([], np.zeros(0))
        params = [p for p in self.model.parameters() if p.requires_grad]
        with Comm(rank, world).reduce_grads(params, mean=True):  # per-rank selection: updates averaged, as DDP
            loss = self._update(need, pool, scores, idx, w) if idx else None
        self._record(t, rows, idx, w, sel.diagnostics if sel else {})
        return torch.tensor(0.0 if loss is None else loss, device=self.args.device)

    def _row_losses(self, batch: dict) -> torch.Tensor:
        """Per-row losses of `batch`, a per-device batch at a time."""
        mb, n, dev = self.args.per_device_train_batch_size, batch["input_ids"].shape[0], batch["input_ids"].device
        parts = (take_rows(batch, torch.arange(s, min(s + mb, n), device=dev)) for s in range(0, n, mb))
        return torch.cat([sequence_losses(self.model, part).losses for part in parts])

    def _update(self, need, pool, scores, idx, w) -> float | None:
        """Write the weighted update of rows `idx` into .grad; the mean weighted loss of those rows."""
        scaler = getattr(self.accelerator, "scaler", None)
        if need == "grads":
            scale = float(scaler.get_scale()) if scaler is not None else 1.0  # fp16: .grad holds scaled gradients
            self._engine.apply_update(idx, w * scale)
            return float((scores.losses[idx].double().numpy() * w).mean())
        dev = pool["input_ids"].device
        mb, total, coef = self.args.per_device_train_batch_size, 0.0, torch.as_tensor(w / len(idx))
        for s in range(0, len(idx), mb):
            sub = take_rows(pool, torch.as_tensor(idx[s : s + mb], device=dev))
            with self.accelerator.autocast():
                out = sequence_losses(self.model, sub).losses
            c = coef[s : s + mb].to(out)
            fin = torch.isfinite(out)
            if not bool(fin.all()):  # a zero weight does not help: 0 * NaN still poisons the backward
                if not bool(fin.any()):
                    continue
                sub, c = take_rows(sub, fin.nonzero()[:, 0].to(dev)), c[fin]  # redo the forward without them
                with self.accelerator.autocast():
                    out = sequence_losses(self.model, sub).losses
            self.accelerator.backward((out * c).sum())
            total += float((out.detach() * c).sum())
        return total

    def _target_batch(self, t: int) -> dict:
        sel, v = self.target_select, self.target_batch_size
        idx = np_rng(self.args.seed, "target", t, self._rank()[0]).choice(len(sel), v, replace=v > len(sel))
        batch = self.data_collator.tensors([sel[i] for i in idx])
        return self._prepare_inputs(batch)

    # ---- logging, selected.jsonl
    def _selected_log(self) -> JsonlLog:
        if self._sel_log is None:
            rank = self._rank()[0]
            os.makedirs(self.args.output_dir, exist_ok=True)
            name = "selected.jsonl" if rank == 0 else f"selected.rank{rank}.jsonl"
            path = os.path.join(self.args.output_dir, name)
            if not getattr(self, "_resuming", False) and os.path.exists(path):
                os.remove(path)  # a fresh run: no selections of an earlier one in this output_dir
            self._sel_log = JsonlLog(path)
            if getattr(self, "_resuming", False):
                self._sel_log.truncate_to(self.state.global_step)
        return self._sel_log

    def _record(self, t, rows, idx, w, diagnostics) -> None:
        self._selected_log().write({"step": t + 1, "ids": [rows[i]["id"] for i in idx], "weights": list(w)})
        self.selection_totals["examples_seen"] += len(rows)
        self.selection_totals["examples_trained"] += len(idx)
        self.selection_totals["skipped_steps"] += int(not idx)
        for i in idx:
            self._sources[str(rows[i]["source"])] += 1
        for key, val in diagnostics.items():
            self._diag[key].append(float(val))

    def selected_per_source(self) -> dict:
        """Rows trained so far per `source` (this rank's)."""
        return dict(sorted(self._sources.items()))

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Training logs also carry the `sel_*` diagnostics (means since the last log) and the
        run's selected-row totals per source, so every `report_to` integration sees them."""
        if "loss" in logs:
            logs.update({f"sel_{key}": float(np.mean(v)) for key, v in self._diag.items() if v})
            logs.update({f"sel_source_{s}": float(c) for s, c in sorted(self._sources.items())})
            logs.update({f"sel_{key}": float(v) for key, v in self.selection_totals.items()})
            self._diag.clear()
        super().log(logs, *args, **kwargs)

    # ---- evaluation on the target eval split
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = {}
        if eval_dataset is not None or self.eval_dataset is not None:
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.target_eval:
            from fwsel.evaluate import evaluate

            res = evaluate(self.model, self.data_collator.tensors, self.target_eval, self.args.device, 4096)
            mine = {f"{metric_key_prefix}_target_{key[len('target_eval_'):]}": v for key, v in res.items()}
            self.log(dict(mine))
            metrics.update(mine)
        return metrics

    def prediction_step(self, model, inputs, *args, **kwargs):
        inputs.pop(ROWS, None)
        return super().prediction_step(model, inputs, *args, **kwargs)

    # ---- checkpoints and resume
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        rank = self._rank()[0]
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        os.makedirs(folder, exist_ok=True)
        state = {"selector": self.selector.name, "budget": self.budget, "seed": self.args.seed,
                 "step": self.state.global_step, "totals": dict(self.selection_totals), "sources": dict(self._sources),
                 "selector_state": self.selector.state_dict()}
        name = STATE_FILE if rank == 0 else f"{STATE_FILE[:-5]}.rank{rank}.json"
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(state, f)

    def train(self, resume_from_checkpoint=None, **kwargs):
        path = resume_from_checkpoint
        if path is True:
            from transformers.trainer_utils import get_last_checkpoint

            path = get_last_checkpoint(self.args.output_dir)
        self._resuming = bool(path)
        if path:
            self._load_selection_state(path)
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            if self._sel_log is not None:
                self._sel_log.close()
                self._sel_log = None
            self._resuming = False

    def _load_selection_state(self, folder: str) -> None:
        rank = self._rank()[0]
        name = STATE_FILE if rank == 0 else f"{STATE_FILE[:-5]}.rank{rank}.json"
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            warnings.warn(f"{path} is missing: selection totals restart from zero", stacklevel=3)
            return
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        if state["selector"] != self.selector.name or state["budget"] != self.budget or state["seed"] != self.args.seed:
            raise ConfigError(f"{folder} was written by selector={state['selector']} budget={state['budget']} "
                              f"seed={state['seed']}; this trainer has selector={self.selector.name} "
                              f"budget={self.budget} seed={self.args.seed}")
        self.selection_totals = collections.Counter(state["totals"])
        self._sources = collections.Counter(state["sources"])
        self.selector.load_state_dict(state.get("selector_state", {}))


def selections(output_dir: str) -> list[dict]:
    """The rows of `<output_dir>/selected.jsonl`."""
    return read_jsonl(os.path.join(output_dir, "selected.jsonl"))


class SelectiveTrainer(SelectionMixin, Trainer):
    """`transformers.Trainer` that trains each step on the rows a fwsel selector keeps (see the module doc)."""
