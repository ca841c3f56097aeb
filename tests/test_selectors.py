"""Gradient selectors on fabricated Scores (K = Phi Phi^T, b = Phi y): no model, no engine."""

from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fwsel.selectors.base import EngineNeeds, Needs, Pool, Product
from fwsel.selectors.ftw import FTW
from fwsel.selectors.full import FullSelector
from fwsel.selectors.gradnorm import GradNorm
from fwsel.selectors.greats import Greats
from fwsel.selectors.less import Less
from fwsel.selectors.maxloss import MaxLoss
from fwsel.selectors.omp import omp, ridge_lambda
from fwsel.selectors.tracin import TracIn


@dataclass
class FakeScores:  # the fields of fwsel.grads.Scores that selectors read
    K: torch.Tensor
    b: torch.Tensor
    y2: float
    dir_gram: torch.Tensor
    sq_norms: torch.Tensor
    finite: torch.Tensor
    losses: torch.Tensor
    poor_frac: float | None = None
    aux: dict = field(default_factory=dict)


def scores(Phi, y, dirs=(), M=None, finite=None):
    """Scores in the metric diag(M) (default I) for feature rows Phi, target y, extra dirs."""
    Phi, M = np.asarray(Phi, float), np.ones(len(y)) if M is None else np.asarray(M, float)
    U = np.column_stack([y, *dirs])  # the directions g_T, extra...
    K, B = (Phi * M) @ Phi.T, (Phi * M) @ U
    fin = np.ones(len(Phi), bool) if finite is None else np.asarray(finite, bool)
    K[~fin], K[:, ~fin], B[~fin] = 0.0, 0.0, 0.0
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    return FakeScores(
        t(K), t(B), float(y @ (M * y)), t(U.T @ (U * M[:, None])), t(np.diag(K).copy()),
        torch.tensor(fin), t(np.arange(len(Phi), dtype=float)),
    )


def pool(s, k, lr=1e-3, step=5, seed=0, optimizer=None, losses=None):
    n = len(s.K) if s is not None else len(losses)
    rng = torch.Generator().manual_seed(seed)
    return Pool([{"id": i} for i in range(n)], k, step, lr, rng, s, losses, optimizer)


def ftw(**kw):
    return FTW(name="ftw", **kw)


