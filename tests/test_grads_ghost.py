"""Token-Gram ("ghost") products on wide layers with short rows, against explicit per-sample gradients."""

import logging

import pytest
import torch
from test_grads import relerr
from test_grads_update import IDX, W, assert_update_matches_autograd

from fwsel.grads import GradEngine, sequence_losses
from fwsel.grads.ghost import GhostOps, prefers_ghost, rank1, rank1_sampled, row_groups, token_gram
from fwsel.grads.metric import adam_diag, adam_diag_sample, group_of, sample_columns, spread

from helpers_models import captured_params, oracle_grads, oracle_metric, random_batch, tiny_model, with_lora

F64, F32 = torch.float64, torch.float32
WIDE = dict(hidden_size=256, intermediate_size=512)  # T <= 8 rows: every Linear prefers the token Gram


def wide(dtype=F64, steps=2, lora=False, eps=1e-8):
    model = tiny_model(dtype=dtype, **WIDE)
    if lora:
        model = with_lora(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, eps=eps)
    for s in range(steps):
        opt.zero_grad()
        sequence_losses(model, random_batch(4, seed=200 + s, max_len=8)).losses.sum().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def batches():
    return random_batch(6, seed=1, max_len=8), random_batch(3, seed=2, max_len=7)


def oracle(model, opt, pool, target, metric, adam_q="pool", k=3):
    params = captured_params(model)
    G, losses = oracle_grads(model, pool, params)
    gT = oracle_grads(model, target, params)[0].mean(0)
    M = oracle_metric(opt, params, G, metric, adam_q, k)
    m = torch.cat([opt.state[p]["exp_avg"].reshape(-1) for p in params]).double()
    theta = torch.cat([p.detach().reshape(-1) for p in params]).double()
    return G, gT, M, torch.stack([gT, m, theta / M]), losses


@pytest.mark.parametrize("dtype,opts", [(F64, {"micro_batch_size": 4, "loss_chunk_tokens": 5, "ghost_chunk_tokens": 7}),
                                        (F32, {})])
def test_token_gram_products_match_the_oracle(dtype, opts):
    model, opt = wide(dtype)
    pool, target = batches()
    engine = GradEngine(model, opt, "sgd", **opts)
    sc = engine.score(pool, target, extra_dirs=("momentum", "decay"), k=3)
    assert all(s.ghost for s in engine.cap.sites) and sc.ghost["layers"] == len(engine.cap.sites)
    assert engine.cap.buf.shape[1] == 0  # no per-sample gradient was materialised

    G, gT, M, U, losses = oracle(model, opt, pool, target, "sgd")
    tol = 1e-10 if dtype == F64 else 1e-5
    assert relerr(sc.K, G @ G.T) <= tol
    for c in range(3):
        assert relerr(sc.b[:, c], G @ U[c]) <= tol
    assert relerr(sc.dir_gram, U @ U.T) <= tol and abs(sc.y2 - float(gT @ gT)) <= tol * sc.y2
    assert relerr(sc.sq_norms, (G * G).sum(1)) <= tol and relerr(sc.losses, losses) <= tol


def test_adam_b_stays_exact_and_aux_norms_use_the_rank1_factor(caplog):
    """Forced ghost in adam: b, y2, dir_gram from the exact D (adam_q=state); K is rank-1 approximate."""
    model, opt = wide()
    pool, target = batches()
    engine = GradEngine(model, opt, "adam", adam_q="pool", grad_path="ghost", aux_metrics=("sgd", "adam2"))
    with caplog.at_level(logging.WARNING, logger="fwsel.grads.engine"):
        sc = engine.score(pool, target, extra_dirs=("momentum", "decay"), k=3)
    assert "rank-1" in caplog.text and "adam_q=state" in caplog.text
    assert sc.ghost["adam_q"] == "state" and 0 < sc.ghost["rank1_err_max"] < 1

    G, gT, M, U, _ = oracle(model, opt, pool, target, "adam", "state")
    for c in range(3):
        assert relerr(sc.b[:, c], (G * M) @ U[c]) <= 1e-10
    assert relerr(sc.dir_gram, (U * M) @ U.T) <= 1e-10
    assert relerr(sc.aux["sgd"]["sq_norms"], (G * G).sum(1)) <= 1e-10  # sgd: exact
    M2 = oracle_metric(opt, captured_params(model), G, "adam2", "state")
    assert relerr(sc.aux["adam2"]["b"], (G * M2) @ gT) <= 1e-10
    exact = (G * M) @ G.T
    assert 1e-8 < relerr(sc.K, exact) < 0.5  # approximate, but the same Gram to first order
    assert torch.allclose(sc.sq_norms, sc.K.diagonal())


