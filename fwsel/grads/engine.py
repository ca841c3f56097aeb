"""GradEngine: per-sample gradient products and the one-pass update (docs/method.md#per-sample-gradient-products)."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch

from . import blas
from .capture import Capture, check_peft, lora_layers, requires_grad
from .ghost import PATHS, GhostOps, fit_adam_rank1, token_gram_sites
from .local import local_update
from .loss import concat_batches, sequence_losses, take_rows, unwrap
from .metric import ADAM_Q, METRICS, adam_diag_run, direction, group_of, pool_q
from .needs import wanted
from .sums import MatOps, Scores, Sums, nonzero_mask, row_sum

DIRS = ("momentum", "decay")
GHOST_B = ("exact", "rank1")
log = logging.getLogger(__name__)


def finite_picks(indices, weights, finite: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights) as int64 / float64 arrays, without the rows `finite` rules out."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if idx.size != w.size:
        raise ValueError("indices and weights differ in length")
    ok = finite.numpy()[idx]
    if not ok.all():
        warnings.warn(f"dropping non-finite candidates {idx[~ok].tolist()} from the update")
        idx, w = idx[ok], w[ok]
    return idx, w


class _SpoiltQ(Exception):
    """A pool row's NaN/inf entry reached pool q (see `GradEngine._q_check`)."""