def random_scores(rng, N=24, p=10, ties=False):
    Phi = rng.normal(size=(N, p))
    if ties:
        Phi[N // 2 :] = Phi[: N - N // 2]  # exact duplicate rows: equal scores
    return scores(Phi, rng.normal(size=p))


# --- the hand-built duplicates example ------------------------------------------------------
DUP_PHI = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
DUP_Y = np.array([1.0, 0.5])


def test_duplicates_tracin_takes_both():
    assert TracIn(name="tracin").select(pool(scores(DUP_PHI, DUP_Y), 2)).indices == [0, 1]


def test_duplicates_greats_takes_one_when_interaction_bites():
    s = scores(DUP_PHI, DUP_Y)
    sel = Greats(name="greats", interaction_scale=1.0).select(pool(s, 2, lr=1.0))
    assert sel.indices == [0, 2] and sel.diagnostics["interaction_ratio"] == 0.0
    tiny = Greats(name="greats").select(pool(s, 2, lr=1e-4))  # the scale does nothing
    assert tiny.indices == [0, 1] and tiny.diagnostics["interaction_ratio"] == pytest.approx(1e-4 / 2)


def test_duplicates_ftw_takes_one_and_the_third():
    sel = ftw().select(pool(scores(DUP_PHI, DUP_Y), 2))
    assert sel.indices == [0, 2]
    np.testing.assert_allclose(sel.weights, [4 / 3, 2 / 3], rtol=1e-6)  # u = (1, 0.5), mean 1
    d = sel.diagnostics
    assert d["explained"] == pytest.approx(1.0, abs=1e-6) and d["alpha_star"] == pytest.approx(1.5, rel=1e-3)
    assert d["n_eff"] == 2 and d["fallback"] == 0 and d["cap_bound"] == 0 and d["overlap_topk"] == 0.5


def test_four_copies_ftw_trains_on_one():
    y = np.array([1.0, -2.0, 0.5])
    sel = ftw().select(pool(scores(np.tile(y, (4, 1)), y), 4))
    assert sel.indices == [0] and list(sel.weights) == [1.0] and sel.diagnostics["n_eff"] == 1
    filled = ftw(fill="alignment").select(pool(scores(np.tile(y, (4, 1)), y), 4))
    assert filled.indices == [0, 1, 2, 3] and np.allclose(filled.weights, 1.0)


# --- equivalences ---------------------------------------------------------------------------
@pytest.mark.parametrize("ties", [False, True])
def test_greats_without_interaction_is_tracin(ties):
    rng = np.random.default_rng(4)
    for _ in range(30):
        s = random_scores(rng, ties=ties)
        ref = TracIn(name="tracin").select(pool(s, 6)).indices
        assert Greats(name="greats", interaction_scale=0.0).select(pool(s, 6, lr=1.0)).indices == ref
        assert Greats(name="greats").select(pool(s, 6, lr=0.0)).indices == ref  # LR = 0: the limit


@pytest.mark.parametrize("ties", [False, True])
def test_ftw_sgd_topk_uniform_is_tracin(ties):
    rng = np.random.default_rng(5)
    sel = ftw(geometry="sgd", filter="topk", weights="uniform")
    for _ in range(30):
        s = random_scores(rng, ties=ties)
        got = sel.select(pool(s, 7))
        assert got.indices == TracIn(name="tracin").select(pool(s, 7)).indices
        assert np.all(got.weights == 1.0)


def test_greedy_filter_uses_alpha_and_self_term():
    s = scores([[1.0, 0.0], [1.0, 0.0], [0.0, 0.3]], np.array([1.0, 0.5]))  # b = (1, 1, 0.15)
    assert ftw(filter="greedy", alpha=0.01).select(pool(s, 2)).indices == [0, 1]
    assert sorted(ftw(filter="greedy", alpha=2.0, weights="uniform").select(pool(s, 2)).indices) == [0, 2]


# --- k <= N, invalid rows, determinism, LR = 0 --------------------------------------------
ALL = [
    lambda: TracIn(name="tracin"), lambda: Greats(name="greats"), lambda: GradNorm(name="gradnorm"),
    lambda: Less(name="less"), lambda: ftw(), lambda: ftw(fill="alignment"),
    lambda: ftw(filter="topk", weights="uniform"), lambda: ftw(filter="greedy"),
]


@pytest.mark.parametrize("make", ALL)
def test_k_above_pool_and_nonfinite_rows(make):
    rng = np.random.default_rng(6)
    Phi = rng.normal(size=(5, 4)) + 2.0 * np.ones(4)  # all aligned with y: every row wanted
    s = scores(Phi, np.ones(4), finite=[1, 1, 0, 1, 1])
    sel = make().select(pool(s, 10, lr=1.0))
    assert len(sel.indices) == len(set(sel.indices)) <= 4 and 2 not in sel.indices
    assert len(sel.weights) == len(sel.indices) and np.all(sel.weights > 0)


@pytest.mark.parametrize("make", ALL)
def test_deterministic(make):
    rng = np.random.default_rng(7)
    s = random_scores(rng)
    a, b = make().select(pool(s, 5, lr=0.5)), make().select(pool(s, 5, lr=0.5))
    assert a.indices == b.indices and np.array_equal(a.weights, b.weights)


def test_ftw_is_scale_free_and_lr_free():
    rng = np.random.default_rng(8)
    s = random_scores(rng)
    ref = ftw().select(pool(s, 6, lr=1e-3))
    zero = ftw().select(pool(s, 6, lr=0.0))
    big = replace(s, K=s.K * 1e6, b=s.b * 1e6, y2=s.y2 * 1e6, sq_norms=s.sq_norms * 1e6)
    scaled = ftw().select(pool(big, 6))
    for other in (zero, scaled):
        assert other.indices == ref.indices and np.allclose(other.weights, ref.weights)


def test_warmup_is_seeded_random():
    sel = ftw(warmup_steps=3)
    assert sel.needs(2) == "none" and sel.needs(3) == "grads"
    a = sel.select(pool(None, 4, step=0, seed=1, losses=torch.zeros(20)))
    b = sel.select(pool(None, 4, step=0, seed=1, losses=torch.zeros(20)))
    c = sel.select(pool(None, 4, step=0, seed=2, losses=torch.zeros(20)))
    assert a.indices == b.indices != c.indices and len(set(a.indices)) == 4
    assert a.diagnostics["warmup"] == 1.0


# --- weights, fallbacks, fill ----------------------------------------------------------------
def test_empty_support_fallbacks():
    Phi = np.array([[-1.0, 0.0], [-3.0, 0.1], [0.0, -1.0], [-0.1, -0.1]])
    s = scores(Phi, np.array([1.0, 1.0]))  # every b_i < 0
    sel = ftw().select(pool(s, 2))
    cos = np.asarray(s.b[:, 0]) / np.sqrt(np.asarray(s.sq_norms))
    assert sel.indices == list(np.argsort(-cos)[:2]) and sel.diagnostics["fallback"] == 1
    assert np.all(sel.weights == 1.0) and sel.diagnostics["n_eff"] == 0
    skip = ftw(empty_support="skip").select(pool(s, 2))
    assert skip.indices == [] and skip.diagnostics["fallback"] == 2


def test_fill_alignment_and_cap():
    y = np.array([1.0, 0.0, 0.0])
    Phi = np.array([[1.0, 0.0, 0.0], [0.1, 1.0, 0.0], [0.02, 0.0, 1.0], [0.0, 0.5, 0.5]])
    s = scores(Phi, y)
    plain = ftw().select(pool(s, 3))
    assert plain.indices == [0] and plain.diagnostics["n_eff"] == 1
    filled = ftw(fill="alignment").select(pool(s, 3))
    assert filled.indices == [0, 1, 2] and np.allclose(filled.weights, 1.0)
    assert filled.diagnostics["n_selected"] == 3 and filled.diagnostics["overlap_topk"] == 1.0


def test_nnls_weights_are_capped_in_order():
    rng = np.random.default_rng(9)
    Q = np.linalg.qr(rng.normal(size=(10, 10)))[0][:8] * rng.uniform(0.5, 2.0, size=(8, 1))
    Phi = np.vstack([Q, rng.normal(size=(4, 10))])  # 8 orthogonal rows + distractors
    y = Q.T @ np.geomspace(30.0, 1.0, 8)  # the ideal u is very uneven: the cap binds
    for w_max in (1.5, 2.0, 3.0):
        sel = ftw(w_max=w_max).select(pool(scores(Phi, y), 8))
        w = sel.weights
        assert sel.diagnostics["cap_bound"] == 1.0 and sel.diagnostics["cap_all_wmax"] == 0.0
        assert w.mean() == pytest.approx(1.0) and w.max() <= w_max + 1e-12
        res = omp(Phi @ Phi.T, Phi @ y, float(y @ y), 8, ridge_lambda(Phi @ Phi.T, 1e-4), 1e-3)
        assert sel.indices == res.support and np.all(np.diff(w[np.argsort(res.u)]) >= -1e-12)


def test_momentum_correction_matches_explicit_target():
    rng = np.random.default_rng(10)
    d = rng.uniform(0.5, 3.0, size=8)  # the metric D
    Phi, gT, m, theta = rng.normal(size=(20, 8)), rng.normal(size=8), rng.normal(size=8), rng.normal(size=8)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = SimpleNamespace(param_groups=[{"betas": (0.9, 0.999), "weight_decay": 0.1}],
                          state={p: {"step": torch.tensor(3.0)}})
    s = scores(Phi, gT, dirs=(m, theta / d), M=d)  # decay column: <g_i, D D^-1 theta>
    sel = ftw(momentum_correction=True, alpha=0.5)
    assert sel.extra_dirs(0) == ("momentum", "decay")
    got = sel.select(pool(s, 5, optimizer=opt))
    z = gT / 0.5 - 9.0 * m - 0.1 * (1 - 0.9**4) / 0.1 * theta / d  # docs/method.md#update-matching's target
    K, b = (Phi * d) @ Phi.T, (Phi * d) @ z
    ref = omp(K, b, float(z @ (d * z)), 5, ridge_lambda(K, 1e-4), 1e-3)
    assert got.indices == ref.support and len(ref.support) > 0
    assert got.indices != ftw().select(pool(s, 5)).indices  # the drift changes the choice


# --- diagnostics, baselines, validation -----------------------------------------------------
def test_ftw_overlap_less_and_poor_frac():
    rng = np.random.default_rng(11)
    s = random_scores(rng)
    s.poor_frac = 0.25
    less_b = np.asarray(s.b[:, 0]) * np.arange(1, 25)  # a different ranking under D^2
    s.aux = {"adam2": {"b": torch.tensor(less_b), "sq_norms": s.sq_norms, "y2": 1.0}}
    d = ftw(log_overlap_less=True).select(pool(s, 6)).diagnostics
    assert d["poor_frac"] == 0.25 and 0.0 <= d["overlap_less"] <= 1.0
    assert 0.0 < d["explained"] <= 1.0 and d["alpha_star"] > 0
    assert "overlap_less" not in ftw().select(pool(s, 6)).diagnostics  # a diagnostic: off by default
    assert ftw(log_overlap_less=True).engine_needs == EngineNeeds("adam", Product.B | Product.K | Product.Y2,
                                                                  aux_metrics=("adam2",), adam_q="pool",
                                                                  clip_q=True)  # the default clip_q=prev
    assert ftw(metric="D2").metric == "adam2" and ftw(geometry="sgd").engine_needs.aux_metrics == ()


def test_selectors_declare_only_the_products_they_read():
    assert TracIn(name="t").engine_needs.products == Product.B | Product.NONZERO  # no Gram, no norms
    assert Product.K in Greats(name="g").engine_needs.products and Greats(name="g").metric == "sgd"
    assert GradNorm(name="g").engine_needs.products == Product.SQ_NORMS
    assert ftw().engine_needs.aux_metrics == () and Product.Y2 in ftw().engine_needs.products
    assert Less(name="l", adam_q="state").engine_needs == EngineNeeds("adam2", Product.B | Product.SQ_NORMS,
                                                                      adam_q="state")
    assert FullSelector().needs(0) is Needs.NONE and MaxLoss(name="m").needs(0) is Needs.LOSSES


def test_less_gradnorm_maxloss_rankings():
    Phi = np.array([[10.0, 0.0], [0.5, 0.0], [3.0, 3.0], [0.0, -4.0]])
    s = scores(Phi, np.array([1.0, 0.0]))
    assert TracIn(name="t").select(pool(s, 1)).indices == [0]
    assert Less(name="l").select(pool(s, 2)).indices == [0, 1]  # cosine 1 for both, then position
    assert GradNorm(name="g").select(pool(s, 2)).indices == [0, 2]
    ml = MaxLoss(name="m")
    assert ml.needs(0) == "losses" and Less(name="l").metric == "adam2"
    losses = torch.tensor([0.5, float("nan"), 2.0, 2.0, 1.0])
    assert ml.select(pool(None, 3, losses=losses)).indices == [2, 3, 4]


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"filter": "x"}, "selector.filter must be one of omp|greedy|topk, got 'x'"),
        ({"geometry": "lion"}, "selector.geometry must be one of adam|sgd"),
        ({"adam_q": "v"}, "selector.adam_q must be one of pool|state|taylor"),
        ({"fill": None}, "selector.fill must be one of none|alignment"),
        ({"w_max": 0.5}, "selector.w_max must be a number >= 1.0, got 0.5"),
        ({"ridge": None}, "selector.ridge must be a number >= 0.0, got None"),
        ({"alpha": 0}, "selector.alpha must be a number > 0.0"),
        ({"momentum_correction": True, "geometry": "sgd"}, "needs geometry=adam"),
    ],
)
def test_bad_config_values(kw, msg):
    with pytest.raises(ValueError, match=msg.replace("|", r"\|")):
        ftw(**kw)
