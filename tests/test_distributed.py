"""Sharded scoring and global selection in-process: two gloo ranks (forked) against one process.

Both ranks must hold exactly the products one process computes (K, b, y2, directions, aux
metrics, losses, finite mask) and, after the update, the same .grad on every trainable
parameter; with projection_dim, both ranks agree with the one-process projection.
"""

import os
import socket

import pytest
import torch

from fwsel import distributed
from fwsel.cli import rank_args, run_dir_args
from fwsel.distributed import Comm
from fwsel.errors import FwselError
from fwsel.grads import GradEngine
from fwsel.grads.dist import ShardedEngine, build_engine
from fwsel.grads.metric import pool_q
from fwsel.grads.needs import EngineNeeds
from fwsel.grads.project import CountSketch, Projector, summed_pool_q

from helpers_models import random_batch, tiny_model

MARK = 63  # a token id only the poisoned row holds: its embedding output becomes NaN


def test_shards_are_contiguous_uneven_and_cover_the_pool():
    for world in (1, 2, 3, 4):
        for n in (1, 4, 7, 17):
            if n < world:
                continue
            comms = [Comm(r, world) for r in range(world)]
            parts = [c.shard(n) for c in comms]
            assert [i for p in parts for i in range(n)[p]] == list(range(n))
            sizes = [p.stop - p.start for p in parts]
            assert max(sizes) - min(sizes) <= 1 and sizes == comms[0].counts(n)


