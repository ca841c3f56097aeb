"""FTW v2 options: copy-safe ridge, binding stops, in-or-out weights, tempering, scale-free
redundancy, and the re-formed AdamW metric (clip-aware and self-consistent q)."""

import numpy as np
import pytest
import torch

from fwsel.grads import GradEngine
from fwsel.selectors.adam_step import AdamRegram, clip_factor
from fwsel.selectors.base import Pool
from fwsel.selectors.ftw import FTW
from fwsel.selectors.omp import explained, omp, prune_small, ridge_lambda

from helpers_models import captured_params, oracle_grads, oracle_metric, random_batch, tiny_model


def copy_pool(scale: float, n_copies: int = 3, seed: int = 0):
    """Gaussian rows; row 0 is aligned with the target and has norm `scale` x the pool RMS;
    `n_copies` exact copies of it are appended."""
    rng = np.random.default_rng(seed)
    p = 40
    y = rng.normal(size=p)
    Phi = rng.normal(size=(12, p))
    Phi[0] = scale * np.sqrt(p) * (0.8 * y / np.linalg.norm(y) + 0.6 * Phi[0] / np.linalg.norm(Phi[0]))
    Phi = np.vstack([Phi, np.repeat(Phi[:1], n_copies, 0)])
    return Phi @ Phi.T, Phi @ y, float(y @ y), list(range(12, 12 + n_copies))


@pytest.mark.parametrize("scale", [1.0, 0.03])
def test_copies_of_small_rows_stay_out_with_the_per_row_ridge(scale):
    K, b, y2, copies = copy_pool(scale)
    res = omp(K, b, y2, 4, ridge_lambda(K, 1e-4, "self"), 1e-3)
    assert 0 in res.support and not set(copies) & set(res.support)


def test_pool_ridge_lets_copies_of_small_rows_back_in():
    """The failure the per-row ridge fixes: lam_r = rho tr(K)/N is large next to a small row's K_ii."""
    K, b, y2, copies = copy_pool(0.03)
    res = omp(K, b, y2, 4, ridge_lambda(K, 1e-4, "pool"), 1e-3)
    assert set(copies) & set(res.support)  # a copy took a slot


def random_problem(seed):
    rng = np.random.default_rng(seed)
    Phi = rng.normal(size=(24, 30)) * rng.lognormal(0, 1, size=(24, 1))
    y = rng.normal(size=30)
    return Phi @ Phi.T, Phi @ y, float(y @ y)


def test_min_gain_stops_early_and_each_accepted_row_gains_enough():
    for seed in range(20):
        K, b, y2 = random_problem(seed)
        lam = ridge_lambda(K, 1e-4, "self")
        full = omp(K, b, y2, 8, lam, 1e-3)
        res = omp(K, b, y2, 8, lam, 1e-3, min_gain=0.05)
        assert len(res.support) <= len(full.support)
        if res.stop == "gain":  # the next addition would gain < 0.05: check by doing it
            e = explained(K, b, y2, res.support, res.u)
            assert e <= explained(K, b, y2, full.support, full.u) + 1e-12
        # every prefix step gained at least min_gain: rerunning with k = |S| - 1 explains >= 0.05 less
        if len(res.support) > 1:
            shorter = omp(K, b, y2, len(res.support) - 1, lam, 1e-3, min_gain=0.05)
            assert (
                explained(K, b, y2, res.support, res.u) - explained(K, b, y2, shorter.support, shorter.u) >= 0.05 - 1e-9
            )


def test_w_min_in_or_out_leaves_no_small_weight():
    hit = 0
    for seed in range(20):
        K, b, y2 = random_problem(seed)
        lam = ridge_lambda(K, 1e-4, "pool")
        res = omp(K, b, y2, 8, lam, 1e-3)
        S, u = prune_small(K, b, lam, res.support, res.u, 0.5)
        w = len(S) * u / u.sum()
        assert np.all(w >= 0.5 - 1e-12) and set(S) <= set(res.support)
        hit += len(S) < len(res.support)
    assert hit > 0  # the rule bound on some problems


