"""GradEngine over one rank's shard of each pool, with global selection (torchrun; fwsel.distributed).

Each rank scores a contiguous shard of the pool and of the target batch (together exactly
the rows one process scores; shards differ by at most one row). Between capture and products
(`GradEngine._exchange`) the rows are gathered: the exact per-sample buffer rows, or with
`projection_dim` their projected features (fwsel.grads.project, approximate). Every rank then
holds the same `[N + v, .]` matrix and computes the same `K`, `b`, `y2` and pool statistics,
so every rank's selector picks the same `(S, w)`: selectors never see the world size.

The update: each rank forms the part of `(1/|S|) sum_S w_i g_i` that its own rows carry
(through the base engine, so captured, fallback and any other parameter kinds are handled as
in one process), then one all-reduce sums the parts (`Comm.reduce_grads`). Why not form the
captured part from the gathered buffer on every rank, with no collective: that buffer is only
exact in exact mode (projected features cannot be un-projected), parameters outside the
buffer need the all-reduce anyway, and the all-reduce moves `P` numbers against the
`(N + v) P` the gather already moved. A rank with no selected rows still joins it.
"""

from __future__ import annotations

import torch

from fwsel.distributed import Comm

from . import project
from .engine import GradEngine, Scores, finite_picks
from .needs import EngineNeeds


def build_engine(cfg, needs: EngineNeeds, model, optimizer, *, comm: Comm | None = None,
                 projection_seed: int = 0) -> GradEngine:
    """The engine for one selector: `cfg` is the `engine:` config group (a mapping: grad_path,
    projection, projection_dim, micro_batch_size, loss_chunk_tokens), `needs` what the selector
    reads. The plain engine in one process with exact gradients, else a ShardedEngine."""
    comm = comm or Comm()
    kw = dict(adam_q=needs.adam_q, aux_metrics=needs.aux_metrics, products=needs.products,
              loss_chunk_tokens=int(cfg["loss_chunk_tokens"]), micro_batch_size=cfg["micro_batch_size"],
              grad_path=cfg["grad_path"], ghost_b=cfg.get("ghost_b", "exact"))
    dim = cfg["projection_dim"]
    if not comm.active and dim is None:
        return GradEngine(model, optimizer, needs.metric, **kw)
    return ShardedEngine(model, optimizer, needs.metric, comm=comm, projection_dim=dim,
                         projection=cfg["projection"], projection_seed=projection_seed, **kw)


class ShardedEngine(GradEngine):
    """`score` takes the whole pool and target batch (the same on every rank) and scores this
    rank's shard; `apply_update` takes global pool positions."""

    late_row_check = False  # every row's finiteness before the products (projected features hide NaNs)

    def __init__(self, model, optimizer, metric="sgd", *, comm: Comm, projection_dim=None, projection="countsketch",
                 projection_seed=0, **kw):
        super().__init__(model, optimizer, metric, **kw)
        if self.grad_path == "ghost":
            raise ValueError("grad_path=ghost is not available across ranks or with projection_dim "
                             "(token-Gram factors are not gathered): use auto or materialize")
        self.grad_path = "materialize"  # every captured block has buffer columns to gather
        self.comm = comm
        self.proj = None if projection_dim is None else project.build(
            projection, self.cap.blocks, projection_dim, int(projection_seed), self.cap.device, self.cap.dtype)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._sizes = self._global_finite = None
        self._k, self._dirs, self._dir_feats, self._poor = None, (), None, None

    def metrics(self) -> tuple:
        return (self.metric, *[a for a in self.aux_metrics if a != self.metric])

    def score(self, pool_batch: dict, target_batch: dict, extra_dirs=(), k=None, q_scale=1.0) -> Scores:
        n, v = pool_batch["input_ids"].shape[0], target_batch["input_ids"].shape[0]
        ps, ts = self.comm.shard(n), self.comm.shard(v)
        self._sizes, self._k, self._dirs = (n, v, ps), k, tuple(extra_dirs)
        local = {key: val[ps] for key, val in pool_batch.items()}
        scores = super().score(local, {key: val[ts] for key, val in target_batch.items()}, extra_dirs, k, q_scale)
        self._global_finite = scores.finite.clone()
        scores.n_tokens = (pool_batch["labels"][:, 1:] != -100).sum(1).cpu()  # every rank's rows
        # the update's weighted backward (parameters outside the buffer) runs over this rank's rows
        self._pool = {"attention_mask": torch.ones_like(local["input_ids"]), **local}
        return scores

    def _exchange(self, n_loc: int, losses: torch.Tensor, local: torch.Tensor):
        """Every rank's rows (exact, or projected features), gathered; `local` (this rank's exact
        rows: pool shard, then target shard) stays the captured buffer for the update."""
        n, v, _ = self._sizes
        feats = local
        if self.proj is not None:
            feats, self._dir_feats, self._poor = project.features(
                self.proj, self.comm, self.optimizer, self.cap.blocks, local, losses, n_loc, self._k, self._dirs,
                metrics=self.metrics(), adam_q=self.adam_q, q_scale=self._q_scale)
        c = self.comm
        rows = torch.cat([c.gather_rows(feats[:n_loc], n), c.gather_rows(feats[n_loc:], v)])
        return n, torch.cat([c.gather_rows(losses[:n_loc], n), c.gather_rows(losses[n_loc:], v)]), rows

    def _products(self, n, finite, dirs, k) -> Scores:
        if self.proj is None:
            return super()._products(n, finite, dirs, k)
        return project.products(self._rows, n, finite, self._dir_feats, self._poor, dim=self.proj.dim,
                                metrics=self.metrics(), aux_metrics=self.aux_metrics)

    def _free(self) -> None:
        super()._free()
        self._dir_feats = None

    def apply_update(self, indices, weights) -> None:
        """This rank's part of the update of global positions `indices`, summed over ranks."""
        if self.cap.buf is None:
            raise RuntimeError("apply_update needs a score() first (and only one update per score)")
        idx, w = finite_picks(indices, weights, self._global_finite)
        ps = self._sizes[2]
        mine = (idx >= ps.start) & (idx < ps.stop)
        # the base engine divides by its own row count: rescale so the parts sum to (1/|S|) sum w_i g_i
        local_w = w[mine] * (mine.sum() / idx.size) if idx.size else w[mine]
        with self.comm.reduce_grads(self.params):
            self._update(torch.as_tensor(idx[mine] - ps.start), torch.as_tensor(local_w))
