"""Several processes under torchrun: the process group, rank info, and the few collectives fwsel uses.

`torchrun --nproc_per_node=G -m fwsel train ...` starts G copies of the CLI. Every rank builds the
same model, reads the same pools and target batches (pure functions of (seed, t)), scores a
contiguous shard of each and gathers what selection needs, so every rank computes the same
`K`, `b` and `(S, w)` (fwsel.grads.dist). Only rank 0 writes the run dir.

Why explicit collectives instead of wrapping the model in DDP: the gradient engine never lets
autograd form parameter gradients while scoring (every parameter is frozen and the layers'
gradients go to the engine's hooks, so DDP's reducer would see nothing, `no_sync()` or not), and the update
of captured parameters is written into `.grad` from the per-sample buffer, not by a backward
that DDP's hooks could watch. So fwsel does what DDP's constructor and reducer do, explicitly:
it broadcasts parameters and buffers from rank 0 once (`broadcast_module`) and all-reduces
one flat bucket of this step's gradient contributions (`reduce_grads`).

With one process, every method here is the identity and no `torch.distributed` call is made:
the same code path runs with or without torchrun.
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager

import torch

from fwsel.cli import env_world  # the launcher's environment, read by the CLI too
from fwsel.errors import ConfigError, FwselError

_COMM = None


class PeerError(FwselError):
    """A collective failed: most often another rank stopped (its own error is printed by that rank)."""


@contextmanager
def _collective(rank: int, what: str):
    try:
        yield
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PeerError(f"rank {rank}: {what} failed, most likely because another rank stopped (its error is "
                        f"printed above): {first}") from None


class Comm:
    """This process's place in the job, and the collectives fwsel needs (identity when world == 1)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0) -> None:
        self.rank, self.world, self.local_rank = int(rank), int(world), int(local_rank)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- sharding: contiguous slices, the first n % world ranks one row longer
    def counts(self, n: int) -> list[int]:
        q, r = divmod(int(n), self.world)
        return [q + (i < r) for i in range(self.world)]

    def shard(self, n: int, rank: int | None = None) -> slice:
        c = self.counts(n)
        r = self.rank if rank is None else rank
        lo = sum(c[:r])
        return slice(lo, lo + c[r])

    def device(self, name: str) -> torch.device:
        """The training device: under torchrun with CUDA, this rank's own GPU."""
        from fwsel.modeling import resolve_device

        dev = resolve_device(name)
        if not self.active or dev.type != "cuda":
            return dev
        if dev.index is not None and self.world > 1:
            raise ConfigError(f"device={name}: under torchrun each rank uses its own GPU (LOCAL_RANK); "
                              f"use device=auto or device=cuda")
        return torch.device("cuda", self.local_rank)

    # ---- collectives
    def gather_rows(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """This rank's rows `shard(n)` of an [n, ...] tensor -> the whole tensor on every rank.

        Shards differ in length, so each is padded to the longest and gathered with one
        all_gather into a single tensor (the padding is dropped afterwards).
        """
        if not self.active:
            return x
        import torch.distributed as dist

        counts = self.counts(n)
        assert x.shape[0] == counts[self.rank], (x.shape, counts, self.rank)
        width = max(counts)
        dtype = x.dtype
        src = x.to(torch.uint8) if dtype == torch.bool else x
        pad = src.new_zeros((width, *src.shape[1:]))
        pad[: src.shape[0]] = src
        out = pad.new_empty((self.world * width, *src.shape[1:]))
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        with _collective(self.rank, "gathering rows"):
            gather(out, pad.contiguous())
        rows = torch.cat([out[r * width : r * width + c] for r, c in enumerate(counts)])
        return rows.to(dtype)

    def all_reduce_(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.active:
            import torch.distributed as dist

            with _collective(self.rank, f"all_reduce({op})"):
                dist.all_reduce(x, op=getattr(dist.ReduceOp, op.upper()))
        return x

    def agree(self, flag: bool) -> bool:
        """True on every rank when it is True on any (a stop request seen by one rank stops all)."""
        if not self.active:
            return bool(flag)
        return bool(self.all_reduce_(torch.tensor([int(bool(flag))]), "max").item())

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        with _collective(self.rank, "broadcast"):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj) -> list:
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        with _collective(self.rank, "all_gather"):
            dist.all_gather_object(out, obj)
        return out

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Every parameter and buffer from rank 0 (what DDP's constructor does)."""
        if not self.active:
            return
        import torch.distributed as dist

        with torch.no_grad(), _collective(self.rank, "broadcasting the model"):
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, src=0)

    @contextmanager
    def reduce_grads(self, params, mean: bool = False):
        """Gradients written inside the block are summed over ranks (`mean`: averaged, as DDP
        does when every rank trains on its own batch); those already in `.grad` before it are
        kept as they were (gradient accumulation is safe).

        A parameter that no rank gave a gradient keeps `.grad = None` (AdamW then skips it,
        as in one process). One all-reduce per (dtype, device) bucket; every rank joins it,
        also one with no rows to contribute.
        """
        if not self.active:
            yield
            return
        params = list(params)
        before = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            yield
        except BaseException:  # the block failed: the gradients from before it come back as they were
            for p, old in zip(params, before):
                p.grad = old
            raise
        buckets: dict = {}
        for i, p in enumerate(params):
            buckets.setdefault((p.dtype, p.device), []).append(i)
        for (dtype, device), ids in buckets.items():
            has = torch.tensor([float(params[i].grad is not None) for i in ids], dtype=dtype, device=device)
            grads = [(params[i].grad if params[i].grad is not None else torch.zeros_like(params[i])).reshape(-1)
                     for i in ids]
            flat = torch.cat([has, *grads])
            self.all_reduce_(flat)
            had, off = flat[: len(ids)], len(ids)
            if mean:
                flat[off:] /= self.world
            for j, i in enumerate(ids):
                p = params[i]
                g = flat[off : off + p.numel()].view_as(p)
                off += p.numel()
                old = before[i]
                p.grad = (old if float(had[j]) == 0 else (g.clone() if old is None else old.add_(g)))


def comm() -> Comm:
    """This process's Comm (single-process until `init` ran under torchrun)."""
    return _COMM if _COMM is not None else Comm()


def init(env=os.environ) -> Comm:
    """Join the process group torchrun describes (gloo for CPU tensors, NCCL for CUDA ones).

    Idempotent; outside torchrun (WORLD_SIZE unset or 1) nothing is initialised.
    """
    global _COMM
    if _COMM is not None:
        return _COMM
    rank, world = env_world(env)
    local = int(env.get("LOCAL_RANK", "0"))
    if world > 1:
        import torch.distributed as dist

        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local)
        timeout = datetime.timedelta(seconds=float(env.get("FWSEL_DIST_TIMEOUT", "1800")))
        # a group torchrun restarted (--max-restarts) may meet the previous attempt's addresses in
        # the agent's store and fail to connect: give each attempt its own key prefix
        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
        store = dist.PrefixStore(f"fwsel/attempt-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo", store=store, rank=rank,
                                world_size=world, timeout=timeout)
    _COMM = Comm(rank, world, local)
    return _COMM


def shutdown(ok: bool) -> None:
    """Leave the process group. After a failure, just exit: the others may sit in a collective
    (torchrun stops them), and a barrier or NCCL teardown would hang here."""
    global _COMM
    if _COMM is not None and _COMM.active and ok:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    _COMM = None