class GradEngine:
    """Scores a pool against a target batch from one forward and one backward, then updates.

    `metric`: sgd | adam | adam2; `adam_q`: pool | state | taylor; `loss_chunk_tokens`: head
    chunk size; `micro_batch_size`: rows per forward/backward (None: all at once);
    `aux_metrics`: other metrics whose N-vectors (b for g_T, squared norms, y2) are also returned;
    `grad_path`: per-layer products, `auto` (token Gram where the cost model of fwsel.grads.ghost
    says it is cheaper AND it is exact, i.e. every metric asked for is sgd), `materialize`, or
    `ghost` (token Gram on every Linear not sharing its weight; in adam geometry that Gram uses a
    rank-1 D and, as pool q needs per-sample gradients, adam_q=state on those layers: approximate);
    `ghost_chunk_tokens`: token block size of the token-Gram (bounds its memory);
    `products`: what the selector reads (a fwsel.grads.needs.Product, or names among `PRODUCTS`;
    None: all). Without `k` no Gram is formed (`Scores.K` is None) and the squared norms
    come alone when asked for; `b`, `y2` and `dir_gram` always come (one cheap product each).
    `ghost_b`: on token-Gram layers in adam geometry, `exact` (b and y2 through `M ⊙ g_T`: one
    pass over each pool token as costly as a weight gradient) or `rank1` (b and y2 from the same
    token Gram as K, with its rank-1 D: cheaper, approximate like K there).
    Built from the `engine:` config group by `fwsel.grads.dist.build_engine`.
    """

    late_row_check = True  # see `_late_check` (off where the products see gathered or projected rows)

    def __init__(self, model, optimizer, metric="sgd", *, adam_q="pool", loss_chunk_tokens=4096,
                 micro_batch_size=None, aux_metrics=(), grad_path="auto", ghost_chunk_tokens=1024, products=None,
                 ghost_b="exact"):
        for m in (metric, *aux_metrics):
            if m not in METRICS:
                raise ValueError(f"metric must be one of {METRICS}, got {m!r}")
        if adam_q not in ADAM_Q:
            raise ValueError(f"adam_q must be one of {ADAM_Q}, got {adam_q!r}")
        if grad_path not in PATHS:
            raise ValueError(f"grad_path must be one of {PATHS}, got {grad_path!r}")
        if ghost_b not in GHOST_B:
            raise ValueError(f"ghost_b must be one of {GHOST_B}, got {ghost_b!r}")
        if optimizer is None and any(m != "sgd" for m in (metric, *aux_metrics)):
            raise ValueError("the adam metrics need the optimizer")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError("micro_batch_size must be positive or None")
        self._lora = lora_layers(model)
        check_peft(model, self._lora)
        self.model, self.optimizer, self.metric = model, optimizer, metric
        self.adam_q, self.loss_chunk_tokens = adam_q, loss_chunk_tokens
        self.micro_batch_size, self.aux_metrics = micro_batch_size, tuple(aux_metrics)
        self.grad_path, self.ghost_chunk_tokens = grad_path, int(ghost_chunk_tokens)
        self.products, self.ghost_b = wanted(products), ghost_b
        self._adam = any(m != "sgd" for m in (metric, *aux_metrics))
        self.ghost_q = "state" if adam_q == "pool" else adam_q  # adam_q on token-Gram layers
        self.cap = Capture(model)
        if not self.cap.sites:
            raise ValueError("no trainable nn.Linear to capture (LoRA adapters or full fine-tuning)")
        self._pool: dict | None = None  # the scored pool rows, kept for the fallback backward
        self._rows: torch.Tensor | None = None  # [N + v, .] rows the products read (cap.buf, or gathered)
        self._finite: torch.Tensor | None = None
        self._q_scale = 1.0  # score()'s factor on pool q
        self._ghost: dict = {}  # id(site) -> GhostOps of the last scoring pass
        self._warned = False
        self._spare: torch.Tensor | None = None  # CPU scratch of the products (see `_scratch`)
        self._roots: list = []  # (pool rows, columns, sqrt(M)) of the runs `_products` scaled in place
        self.group_entries = 2**26  # buffer entries per run of blocks handled together (bounds temporaries)
        self._redo = False  # products redone after `_SpoiltQ`
        self._gT: torch.Tensor | None = None  # the target rows' mean over the buffer columns (`_target_mean`)

    # ------------------------------------------------------------------ path choice
    def plan(self, batch: dict, n: int) -> set:
        """Indices of the sites that take the token-Gram path for this batch (n pool rows)."""
        if self.grad_path == "materialize":
            return set()
        exact = all(m == "sgd" for m in (self.metric, *self.aux_metrics))
        if self.grad_path == "auto" and not exact:
            return set()
        head = unwrap(self.model).get_output_embeddings()
        return token_gram_sites(self.cap.sites, head, batch, n, force=self.grad_path == "ghost")

    # ------------------------------------------------------------------ scoring
    def score(self, pool_batch: dict, target_batch: dict, extra_dirs=(), k=None, q_scale=1.0) -> Scores:
        """One forward and one backward over pool + target rows; products in float64. `q_scale`
        multiplies pool q (adam_q=pool): the coming step's squared clip factor, when known."""
        bad = [d for d in extra_dirs if d not in DIRS]
        if bad:
            raise ValueError(f"unknown extra_dirs {bad}; known: {DIRS}")
        check_peft(self.model, self._lora)
        self._free()
        self._q_scale = float(q_scale)
        batch = concat_batches(pool_batch, target_batch)
        n = pool_batch["input_ids"].shape[0]
        rows = batch["input_ids"].shape[0]
        losses = torch.empty(rows, dtype=torch.float64)
        mb = self.micro_batch_size or rows
        cap = self.cap
        ghost = self.plan(batch, n)
        cap.layout(ghost)
        with torch.enable_grad(), cap.scoring(rows), blas.threads():
            for s in range(0, rows, mb):
                sub = {key: val[s : s + mb] for key, val in batch.items()}
                cap.offset, cap.mb_rows = s, sub["input_ids"].shape[0]
                cap.tok_mask = sub["attention_mask"].bool()
                out = sequence_losses(self.model, sub, self.loss_chunk_tokens, on_chunk=cap.on_chunk)
                fin = torch.isfinite(out.losses)
                total = out.losses[fin].sum()
                if total.requires_grad:  # every parameter is frozen: only the taps' hooks see gradients
                    torch.autograd.backward(total)
                losses[s : s + cap.mb_rows] = out.losses.detach().double().cpu()
                del out, total  # the graph (and any leaf's .grad in it) goes before the next micro-batch
        n, losses, buf = self._exchange(n, losses, cap.buf)  # seam: fwsel.grads.dist gathers every rank's rows
        self._rows = buf
        finite = torch.isfinite(losses)
        first = n if self._late_check() or self._q_check() else 0  # pool rows: see those two
        last = n if self.late_row_check else finite.shape[0]  # target rows: see `_target_mean`
        if first < last:
            finite[first:last] &= torch.isfinite(buf[first:last].sum(1)).cpu()  # a NaN/inf entry spoils the sum
        facs = {i: cap.factors(cap.sites[i]) for i in sorted(ghost)}
        for i in ghost:  # the engine holds the factors from here on
            cap.sites[i].factors = []
        for X, E, r in facs.values():  # a row with a non-finite token factor is non-finite
            bad_tok = ~torch.isfinite(X.sum(1) + E.sum(1))
            finite[r[bad_tok].unique().cpu()] = False
        if not bool(finite.all()):
            dev = ~finite.to(buf.device)
            buf[dev] = 0
            for X, E, r in facs.values():
                drop = dev[r]
                X[drop], E[drop] = 0, 0
        self._ghost = {id(cap.sites[i]): GhostOps(X, E, r, n, rows, self.ghost_chunk_tokens)
                       for i, (X, E, r) in facs.items()}
        self._gT = self._target_mean(buf, finite, n) if self.late_row_check else None
        self._finite, self._pool = finite[:n], {key: val[:n] for key, val in batch.items()}
        try:
            scores = self._products(n, finite, tuple(extra_dirs), k)
        except _SpoiltQ:  # a pool row with a NaN/inf entry: find it by the pass skipped above, redo
            for m, cols, root in self._roots:
                self._rows[:m, cols] /= root
            self._roots = []
            self._drop_rows(buf, finite, 0, n)
            self._finite, self._redo = finite[:n], True  # no second look at q (an overflow stays)
            try:
                scores = self._products(n, finite, tuple(extra_dirs), k)
            finally:
                self._redo = False
        scores.losses, scores.target_losses = losses[:n], losses[n:]
        scores.n_tokens = (pool_batch["labels"][:, 1:] != -100).sum(1).cpu()
        return scores

    def _target_mean(self, buf, finite, n: int) -> torch.Tensor:
        """`g_T` over every buffer column: the mean of the finite target rows. Their finiteness
        comes from it (a NaN/inf entry spoils the mean), not from a pass over each row first; when
        it is spoilt (rare), the rows are checked one by one, the bad ones zeroed, and the mean redone."""
        for again in (False, True):
            if again:
                self._drop_rows(buf, finite, n, buf.shape[0])
            ok = finite[n:].to(device=buf.device, dtype=buf.dtype)
            gT = (ok / ok.sum().clamp_min(1)) @ buf[n:]
            if bool(torch.isfinite(gT.sum())):  # an overflowing sum of finite entries takes the slow path too
                return gT
        return gT

    def _drop_rows(self, buf, finite, lo: int, hi: int) -> None:
        """Check rows `lo:hi` of `buf` one by one (a NaN/inf entry spoils a row's sum): a bad row
        becomes non-finite in `finite`, and its buffer row and token-Gram factors become zero."""
        bad = torch.zeros(buf.shape[0], dtype=torch.bool, device=buf.device)
        bad[lo:hi] = ~torch.isfinite(buf[lo:hi].sum(1))
        finite &= ~bad.cpu()
        buf[bad] = 0
        for g in self._ghost.values():
            drop = bad.to(g.rows.device)[g.rows]
            g.X[drop], g.E[drop] = 0, 0

    def _groups(self, n: int):
        """Runs of consecutive materialised blocks (one set of whole-run ops each; at most ~2^26
        buffer entries, so temporaries stay bounded), then each token-Gram block alone."""
        limit, run, cols = max(self.group_entries // max(n, 1), 1), [], 0
        for b in self.cap.mat_blocks:
            if run and cols + b.param.numel() > limit:
                yield run
                run, cols = [], 0
            run.append(b)
            cols += b.param.numel()
        if run:
            yield run
        yield from ([b] for b in self.cap.blocks if b.ghost is not None)

    def _exchange(self, n: int, losses: torch.Tensor, rows: torch.Tensor):
        """Between capture and products: (pool rows, losses, row matrix) the products see. Here
        the rows just captured; a sharded engine (fwsel.grads.dist) returns every rank's rows
        (the captured `rows` stay this rank's: the update reads them)."""
        return n, losses, rows

    def _products(self, n, finite, dirs, k) -> Scores:
        """Products summed block run by block run: the pool's per-sample gradients (or a token-Gram
        layer's factors), the mean target gradient `g_T`, each metric's diagonal, then the sums."""
        n_bad, nt = int((~finite[:n]).sum()), int(finite[n:].sum())
        if nt == 0:
            warnings.warn("no target row has a finite loss and gradient: g_T = 0")
        nf = n - n_bad
        k_eff = min(k or nf, nf) if nf > 0 else 1
        t_coef = torch.zeros(finite.shape[0], dtype=self._rows.dtype, device=self._rows.device)
        t_coef[n:] = 1.0 / max(nt, 1)  # non-finite target rows are already zero
        acc = Sums(n, 1 + len(dirs), self.aux_metrics, self.cap.device, "k" in self.products,
                    "sq_norms" in self.products)
        groups = group_of(self.optimizer)
        for blocks in self._groups(n):
            ghost = blocks[0].ghost
            if ghost is None:
                cols = slice(blocks[0].start, blocks[-1].end)
                ops = MatOps(self._rows[:n, cols], self._scratch)
            else:
                ops = self._ghost[id(ghost)]
                alone = self._gram_gives_b(acc, dirs)  # K, b, y2 from one token Gram over pool and target rows
                if alone:  # D is never formed in full here: its rank-1 factors come from sampled coordinates
                    if self._adam:
                        poor = fit_adam_rank1(ops, blocks[0].param, self.optimizer, groups, self.ghost_q,
                                              {self.metric})
                        acc.poor.append(torch.as_tensor(poor).to(acc.device))  # the sample's, scaled
                        acc.coords += blocks[0].param.numel()
                    acc.add_gram_all(ops.gram_all(None, self.metric), n, nt)
                    continue
            if ghost is not None:
                gT = ops.weighted_sum(t_coef)
            else:
                gT = self._gT[cols] if self._gT is not None else t_coef[n:] @ self._rows[n:, cols]
            diag = self._diagonals(blocks, ops, gT, n_bad, k_eff, groups, acc)
            M = diag[self.metric]
            U = torch.stack([gT, *[direction(d, self.optimizer, [b.param for b in blocks], gT, M) for d in dirs]])
            if ghost is None and self._folds_metric(M):
                root = M.sqrt()
                ops.Gp.mul_(root)  # pool rows now g * sqrt(M): K = G' G'^T, b = G' (sqrt(M) u), no scaled copy
                self._roots.append((n, cols, root))  # `_update` divides it out of the summed update
                U, diag = U * root, {self.metric: None}
            acc.add(ops, U, diag, self.metric)
        if self._late_check():
            self._drop_late(acc, finite, n)
        scores = acc.scores(finite[:n].clone(), self._ghost_info(self._adam))
        if "nonzero" in self.products:
            scores.nonzero = nonzero_mask(scores, self._rows[:n], self._ghost.values())
        return scores

    def plain_rows(self) -> torch.Tensor:
        """The rows the products read (pool, then target), any metric folded into the pool rows
        divided out again (then a copy): for selectors that re-form products in another metric."""
        if not self._roots:
            return self._rows
        rows = self._rows.clone()
        for n, cols, root in self._roots:
            rows[:n, cols] /= root
        return rows

    def _folds_metric(self, M) -> bool:
        """Whether a run's metric `M` is folded into its pool rows in place (one pass, not a scaled
        [N, cols] copy for the Gram or the norms). Not with aux metrics: they read the plain rows.
        Not where `M` is 0 or inf on some coordinate (an inf second moment, eps = 0): the fold
        could not be divided out again (`_update`, `plain_rows`)."""
        if M is None or self.aux_metrics or not {"k", "sq_norms"} & self.products:
            return False
        return bool(((M > 0) & torch.isfinite(M)).all())

    def _late_check(self) -> bool:
        """Whether the pool rows' finiteness comes from their products (`b`, always formed; diag K or
        `sq_norms` when formed) instead of a pass over the buffer before them: a NaN/inf entry makes
        the row's dot products non-finite (NaN times 0 is NaN), and in sgd geometry no statistic
        mixes pool rows, so such a row spoils only its own products, which are then zeroed
        (`_drop_late`). A finite row whose products overflow counts as non-finite too."""
        return self.late_row_check and not self._adam

    def _q_check(self) -> bool:
        """Whether, in adam geometry with pool q, the pool rows' finiteness comes from pool q (the
        first statistic read from them: a NaN/inf entry makes its column of q non-finite) instead
        of a pass over the buffer before the products; `score` then finds the row and redoes the
        products (`_SpoiltQ`, rare: the metric's fold divided out first, to rounding)."""
        return self.late_row_check and self._adam and self.adam_q == "pool" and not self._redo

    def _drop_late(self, acc, finite, n: int) -> None:
        """Pool rows with a non-finite product: not finite, their products and buffer rows zero."""
        bad = ~torch.isfinite(acc.B[:, 0])  # g_T's column (an extra direction may itself be non-finite)
        sq = acc.K.diagonal() if acc.K is not None else acc.sq
        if sq is not None:
            bad |= ~torch.isfinite(sq)
        if not bool(bad.any()):
            return
        finite[:n] &= ~bad.cpu()
        if acc.K is not None:
            acc.K[bad], acc.K[:, bad] = 0, 0
        elif acc.sq is not None:
            acc.sq[bad] = 0
        acc.B[bad] = 0
        for out in acc.aux.values():
            out["b"][bad], out["sq_norms"][bad] = 0, 0
        self._rows[:n][bad.to(self._rows.device)] = 0

    def _gram_gives_b(self, acc, dirs) -> bool:
        """On a token-Gram layer, take `b` and `y2` from its Gram with the target rows (no `g_T`, no
        dot-product pass): exact in sgd geometry; in adam geometry only with `ghost_b=rank1`, where
        that Gram's rank-1 `D` then also enters `b` and `y2`. Not with extra directions (they need
        exact dot products) or, in adam geometry, aux metrics."""
        if acc.K is None or dirs:
            return False
        return not self._adam or (self.ghost_b == "rank1" and not self.aux_metrics)

    def _diagonals(self, blocks, ops, gT, n_bad, k_eff, groups, acc) -> dict:
        """{metric: its diagonal over the blocks' coordinates, None for the identity}."""
        diag = {"sgd": None}
        if not self._adam:
            return diag
        q_name = self.adam_q if blocks[0].ghost is None else self.ghost_q
        q = pool_q(ops.Gp, n_bad, k_eff, self._scratch(ops.Gp.shape)) if q_name == "pool" else None
        if q is not None and self._q_check() and not bool(torch.isfinite(q).all()):
            raise _SpoiltQ
        if q is not None and self._q_scale != 1.0:
            q.mul_(self._q_scale)
        params = [b.param for b in blocks]
        diag["adam"], poor = adam_diag_run(params, self.optimizer, groups, gT, q_name, q)
        acc.poor.append(torch.as_tensor(poor).to(acc.device))
        acc.coords += diag["adam"].numel()
        if "adam2" in (self.metric, *self.aux_metrics):
            diag["adam2"] = diag["adam"] ** 2
        return diag

    def _scratch(self, shape):
        """Room for one `shape` temporary: None (a fresh tensor) off the CPU, else a reused buffer."""
        if self.cap.device.type != "cpu":
            return None
        size = shape[0] * shape[1]
        if self._spare is None or self._spare.numel() < size:
            self._spare = torch.empty(size, dtype=self.cap.dtype)
        return self._spare[:size].view(shape)

    def _ghost_info(self, adam: bool) -> dict:
        if not self._ghost:
            return {}
        errs = [e for g in self._ghost.values() for e in g.rank1_err.values()]
        if adam and not self._warned:
            self._warned = True
            log.warning("token-Gram on %d layers: their adam-geometry K uses a rank-1 D (approximate) and "
                        "adam_q=%s (pool q needs per-sample gradients); b and y2 %s",
                        len(self._ghost), self.ghost_q,
                        "use the same rank-1 D (ghost_b=rank1)" if self.ghost_b == "rank1" else "stay exact")
        return {"layers": len(self._ghost), "adam_q": self.ghost_q if adam else None,
                "rank1_err_max": max(errs) if errs else 0.0}

    # ------------------------------------------------------------------ update
    def apply_update(self, indices, weights) -> None:
        """Add (1/|S|) sum_S w_i g_i into .grad; fallback parameters get a weighted backward."""
        if self.cap.buf is None:
            raise RuntimeError("apply_update needs a score() first (and only one update per score)")
        idx, w = finite_picks(indices, weights, self._finite)
        self._update(torch.as_tensor(idx), torch.as_tensor(w))

    def _update(self, idx: torch.Tensor, w: torch.Tensor) -> None:
        """`apply_update` on finite rows `idx` of the captured buffer (`w` not yet divided by |S|)."""
        buf = self.cap.buf
        try:
            if idx.numel():
                coef = w / idx.numel()
                gsum = row_sum(buf, idx.tolist(), coef.to(buf).tolist())
                if self._rows is buf:  # `_products` scaled these rows by sqrt(M) (not a gathered copy)
                    for _, cols, root in self._roots:
                        gsum[cols] /= root
                row_coef = torch.zeros(buf.shape[0], dtype=buf.dtype, device=buf.device)
                row_coef.index_add_(0, idx.to(buf.device), coef.to(buf))  # token-Gram layers: E_S^T diag(w) X_S
                for blk in self.cap.blocks:
                    p = blk.param
                    g = gsum[blk.start : blk.end] if blk.ghost is None else \
                        self._ghost[id(blk.ghost)].weighted_sum(row_coef)
                    g = g.view_as(p).to(p.dtype)  # a fresh tensor or a slice of the fresh gsum: no copy
                    p.grad = g if p.grad is None else p.grad.add_(g)
                local_update(self.cap.local, row_coef)
                if self.cap.pass_params:
                    self._fallback_backward(idx, coef)
        finally:
            self._free()

    def _fallback_backward(self, idx, coef) -> None:
        """Weighted backward over the selected rows for the parameters neither captured nor local."""
        mb = self.micro_batch_size or idx.numel()
        params = self.cap.pass_params
        local = [p for s in self.cap.local for p in s.params]
        with torch.enable_grad(), requires_grad(self.cap.captured + local, False):
            for s in range(0, idx.numel(), mb):
                sub = take_rows(self._pool, idx[s : s + mb].to(self._pool["input_ids"].device))
                losses = sequence_losses(self.model, sub, self.loss_chunk_tokens).losses
                total = (losses * coef[s : s + mb].to(losses)).sum()
                if total.requires_grad:
                    torch.autograd.backward(total, inputs=params)

    def _free(self) -> None:
        self.cap.release()
        self._rows, self._pool, self._ghost, self._roots, self._gT = None, None, {}, [], None
        for s in self.cap.local:
            s.saved = []

    def close(self) -> None:
        """Remove the hooks; the engine is unusable afterwards."""
        self._free()
        self.cap.close()
