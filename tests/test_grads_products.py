"""The engine forms only the products asked for; what it forms equals the full request's."""

import enum

import pytest
import torch
from test_grads import relerr, trained
from test_grads_ghost import batches, wide

from fwsel.grads import GradEngine

from helpers_models import random_batch


class Product(enum.Flag):  # the shape of a selector's request: members named like the products
    B = enum.auto()
    K = enum.auto()
    SQ_NORMS = enum.auto()


@pytest.mark.parametrize("setting,metric,path", [("lora", "sgd", "auto"), ("full", "adam", "auto"),
                                                 ("wide", "sgd", "ghost"), ("wide", "adam", "ghost")])
def test_b_and_norms_without_the_gram_equal_the_full_products(setting, metric, path):
    model, opt = wide() if setting == "wide" else trained(setting)
    pool, target = batches() if setting == "wide" else (random_batch(6, seed=1), random_batch(3, seed=2))
    full = GradEngine(model, opt, metric, grad_path=path).score(pool, target, extra_dirs=("momentum",), k=3)
    eng = GradEngine(model, opt, metric, grad_path=path, products=Product.B | Product.SQ_NORMS)
    part = eng.score(pool, target, extra_dirs=("momentum",), k=3)
    assert part.K is None and full.K is not None
    assert relerr(part.b, full.b) <= 1e-10 and abs(part.y2 - full.y2) <= 1e-10 * abs(full.y2)
    assert relerr(part.sq_norms, full.sq_norms) <= 1e-10
    eng.apply_update([0, 2], [1.0, 1.0])  # the update does not need the Gram
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_b_alone_leaves_the_norms_out_and_bad_names_are_refused():
    model, opt = trained("lora")
    sc = GradEngine(model, opt, "sgd", products=("b",)).score(random_batch(4, seed=1), random_batch(2, seed=2))
    assert sc.K is None and sc.sq_norms is None and sc.b.shape == (4, 1) and torch.isfinite(sc.b).all()
    with pytest.raises(ValueError, match="products"):
        GradEngine(model, opt, "sgd", products=("b", "gram"))


def rank1_state(model, opt, g):
    """Adam state whose second moment has rank 1 per weight (with eps = 0, D then has rank 1)."""
    for p in [p for p in model.parameters() if p.requires_grad]:
        shape = p.shape if p.dim() == 2 else (p.shape[0], 1)
        v = torch.outer(torch.rand(shape[0], generator=g, dtype=torch.float64) + 0.1,
                        torch.rand(shape[1], generator=g, dtype=torch.float64))
        opt.state[p] = {"step": torch.tensor(3.0), "exp_avg": torch.zeros(p.shape, dtype=torch.float64),
                        "exp_avg_sq": v.reshape(p.shape) * 1e-6}


def test_rank1_b_shares_the_gram_and_is_exact_when_D_has_rank_1():
    model, opt = wide()
    pool, target = batches()
    kw = {"adam_q": "state", "grad_path": "ghost"}
    exact = GradEngine(model, opt, "adam", **kw).score(pool, target, k=3)
    approx = GradEngine(model, opt, "adam", ghost_b="rank1", **kw).score(pool, target, k=3)
    # rank1 never forms D: its rank-1 factors come from sampled rows and columns of D, close to the
    # fit on the whole D that exact (which forms D for b anyway) uses
    assert 1e-8 < relerr(approx.K, exact.K) < 0.1
    assert 1e-8 < relerr(approx.b, exact.b) < 0.5 and abs(approx.y2 / exact.y2 - 1) < 0.5
    model, opt = wide(steps=0, eps=0.0)
    rank1_state(model, opt, torch.Generator().manual_seed(0))
    exact = GradEngine(model, opt, "adam", **kw).score(pool, target, k=3)
    approx = GradEngine(model, opt, "adam", ghost_b="rank1", **kw).score(pool, target, k=3)
    assert relerr(approx.K, exact.K) <= 1e-10  # D of rank 1: both fits are exact, the same Gram
    assert relerr(approx.b, exact.b) <= 1e-10 and abs(approx.y2 / exact.y2 - 1) <= 1e-10
    with pytest.raises(ValueError, match="ghost_b"):
        GradEngine(model, opt, "adam", ghost_b="rank2")