def scores_from(K, b, y2):
    N = len(b)
    return type(
        "S",
        (),
        dict(
            K=torch.tensor(K),
            b=torch.tensor(b)[:, None],
            y2=y2,
            sq_norms=torch.tensor(np.diag(K)),
            finite=torch.ones(N, dtype=torch.bool),
            poor_frac=None,
            aux={},
        ),
    )()


def select(sel, K, b, y2, k=8):
    pool = Pool([{"id": i} for i in range(len(b))], k, 5, 1e-3, torch.Generator().manual_seed(0), scores_from(K, b, y2))
    return sel.select(pool)


def test_temper_flattens_weights_keeping_order_and_support():
    K, b, y2 = random_problem(3)
    base = select(FTW(name="f", log_overlap_less=False), K, b, y2)
    flat = select(FTW(name="f", log_overlap_less=False, temper=0.5), K, b, y2)
    assert flat.indices == base.indices
    assert np.argsort(flat.weights).tolist() == np.argsort(base.weights).tolist()
    assert flat.weights.max() / flat.weights.min() == pytest.approx(np.sqrt(base.weights.max() / base.weights.min()))


def test_redundancy_sets_a_scale_free_greedy_penalty():
    K, b, y2 = random_problem(4)
    sel = FTW(name="f", filter="greedy", redundancy=0.3, log_overlap_less=False)
    a = select(sel, K, b, y2)
    scaled = select(sel, 7.0 * K, 7.0 * b, 7.0 * y2)  # a global gradient scale (LR, clip, LoRA scaling)
    assert scaled.indices == a.indices
    T = np.argsort(-b, kind="stable")[:8]
    c = a.diagnostics["greedy_scale"]
    assert 0.5 * c * K[np.ix_(T, T)].sum() == pytest.approx(0.3 * b[T].clip(0).sum())
    none = select(FTW(name="f", filter="greedy", redundancy=0.0, log_overlap_less=False), K, b, y2)
    assert sorted(none.indices) == sorted(T.tolist())  # no penalty: top-k by b


def test_new_keys_validate():
    for kw in (
        dict(temper=0.0),
        dict(redundancy=0.3),
        dict(clip_q="off"),
        dict(self_q=3),
        dict(self_q=1, geometry="sgd"),
        dict(objective="step", adam_q="state"),
        dict(ridge_mode="x"),
        dict(w_min=-1),
    ):
        with pytest.raises(ValueError, match="selector"):
            FTW(name="f", **kw)
    # the default clip_q=prev only scales q_pool: other geometries run without it
    assert FTW(name="f").clip_q == "prev" and FTW(name="f", geometry="sgd").clip_q == "none"
    assert FTW(name="f", adam_q="state").clip_q == FTW(name="f", momentum_correction=True).clip_q == "none"


# ---- the re-formed metric against explicit per-sample gradients and METHOD section 4 ----