def test_auto_picks_token_gram_only_where_cheaper_and_exact():
    pool, target = batches()
    model, opt = wide()
    picks = lambda eng: [s.ghost for s in eng.cap.sites]  # noqa: E731
    eng = GradEngine(model, opt, "sgd")
    eng.score(pool, target)
    assert all(picks(eng))
    eng = GradEngine(model, opt, "adam")  # adam: token Gram would approximate D, auto keeps it exact
    eng.score(pool, target)
    assert not any(picks(eng))
    eng = GradEngine(model, opt, "sgd", grad_path="materialize")
    eng.score(pool, target)
    assert not any(picks(eng))
    lora, lopt = wide(lora=True, steps=0)
    eng = GradEngine(lora, lopt, "sgd")
    eng.score(pool, target)
    assert not any(picks(eng))  # LoRA: r (d_in + d_out) per row is far below T^2 (d_in + d_out)
    narrow = tiny_model()  # width 32, rows of 20-30 tokens: materialising is cheaper
    eng = GradEngine(narrow, None, "sgd")
    eng.score(random_batch(6, seed=1, min_len=20, max_len=30), random_batch(3, seed=2, min_len=20, max_len=30))
    assert not any(picks(eng))
    assert prefers_ghost(16, 16, 1024, 1024) and not prefers_ghost(16, 1024, 1024, 1024)


def test_chunking_invariance():
    model, opt = wide()
    pool, target = batches()
    ref = GradEngine(model, opt, "sgd", aux_metrics=("sgd",), grad_path="ghost").score(pool, target, ("momentum",))
    for opts in ({"ghost_chunk_tokens": 1}, {"ghost_chunk_tokens": 5, "micro_batch_size": 2},
                 {"ghost_chunk_tokens": 64, "loss_chunk_tokens": 3}):
        sc = GradEngine(model, opt, "sgd", aux_metrics=("sgd",), grad_path="ghost", **opts).score(
            pool, target, ("momentum",))
        assert relerr(sc.K, ref.K) <= 1e-12 and relerr(sc.b, ref.b) <= 1e-12
        assert relerr(sc.aux["sgd"]["sq_norms"], ref.sq_norms) <= 1e-12


def test_rank1_is_exact_when_D_has_rank_1():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(7, generator=g, dtype=F64) + 0.1, torch.rand(5, generator=g, dtype=F64) + 0.1
    u, c, err = rank1(torch.outer(a, b) * 1e4)
    assert err <= 1e-6 and relerr(torch.outer(u, c), torch.outer(a, b) * 1e4) <= 1e-12
    assert rank1(torch.rand(7, 5, generator=g, dtype=F64))[2] > 1e-3

    # eps = 0 and a rank-1 second moment: v_bar is proportional to v, so D = 1/sqrt(v_bar) has rank 1
    model, opt = wide(steps=0, eps=0.0)
    for p in [p for p in model.parameters() if p.requires_grad]:
        shape = p.shape if p.dim() == 2 else (p.shape[0], 1)
        a, b = torch.rand(shape[0], generator=g, dtype=F64) + 0.1, torch.rand(shape[1], generator=g, dtype=F64)
        v = torch.outer(a, b)
        opt.state[p] = {"step": torch.tensor(3.0), "exp_avg": torch.randn(p.shape, generator=g, dtype=F64) * 1e-3,
                        "exp_avg_sq": v.reshape(p.shape) * 1e-6}
    pool, target = batches()
    for metric in ("adam", "adam2"):
        sc = GradEngine(model, opt, metric, adam_q="state", grad_path="ghost").score(pool, target, k=3)
        G, gT, M, U, _ = oracle(model, opt, pool, target, metric, "state")
        assert sc.ghost["rank1_err_max"] <= 1e-6  # a diagnostic; K below is the exactness check
        assert relerr(sc.K, (G * M) @ G.T) <= 1e-10 and relerr(sc.b[:, 0], (G * M) @ gT) <= 1e-10


