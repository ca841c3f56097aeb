"""Gradient selectors on real `Scores` from `GradEngine` (tiny LoRA Llama, live AdamW state)."""

import numpy as np
import pytest
import torch

from fwsel.grads import GradEngine
from fwsel.grads.dist import build_engine
from fwsel.selectors.base import Pool
from fwsel.selectors.ftw import FTW
from fwsel.selectors.gradnorm import GradNorm
from fwsel.selectors.greats import Greats
from fwsel.selectors.less import Less
from fwsel.selectors.tracin import TracIn

from helpers_models import random_batch, tiny_model, with_lora

K_SEL = 4
ENGINE = {"grad_path": "auto", "projection_dim": None, "projection": "countsketch", "micro_batch_size": None,
          "loss_chunk_tokens": 4096}  # conf/engine/default.yaml


@pytest.fixture(scope="module")
def trained():
    """A LoRA model after two AdamW steps, so m, v and the decay term are all non-zero."""
    torch.manual_seed(0)
    model = with_lora(tiny_model(), random_b=False)  # peft's init: lora_B = 0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for step in range(2):
        eng = GradEngine(model, opt, metric="sgd")
        eng.score(random_batch(6, seed=10 + step), random_batch(2, seed=20 + step))
        eng.apply_update(list(range(6)), np.ones(6))
        opt.step()
        opt.zero_grad()
        eng.close()
    return model, opt


def run(trained, selector, lr=1e-2):
    model, opt = trained
    eng = build_engine(ENGINE, selector.engine_needs, model, opt)
    try:
        scores = eng.score(random_batch(16, seed=1), random_batch(4, seed=2), extra_dirs=selector.extra_dirs(2),
                           k=K_SEL)
    finally:
        eng.close()
    rng = torch.Generator().manual_seed(0)
    pool = Pool([{"id": i} for i in range(16)], K_SEL, 2, lr, rng, scores, scores.losses, opt)
    return selector.select(pool), scores


@pytest.mark.parametrize("make", [
    lambda: FTW(name="ftw"), lambda: FTW(name="ftw", momentum_correction=True),
    lambda: FTW(name="ftw", metric="D2", fill="alignment"), lambda: FTW(name="ftw", geometry="sgd"),
    lambda: Greats(name="greats"), lambda: TracIn(name="tracin"), lambda: Less(name="less"),
    lambda: GradNorm(name="gradnorm"),
])
def test_selectors_run_on_engine_scores(trained, make):
    sel, scores = run(trained, make())
    assert 0 < len(sel.indices) == len(set(sel.indices)) <= K_SEL
    assert np.all(np.isfinite(sel.weights)) and np.all(sel.weights > 0)
    assert all(np.isfinite(v) for v in sel.diagnostics.values())


def test_ftw_diagnostics_and_ablation_on_engine_scores(trained):
    sel, scores = run(trained, FTW(name="ftw", log_overlap_less=True))
    d = sel.diagnostics
    assert 0 <= d["explained"] <= 1 and 0 <= d["poor_frac"] <= 1 and d["alpha_star"] > 0
    less, _ = run(trained, Less(name="less"))  # aux["adam2"] agrees with a D^2 engine
    assert d["overlap_less"] == pytest.approx(len(set(sel.indices) & set(less.indices)) / len(sel.indices))
    ablated, _ = run(trained, FTW(name="ftw", geometry="sgd", filter="topk", weights="uniform"))
    assert ablated.indices == run(trained, TracIn(name="tracin"))[0].indices