def test_run_dir_under_torchrun(tmp_path):
    env = {"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "none"}
    with pytest.raises(FwselError, match=r"give hydra.run.dir=<dir>, or start torchrun with --rdzv-id"):
        run_dir_args(["steps=2"], env)
    assert run_dir_args(["hydra.run.dir=/x"], env) == ["hydra.run.dir=/x"]
    assert run_dir_args(["resume=/x"], env) == ["resume=/x"]
    assert run_dir_args(["steps=2"], {**env, "WORLD_SIZE": "1"}) == ["steps=2"]
    env["TORCHELASTIC_RUN_ID"] = "job7"
    assert run_dir_args(["a=1"], env) == ["a=1", "hydra.run.dir=outputs/torchrun/job7"]
    assert run_dir_args(["-m", "seed=0,1"], env)[-1] == "hydra.sweep.dir=multirun/torchrun/job7"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:  # a group torchrun restarted (--max-restarts) resumes its own run dir
        os.makedirs("outputs/torchrun/job7/.hydra")
        open("outputs/torchrun/job7/.hydra/overrides.yaml", "w").write("[]\n")
        assert run_dir_args(["a=1"], {**env, "TORCHELASTIC_RESTART_COUNT": "1"})[-1] == "resume=outputs/torchrun/job7"
        assert run_dir_args(["a=1"], env)[-1] == "hydra.run.dir=outputs/torchrun/job7"  # first attempt: cli refuses it
    finally:
        os.chdir(cwd)
    assert rank_args(["a=1"], {"RANK": "0", "WORLD_SIZE": "2"}) == ["a=1"]
    assert rank_args(["a=1"], {"RANK": "1", "WORLD_SIZE": "2"}) == [
        "a=1", "hydra.output_subdir=null", "hydra/job_logging=rich_console"]
    assert rank_args(["-m", "hydra/job_logging=none"], {"RANK": "1", "WORLD_SIZE": "2"}) == [
        "-m", "hydra/job_logging=none", "hydra.output_subdir=null", "~hydra.callbacks.compare"]


# ---------------------------------------------------------------- two ranks, forked
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed._COMM = None
    comm = distributed.init()
    try:
        fn(comm, *args)
    finally:
        distributed.shutdown(True)


def run_ranks(fn, *args, world=2):
    """Run `fn(comm, *args)` on `world` forked gloo ranks; a failing assert fails the test."""
    import torch.multiprocessing as mp

    mp.start_processes(_rank_main, args=(world, _free_port(), fn, args), nprocs=world, start_method="fork")


def _setup(steps_taken: int = 1):
    """Tiny fp64 full fine-tuning (embeddings and norms are fallback parameters), AdamW with state."""
    model = tiny_model("llama", torch.float64, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for s in range(steps_taken):  # non-zero m, v and step count
        b = random_batch(4, seed=100 + s)
        out = model(**b)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    pool, target = random_batch(7, seed=1, vocab=MARK), random_batch(3, seed=2, vocab=MARK)
    pool["input_ids"][5, 2] = MARK
    emb = model.get_input_embeddings()
    emb.register_forward_hook(lambda m, a, out: out.masked_fill((a[0] == MARK)[..., None], float("nan")))
    return model, opt, pool, target


KW = dict(metric="adam", adam_q="pool", aux_metrics=("adam2",))
NEEDS = EngineNeeds(**KW)


def engine_cfg(projection_dim=None, projection="countsketch") -> dict:
    return {"grad_path": "auto", "projection_dim": projection_dim, "projection": projection,
            "micro_batch_size": None, "loss_chunk_tokens": 4096}
PICKS = ([0, 2, 6, 3], [1.5, 0.5, 1.0, 1.0])  # positions on both ranks' shards (rank 0: 0-3, rank 1: 4-6)
PICKS_R0 = ([1, 2], [0.7, 1.3])  # rank 1 has no selected row: it still joins the all-reduce


def _one_process(picks, proj):
    model, opt, pool, target = _setup()
    eng = build_engine(engine_cfg(**proj), NEEDS, model, opt, comm=Comm(), projection_seed=5)
    s = eng.score(pool, target, extra_dirs=("momentum", "decay"), k=3)
    eng.apply_update(*picks)
    return s, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_ranks(comm, picks, proj, want_scores, want_grads):
    model, opt, pool, target = _setup()
    eng = build_engine(engine_cfg(**proj), NEEDS, model, opt, comm=comm, projection_seed=5)
    assert isinstance(eng, ShardedEngine)
    s = eng.score(pool, target, extra_dirs=("momentum", "decay"), k=3)
    assert s.finite.tolist() == want_scores.finite.tolist() and not bool(s.finite[5])
    for key in ("K", "b", "dir_gram", "sq_norms", "losses", "target_losses"):
        a, b = getattr(s, key), getattr(want_scores, key)
        ok = torch.isfinite(b)
        assert torch.equal(ok, torch.isfinite(a)), key
        assert torch.allclose(a[ok], b[ok], rtol=1e-10, atol=1e-13), key
    assert s.y2 == pytest.approx(want_scores.y2, rel=1e-10)
    assert s.poor_frac == pytest.approx(want_scores.poor_frac, rel=1e-12)
    for key in ("b", "sq_norms"):
        assert torch.allclose(s.aux["adam2"][key], want_scores.aux["adam2"][key], rtol=1e-10, atol=1e-13)
    eng.apply_update(*picks)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == want_grads.keys()
    for n, g in grads.items():
        assert torch.allclose(g, want_grads[n], rtol=1e-10, atol=1e-14), n


@pytest.mark.parametrize("proj", [{}, {"projection_dim": 600}, {"projection_dim": 600, "projection": "factored"}],
                         ids=["exact", "countsketch", "factored"])
def test_two_ranks_equal_one_process(proj):
    for picks in (PICKS, PICKS_R0):
        scores, grads = _one_process(picks, proj)
        assert not any(torch.isnan(g).any() for g in grads.values())  # the NaN row never trains
        run_ranks(_check_ranks, picks, proj, scores, grads)


def test_one_process_sharded_engine_is_the_plain_engine():
    model, opt, pool, target = _setup()
    plain = GradEngine(model, opt, **KW).score(pool, target, extra_dirs=("momentum",), k=3)
    model, opt, pool, target = _setup()
    sharded = ShardedEngine(model, opt, comm=Comm(), **KW).score(pool, target, extra_dirs=("momentum",), k=3)
    ok = plain.finite
    assert torch.equal(plain.K[ok][:, ok], sharded.K[ok][:, ok]) and torch.equal(plain.b[ok], sharded.b[ok])


def _reduce(comm):
    a, b, c = (torch.nn.Parameter(torch.zeros(3, dtype=torch.float64)) for _ in range(3))
    a.grad = torch.full((3,), 10.0, dtype=torch.float64)  # accumulated before: kept, not summed over ranks
    with comm.reduce_grads([a, b, c]):
        a.grad = torch.full((3,), float(comm.rank + 1), dtype=torch.float64)
        if comm.rank == 1:
            b.grad = torch.ones(3, dtype=torch.float64)
    assert a.grad.tolist() == [13.0] * 3 and b.grad.tolist() == [1.0] * 3 and c.grad is None
    a.grad = None
    with comm.reduce_grads([a, b, c], mean=True):  # fwsel.hf: each rank's own update, averaged as DDP does
        a.grad = torch.full((3,), float(comm.rank + 1), dtype=torch.float64)
        if comm.rank == 1:
            b.grad = torch.full((3,), 4.0, dtype=torch.float64)
    assert a.grad.tolist() == [1.5] * 3 and b.grad.tolist() == [3.0] * 3  # b: 1.0 kept from before + 4 / 2
    assert c.grad is None  # no rank touched it: no zero .grad for AdamW to decay
    rows = comm.gather_rows(torch.arange(comm.counts(5)[comm.rank]) + comm.shard(5).start, 5)
    assert rows.tolist() == list(range(5))
    mask = comm.gather_rows(torch.tensor([comm.rank == 1] * comm.counts(3)[comm.rank]), 3)
    assert mask.dtype == torch.bool and mask.tolist() == [False, False, True]
    assert comm.agree(comm.rank == 1) and not comm.agree(False)
    assert comm.broadcast_object({"r": comm.rank}) == {"r": 0}


def test_collectives_on_two_ranks():
    run_ranks(_reduce)


# ---------------------------------------------------------------- the projection (approximate)
def _k_error(kind, dim, seed=1):
    """Relative error of the sketched K against the exact one (finite rows), and cos of b."""
    model, opt, pool, target = _setup()
    exact = GradEngine(model, opt, metric="adam").score(pool, target, k=3)
    ok = exact.finite
    model, opt, pool, target = _setup()
    s = ShardedEngine(model, opt, "adam", comm=Comm(), projection_dim=dim, projection=kind,
                      projection_seed=seed).score(pool, target, k=3)
    Ke, Ks = exact.K[ok][:, ok], s.K[ok][:, ok]
    cos = torch.nn.functional.cosine_similarity(s.b[ok, 0], exact.b[ok, 0], dim=0)
    return float(torch.linalg.norm(Ks - Ke) / torch.linalg.norm(Ke)), float(cos)


def test_projection_preserves_K_and_its_error_shrinks_with_dim():
    # these random gradients are nearly orthogonal to g_T (|cos| < 0.03): b is far harder than K
    cs = [_k_error("countsketch", d) for d in (256, 4096, 16384)]
    assert cs[0][0] > cs[1][0] > cs[2][0] and cs[1][0] < 0.08 and cs[2][0] < 0.04, cs
    assert cs[2][1] > 0.8, cs
    fa = [_k_error("factored", d) for d in (256, 4096, 10**9)]  # the last: every block whole, exact
    assert fa[0][0] > fa[1][0] > 0.05 > 1e-10 > fa[2][0] and fa[2][1] > 1 - 1e-10, fa


@pytest.mark.parametrize("kind", [CountSketch, Projector])
def test_projection_is_unbiased(kind):
    torch.manual_seed(0)
    blk = type("B", (), {"param": torch.zeros(6, 40), "start": 0, "end": 240})()
    G = torch.randn(2, 240, dtype=torch.float64)
    est = torch.stack([(lambda F: F[0] @ F[1])(kind([blk], 12, s, "cpu", torch.float64)(G)) for s in range(3000)])
    assert float(est.mean()) == pytest.approx(float(G[0] @ G[1]), abs=4 * float(est.std()) / 3000**0.5)


def test_pool_q_from_summed_statistics_is_pool_q():
    """What the ranks all-reduce (sums of g and g*g, the finite count) gives the one-process pool q."""
    Gp = torch.randn(9, 50, dtype=torch.float64)
    Gp[4] = 0  # a dropped (non-finite) row: zero, left out of the count
    want = pool_q(Gp, 1, 3)
    got = summed_pool_q(Gp.sum(0), (Gp * Gp).sum(0), 8, 3)
    assert torch.allclose(got, want, rtol=1e-9)


def test_reduce_grads_gives_the_earlier_gradients_back_when_the_block_fails():
    """A failing update inside the block (an out-of-memory error, say) must not lose the gradients
    accumulated before it; nothing is all-reduced (the block never finished)."""
    a = torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.ones(2)
    kept = a.grad
    with pytest.raises(RuntimeError, match="boom"):
        with Comm(rank=0, world=2).reduce_grads([a]):
            a.grad = torch.full((2,), 5.0)
            raise RuntimeError("boom")
    assert a.grad is kept and a.grad.tolist() == [1.0, 1.0]