def test_rank1_from_a_sample_of_rows_and_columns():
    """The wide-layer fit reads ~64 rows and ~64 columns (runs of 8): exact for a rank-1 M, near
    the full fit otherwise, and the sampled D equals the full D there."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(300, generator=g, dtype=F64) + 0.1, torch.rand(200, generator=g, dtype=F64) + 0.1
    M = torch.outer(a, b) * 1e3
    rows, (Mc, cols) = spread(300, 64), sample_columns(M, 64)
    assert rows.numel() == 64 and cols.numel() == 64 and torch.equal(Mc, M[:, cols])
    assert torch.equal(cols[:8], torch.arange(8)) and int(cols[-1]) == 199  # whole runs, first to last
    u, c, err = rank1_sampled(M[rows], Mc, rows, cols)
    assert err <= 1e-6 and relerr(torch.outer(u, c), M) <= 1e-12
    noisy = M * (1 + 0.3 * torch.rand(300, 200, generator=g, dtype=F64))
    u1, c1, e1 = rank1(noisy)
    u2, c2, e2 = rank1_sampled(noisy[rows], noisy[:, cols], rows, cols)
    assert relerr(torch.outer(u2, c2), torch.outer(u1, c1)) < 0.05 and abs(e2 - e1) < 0.05
    full = rank1_sampled(noisy, noisy, None, None)
    assert all(relerr(x, y) <= 1e-12 for x, y in zip(full[:2], (u1, c1)))

    model, opt = wide()
    p = model.model.layers[0].mlp.gate_proj.weight  # 512 x 256: both sampled
    Dr, Dc, rows, cols, poor = adam_diag_sample(p, opt, group_of(opt), p.detach(), "state")
    D = adam_diag(p, opt, group_of(opt), p.detach().reshape(-1), "state")[0].view(p.shape)
    assert Dr.shape == (64, 256) and Dc.shape == (512, 64)
    assert torch.equal(Dr, D[rows]) and torch.equal(Dc, D[:, cols])


@pytest.mark.parametrize("metric", ["sgd", "adam"])
def test_update_on_token_gram_layers_equals_autograd(metric):
    model, opt = wide()
    pool, target = batches()
    eng = assert_update_matches_autograd(model, opt, metric, pool, target, IDX, W, grad_path="ghost")
    assert eng.cap.fallback and not eng._ghost  # freed after the update


def test_non_finite_row_is_zeroed_on_token_gram_layers():
    model, opt = wide(steps=0)
    with torch.no_grad():
        model.model.embed_tokens.weight[63] = float("inf")
    pool, target = random_batch(5, seed=7, vocab=63, max_len=8), random_batch(2, seed=8, vocab=63, max_len=8)
    pool["input_ids"][2, 1] = 63
    sc = GradEngine(model, opt, "sgd", grad_path="ghost").score(pool, target)
    keep = [0, 1, 3, 4]
    assert sc.finite.tolist() == [True, True, False, True, True] and (sc.K[2] == 0).all()
    G, _ = oracle_grads(model, {k: v[keep] for k, v in pool.items()}, captured_params(model))
    assert relerr(sc.K[keep][:, keep], G @ G.T) <= 1e-10


def test_token_gram_under_gradient_checkpointing_and_chunked_loss():
    model, opt = wide(steps=0)
    pool, target = batches()
    ref = GradEngine(model, opt, "sgd", grad_path="ghost").score(pool, target, ("momentum",))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sc = GradEngine(model, opt, "sgd", grad_path="ghost", loss_chunk_tokens=4).score(pool, target, ("momentum",))
    assert model.is_gradient_checkpointing
    assert relerr(sc.K, ref.K) <= 1e-12 and relerr(sc.b, ref.b) <= 1e-12


@pytest.mark.parametrize("lens,chunk", [([8] * 15 + [256], 64), ([3, 0, 5, 7, 1, 9], 4), ([0, 0, 4], 2)])
def test_sq_norms_in_row_groups_equal_the_token_gram_diagonal(lens, chunk):
    """One long row among short ones: the squared norms come in groups whose padded size stays
    within `chunk` tokens (or one row), and equal the diagonal of the full token Gram."""
    torch.manual_seed(0)
    rows = torch.cat([torch.full((c,), i) for i, c in enumerate(lens)]).long()
    X, E = torch.randn(len(rows), 5, dtype=torch.float64), torch.randn(len(rows), 7, dtype=torch.float64)
    got = GhostOps(X, E, rows, len(lens), len(lens), chunk).sq_norms()
    assert relerr(got, token_gram(X, E, rows, len(lens), 10**6).diagonal()) <= 1e-12
    start = 0
    for end, _ in row_groups(lens, chunk):
        assert end - start == 1 or (end - start) * max(lens[start:end]) <= chunk
        start = end
    assert start == len(lens)