@pytest.fixture(scope="module")
def stepped():
    """A full-fine-tuning tiny Llama after two AdamW steps (v non-zero), float64."""
    model = tiny_model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for s in range(2):
        loss = model(**random_batch(4, seed=30 + s)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_regram_matches_the_engine_and_an_explicit_oracle(stepped):
    model, opt = stepped
    pool, target = random_batch(10, seed=1), random_batch(3, seed=2)
    eng = GradEngine(model, opt, metric="adam", grad_path="materialize")
    try:
        scores = eng.score(pool, target, k=4)
        rg = AdamRegram(eng, opt, 4)
        K, b, y2 = rg.products(rg.q_pool)  # the engine's own metric: the same products
        np.testing.assert_allclose(K, scores.K.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(b, scores.b[:, 0].numpy(), rtol=1e-10, atol=1e-12)
        # a clip factor c: D from b2 v + (1-b2) c^2 q, against the oracle metric with q scaled
        params = captured_params(model)
        G, _ = oracle_grads(model, pool, params)
        GT, _ = oracle_grads(model, target, params)
        c = 0.3
        K2, b2_, _ = rg.products(c * c * rg.q_pool)
        D = oracle_metric(opt, params, G * c, "adam", k=4)  # q scales with c^2 when every g_i does
        np.testing.assert_allclose(K2, (G * D) @ G.T, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(b2_, (G * D) @ GT.mean(0), rtol=1e-8, atol=1e-12)
        clipped = eng.score(pool, target, k=4, q_scale=c * c)  # clip_q=prev: the engine scales q itself
        np.testing.assert_allclose(clipped.K.numpy(), (G * D) @ G.T, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(clipped.b[:, 0].numpy(), (G * D) @ GT.mean(0), rtol=1e-8, atol=1e-12)
        rg = AdamRegram(eng, opt, 4)  # the rows of the last scoring pass
        w = np.array([2.0, 0.5, 1.5])
        np.testing.assert_allclose(
            rg.update([1, 4, 7], w).numpy(), (torch.tensor(w) @ G[[1, 4, 7]]).numpy() / 3, rtol=1e-10, atol=1e-14
        )
    finally:
        eng.close()


def test_regram_refuses_amsgrad_as_the_engine_does(stepped):
    """The re-formed metric is the engine's formula, checks included: AMSGrad's max(v) is not modelled."""
    model, opt = stepped
    eng = GradEngine(model, opt, metric="adam", grad_path="materialize")
    try:
        eng.score(random_batch(6, seed=1), random_batch(3, seed=2), k=2)
        rg = AdamRegram(eng, opt, 2)
        for g in opt.param_groups:
            g["amsgrad"] = True
        with pytest.raises(ValueError, match="amsgrad=False"):
            rg.products(rg.q_pool)
    finally:
        for g in opt.param_groups:
            g["amsgrad"] = False
        eng.close()


@pytest.mark.parametrize(
    "kw",
    [
        dict(clip_q="prev"),
        dict(clip_q="fixed_point"),
        dict(self_q=2),
        dict(objective="step"),
        dict(clip_q="fixed_point", self_q=1),
    ],
)
def test_step_consistent_choice_runs_on_engine_scores(stepped, kw):
    model, opt = stepped
    eng = GradEngine(model, opt, metric="adam", grad_path="materialize")
    try:
        scores = eng.score(random_batch(12, seed=5), random_batch(3, seed=6), k=4)
        pool = Pool(
            [{"id": i} for i in range(12)],
            4,
            2,
            1e-2,
            torch.Generator().manual_seed(0),
            scores,
            scores.losses,
            opt,
            engine=eng,
            clip_prev=0.4,
            max_norm=1e-3,
        )
        sel = FTW(name="f", log_overlap_less=False, **kw).select(pool)
    finally:
        eng.close()
    assert 0 < len(sel.indices) <= 4 and np.all(sel.weights > 0)
    c = sel.diagnostics["clip_model"]
    if kw.get("clip_q") == "prev":
        assert c == 0.4
    elif kw.get("clip_q"):
        assert 0 < c < 1  # max_norm 1e-3 binds
    assert clip_factor(2.0, 1.0) == 0.5 and clip_factor(0.5, 1.0) == 1.0 and clip_factor(2.0, None) == 1.0


def test_clipped_step_meets_the_clip_length_and_beats_the_rescaled_matching_choice():
    from fwsel.selectors.adam_step import clipped_step

    rng = np.random.default_rng(7)
    G = rng.normal(size=(16, 50)) * rng.lognormal(0, 0.5, size=(16, 1))
    D = rng.lognormal(0, 1, size=50)
    gT = G[:5].mean(0) + 0.3 * rng.normal(size=50)
    K, K2, b = (G * D) @ G.T, G @ G.T, (G * D) @ gT

    def solve(A):
        res = omp(A, b, 1.0, 6, ridge_lambda(A, 1e-6, "self"), 0.0)
        return res.support, res.u

    def utility(S, x):
        return b[S] @ x - 0.5 * x @ K[np.ix_(S, S)] @ x

    S0, x0 = solve(K)
    full = float(np.sqrt(x0 @ K2[np.ix_(S0, S0)] @ x0))
    m = 0.2 * full  # the clip binds
    S, x, mu = clipped_step(K, K2, b, m, 1.0, solve)
    assert mu > 0 and np.sqrt(x @ K2[np.ix_(S, S)] @ x) == pytest.approx(m, rel=1e-2)
    assert utility(S, x) >= utility(S0, x0 * m / full) - 1e-12  # the matching choice, clipped to length m
    S1, x1, mu1 = clipped_step(K, K2, b, 10 * full, 1.0, solve)  # no clip: the plain matching optimum
    assert mu1 == 0 and S1 == S0 and np.allclose(x1, x0)


def test_alpha_fit_recovers_the_curvature_scale_from_observed_changes():
    sel = FTW(name="f", alpha_fit=True, filter="greedy", log_overlap_less=False)
    sel.fidelity = True
    assert sel.current_alpha() == 1.0  # no fit yet: alpha
    rng = np.random.default_rng(0)
    for _ in range(50):
        lin, q = -rng.uniform(1, 2), rng.uniform(0.1, 1)
        sel._pending = (lin, q)
        sel.observe({"fid_meas": lin + 0.3 * q})
    assert sel.current_alpha() == pytest.approx(0.3)
    sel.observe({"fid_meas": 5.0})  # nothing pending (no prediction this step): ignored
    assert sel.current_alpha() == pytest.approx(0.3)
    sel.fidelity = False
    with pytest.raises(ValueError, match="diagnostics.fidelity"):
        sel.current_alpha()


def test_alpha_fit_runs_in_the_loop(tmp_path):
    from helpers_runs import FAST, train

    run = train(
        tmp_path,
        *FAST,
        "selector.filter=greedy",
        "selector.alpha_fit=true",
        "diagnostics.fidelity=true",
        "steps=4",
        "eval_every=4",
    )
    fits = [r["sel_alpha_fit"] for r in run["metrics"][1:]]
    assert fits[0] == 1.0 and all(np.isfinite(fits)) and fits[-1] != 1.0  # fitted from step 2 on


@pytest.mark.slow
def test_clip_prev_resumes_exactly(tmp_path):
    """The previous clip factor lives in the loop totals, which checkpoints carry."""
    from helpers_runs import FAST, metric_rows, run_cli, signal_after

    args = [*FAST, "selector.clip_q=prev", "steps=5", "eval_every=5", "checkpoint_every=2", "optim.max_grad_norm=0.1"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_cli(["train", *args, f"hydra.run.dir={full}"])[0] == 0
    with pytest.MonkeyPatch.context() as mp:
        signal_after(mp, 3)
        run_cli(["train", *args, f"hydra.run.dir={cut}"])
    assert run_cli(["train", f"resume={cut}", "progress=false"])[0] == 0
    assert metric_rows(cut) == metric_rows(full)
    assert all(r["sel_clip_model"] < 1 for r in metric_rows(full)[2:])  # the clip bound and was read back


def test_raw_entry_takes_the_largest_residual_correlation_first():
    K, b, y2 = random_problem(0)
    lam = ridge_lambda(K, 1e-4)
    raw = omp(K, b, y2, 1, lam, 1e-3, entry="raw")
    cos = omp(K, b, y2, 1, lam, 1e-3)
    assert raw.support == [int(np.argmax(b))] and cos.support == [int(np.argmax(b / np.sqrt(np.diag(K))))]
    assert raw.support != cos.support  # the problem is one where the two orders differ


def test_clip_q_falls_back_where_products_cannot_be_reformed(caplog):
    """A sketch or token-Gram engine (here: none) keeps the engine's products for clip_q=fixed_point,
    with one warning (clip_q=prev needs no re-forming: the engine scales q while scoring); self_q and
    objective=step, asked for explicitly, refuse."""
    K, b, y2 = random_problem(1)
    plain = select(FTW(name="f", log_overlap_less=False, clip_q="none"), K, b, y2)
    assert select(FTW(name="f", log_overlap_less=False, clip_q="prev"), K, b, y2).indices == plain.indices
    sel = FTW(name="f", log_overlap_less=False, clip_q="fixed_point")
    assert select(sel, K, b, y2).indices == plain.indices
    assert select(sel, K, b, y2).indices == plain.indices
    assert sum("clip_q=fixed_point is off" in r.getMessage() for r in caplog.records) == 1
    assert not any("clip_q=prev" in r.getMessage() for r in caplog.records)
    for kw in (dict(self_q=1), dict(objective="step")):
        with pytest.raises(ValueError, match="per-sample gradients"):
            select(FTW(name="f", log_overlap_less=False, **kw), K, b, y2)
