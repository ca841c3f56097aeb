"""GradEngine products against explicit per-sample gradients (batch-size-1 loop, own D code)."""

import pytest
import torch

from fwsel.grads import GradEngine, sequence_losses

from helpers_models import captured_params, oracle_grads, oracle_metric, random_batch, tiny_model, with_lora

F64, F32 = torch.float64, torch.float32


def relerr(a, ref):
    return float((a.double() - ref).abs().max() / ref.abs().max())


def trained(setting="lora", dtype=F64, kind="llama", steps=3, seed=0, **lora):
    """A tiny model after `steps` real AdamW steps (so Adam state is non-trivial)."""
    model = tiny_model(kind, dtype=dtype, seed=seed, tie=setting == "full_tied")
    if setting == "lora":
        model = with_lora(model, **lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for s in range(steps):
        opt.zero_grad()
        sequence_losses(model, random_batch(4, seed=100 + s)).losses.sum().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


CASES = [  # setting, metric, dtype, extra engine settings, model kind
    ("lora", "sgd", F64, {}, "llama"),
    ("lora", "adam", F64, {}, "llama"),
    ("lora", "adam2", F64, {"micro_batch_size": 4}, "llama"),
    ("lora", "adam", F64, {"adam_q": "state"}, "qwen3"),
    ("full", "sgd", F64, {"micro_batch_size": 4, "loss_chunk_tokens": 5}, "llama"),
    ("full", "adam", F64, {"adam_q": "taylor"}, "llama"),
    ("full", "adam2", F64, {"loss_chunk_tokens": 7}, "qwen3"),
    ("full_tied", "adam", F64, {}, "llama"),
    ("lora", "adam", F32, {"micro_batch_size": 2}, "llama"),
    ("full", "adam", F32, {"loss_chunk_tokens": 5}, "llama"),
]


@pytest.mark.parametrize("setting,metric,dtype,opts,kind", CASES)
def test_products_match_oracle(setting, metric, dtype, opts, kind):
    model, opt = trained(setting, dtype, kind)
    pool, target = random_batch(6, seed=1), random_batch(3, seed=2, max_len=15)  # different widths
    k = 3
    engine = GradEngine(model, opt, metric, aux_metrics=("sgd", "adam2"), **opts)
    sc = engine.score(pool, target, extra_dirs=("momentum", "decay"), k=k)

    params = captured_params(model)
    G, losses = oracle_grads(model, pool, params)
    GT, target_losses = oracle_grads(model, target, params)
    gT = GT.mean(0)
    q = opts.get("adam_q", "pool")
    M = oracle_metric(opt, params, G, metric, q, k)
    m = torch.cat([opt.state[p]["exp_avg"].reshape(-1) for p in params]).double()
    theta = torch.cat([p.detach().reshape(-1) for p in params]).double()
    U = torch.stack([gT, m, theta / M])
    tol = 1e-10 if dtype == F64 else 1e-5

    assert relerr(sc.K, (G * M) @ G.T) <= tol
    for c in range(3):
        assert relerr(sc.b[:, c], (G * M) @ U[c]) <= tol
    assert relerr(sc.dir_gram, (U * M) @ U.T) <= tol
    assert abs(sc.y2 - float(gT @ (M * gT))) <= tol * abs(sc.y2)
    assert relerr(sc.sq_norms, ((G * G) * M).sum(1)) <= tol
    assert relerr(sc.losses, losses) <= tol and relerr(sc.target_losses, target_losses) <= tol
    assert sc.finite.all() and sc.K.dtype == F64 and sc.b.shape == (6, 3)
    for a in ("sgd", "adam2"):
        Ma = oracle_metric(opt, params, G, a, q, k)
        assert relerr(sc.aux[a]["b"], (G * Ma) @ gT) <= tol
        assert relerr(sc.aux[a]["sq_norms"], ((G * G) * Ma).sum(1)) <= tol
    assert 0.0 <= sc.poor_frac <= 1.0  # an adam metric is among main + aux
    engine.close()


def test_full_finetuning_leaves_embeddings_and_norms_out():
    model, opt = trained("full", steps=0)
    engine = GradEngine(model, opt, "sgd")
    names = {b.name for b in engine.cap.blocks}
    assert "lm_head.weight" in names and not any("embed" in n or "norm" in n for n in names)
    assert {id(p) for p in engine.cap.fallback} == {
        id(p) for n, p in model.named_parameters() if "embed" in n or "norm" in n}
    tied, opt = trained("full_tied", steps=0)
    assert "lm_head.weight" not in {b.name for b in GradEngine(tied, opt).cap.blocks}


def test_padding_does_not_leak():
    """A row's products do not depend on how far it is padded or who shares its batch."""
    model, opt = trained("lora", steps=0)
    pool, target = random_batch(4, seed=3), random_batch(2, seed=4)
    a = GradEngine(model, opt, "sgd").score(pool, target)
    b = GradEngine(model, opt, "sgd", micro_batch_size=1).score(random_batch(4, seed=3, width=15), target)
    assert relerr(a.K, b.K) <= 1e-12 and relerr(a.b, b.b) <= 1e-12
    assert a.poor_frac is None and a.aux == {}  # sgd alone computes no Adam diagonal


def test_pool_q_is_finite_where_lora_A_has_no_second_moment():
    """Step 2 of a LoRA run: lora_B = 0 at init made every lora_A gradient 0 at step 1."""
    model, opt = trained("lora", steps=1, random_b=False)
    v_A = [opt.state[p]["exp_avg_sq"] for n, p in model.named_parameters() if "lora_A" in n]
    assert all(float(v.abs().max()) == 0.0 for v in v_A)
    pool, target = random_batch(8, seed=5), random_batch(4, seed=6)
    pool_sc = GradEngine(model, opt, "adam", adam_q="pool").score(pool, target, k=2)
    taylor_sc = GradEngine(model, opt, "adam", adam_q="taylor").score(pool, target, k=2)
    assert torch.isfinite(pool_sc.K).all() and torch.isfinite(pool_sc.b).all()
    # with q = 0 the v = 0 coordinates get D = 1/eps and swamp the geometry; pool keeps it O(1/|g|)
    assert pool_sc.K.trace() < 1e-3 * taylor_sc.K.trace()
    assert taylor_sc.poor_frac == 0.0 and pool_sc.poor_frac > 0.3


def test_non_finite_candidate_is_zeroed_and_skipped():
    model, opt = trained("lora", steps=0)
    with torch.no_grad():
        model.get_base_model().model.embed_tokens.weight[63] = float("inf")
    pool, target = random_batch(5, seed=7, vocab=63), random_batch(2, seed=8, vocab=63)
    pool["input_ids"][2, 1] = 63  # row 2 becomes NaN, the others must not notice
    engine = GradEngine(model, opt, "sgd")
    sc = engine.score(pool, target)
    assert sc.finite.tolist() == [True, True, False, True, True]
    assert torch.isfinite(sc.K).all() and (sc.K[2] == 0).all() and (sc.b[2] == 0).all()
    params = captured_params(model)
    keep = [0, 1, 3, 4]
    G, _ = oracle_grads(model, {k: v[keep] for k, v in pool.items()}, params)
    assert relerr(sc.K[keep][:, keep], G @ G.T) <= 1e-10
    with pytest.warns(UserWarning, match="non-finite"):
        engine.apply_update([1, 2], [1.0, 1.0])
    assert all(torch.isfinite(p.grad).all() for p in params)
