"""The fidelity predictions against the target-loss change a real step makes (small LR)."""

import numpy as np
import pytest
import torch

from fwsel.fidelity import summarise
from fwsel.grads import GradEngine
from fwsel.grads.loss import sequence_losses
from fwsel.selectors.base import Pool
from fwsel.selectors.ftw import FTW
from fwsel.selectors.tracin import TracIn

from helpers_models import random_batch, tiny_model, with_lora


def _setup(opt_cls, lr, **opt_kw):
    model = with_lora(tiny_model(dtype=torch.float64))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = opt_cls(params, lr=1e-2, **opt_kw)
    for s in range(3):  # non-trivial momentum and second moment
        opt.zero_grad()
        sequence_losses(model, random_batch(4, seed=100 + s)).losses.sum().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    for g in opt.param_groups:
        g["lr"] = lr
    return model, opt


def _measure(model, opt, engine, target, idx, w):
    engine.apply_update(idx, w)
    opt.step()
    with torch.no_grad():
        return float(sequence_losses(model, target).losses.mean())


@pytest.mark.parametrize("lr", [1e-4, 1e-5])
def test_ftw_adam_prediction_matches_the_step(lr):
    """With the whole pool selected, `adam_q=pool` freezes v' at exactly g_hat^2: the first-order
    part of the linearised step is then exact for a small step, momentum and decay drift included.
    The quadratic adds `alpha/2 eta c <z, D z>` on top (Adam's curvature model, O(eta) too)."""
    model, opt = _setup(torch.optim.AdamW, lr, weight_decay=0.1)
    pool, target = random_batch(6, seed=1), random_batch(3, seed=2)
    sel = FTW(name="ftw")
    sel.fidelity = True
    engine = GradEngine(model, opt, "adam", adam_q="pool")
    sc = engine.score(pool, target, extra_dirs=sel.extra_dirs(3), k=6)
    p = Pool([{}] * 6, 6, 3, lr, None, scores=sc, optimizer=opt)
    idx, w = list(range(6)), np.ones(6)
    out = sel.predict_change(p, idx, w, 1.0)
    quad, pred = out["fid_pred"], out["fid_pred_linear"]
    meas = _measure(model, opt, engine, target, idx, w) - float(sc.target_losses.mean())
    assert abs(pred - meas) <= 0.02 * abs(meas)
    assert quad > pred  # the curvature term is a penalty: <z, D z> > 0


def test_tracin_prediction_is_sgd_first_order():
    model, opt = _setup(torch.optim.SGD, 1e-4)
    pool, target = random_batch(6, seed=3), random_batch(3, seed=4)
    engine = GradEngine(model, opt, "sgd")
    sc = engine.score(pool, target)
    idx, w = [0, 2, 5], np.array([1.0, 0.5, 1.5])
    pred = TracIn(name="tracin").predict_change(Pool([{}] * 6, 3, 3, 1e-4, None, scores=sc), idx, w, 1.0)["fid_pred"]
    meas = _measure(model, opt, engine, target, idx, w) - float(sc.target_losses.mean())
    assert abs(pred - meas) <= 0.02 * abs(meas)


def test_summarise_reports_rank_and_linear_correlation():
    rows = [{"step": t, "lr": 0.1 / t, "fid_pred": -0.1 / t * (1 + 0.01 * t), "fid_meas": -0.1 / t * (2 - 0.01 * t)}
            for t in range(1, 30)]
    rows.append({"step": 30, "lr": 0.01, "fid_pred": None, "fid_meas": 0.0})
    s = summarise(rows, warmup=5)
    assert s["n"] == 24 and s["spearman"] == pytest.approx(1.0) and s["pearson"] > 0.99
    assert s["spearman_per_lr"] == pytest.approx(-1.0)  # per unit LR the two drift apart
    assert summarise(rows[:2]) == {}
