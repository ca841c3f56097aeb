"""The update each step applies, against references that share no code with it: weights that do
not sum to |S|, the weighted-backward path's `.grad` against explicit per-sample gradients, and
the loop's clip-then-step against `torch.nn.utils.clip_grad_norm_` + `torch.optim.AdamW`."""

import copy

import numpy as np
import pytest
import torch
from test_grads import relerr, trained
from test_grads_update import assert_update_matches_autograd

import fwsel.loop
from fwsel.loop import Trainer

from helpers_models import random_batch, row_loss
from helpers_runs import train

FP64 = ["model.dtype=fp64", "steps=2", "eval_every=2", "target.eval_size=8", "batch_size=4"]
W_ODD = [4.0, 0.25, 0.5, 2.0]  # sum 6.75, not |S| = 4 (powers of two: exact in any precision)


@pytest.mark.parametrize("setting,metric", [pytest.param("lora", "adam", marks=pytest.mark.slow), ("full", "sgd")])
def test_engine_update_with_weights_not_summing_to_the_set_size(setting, metric):
    """apply_update is (1/|S|) sum w_i g_i for any weights: no hidden renormalisation."""
    model, opt = trained(setting)
    assert_update_matches_autograd(
        model, opt, metric, random_batch(6, seed=51), random_batch(3, seed=52), [3, 0, 5, 1], W_ODD
    )


def per_sample_sum(model, batch, w) -> torch.Tensor:
    """(1/|S|) sum_i w_i grad l_i from one unpadded batch-size-1 backward per row."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    for i, wi in enumerate(w):
        gs = torch.autograd.grad(row_loss(model, batch, i), params, allow_unused=True)
        total += wi * torch.cat(
            [(torch.zeros_like(p) if g is None else g).reshape(-1).double() for p, g in zip(params, gs)]
        )
    return total / len(w)


@pytest.mark.parametrize(
    "selector",
    ["random", pytest.param("full", marks=pytest.mark.slow), pytest.param("maxloss", marks=pytest.mark.slow)],
)
def test_weighted_backward_grad_matches_explicit_per_sample_gradients(tmp_path, monkeypatch, selector):
    """Selectors that score nothing train through one weighted backward over the chosen rows;
    with weights that do not sum to |S| its .grad must still be (1/|S|) sum w_i g_i."""
    checked, orig = [], Trainer.form_update

    def form_update(self, need, rows, scores, idx, w):
        assert need != "grads"
        w = np.resize(W_ODD, len(idx)) if idx else w
        ref = per_sample_sum(self.model, self.batch([rows[i] for i in idx]), w)
        out = orig(self, need, rows, scores, idx, w)
        got = torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double()
                for p in self.model.parameters()
                if p.requires_grad
            ]
        )
        checked.append(relerr(got, ref))
        return out

    monkeypatch.setattr(Trainer, "form_update", form_update)
    train(tmp_path, f"selector={selector}", *FP64)
    assert len(checked) == 2 and max(checked) <= 1e-6, checked


@pytest.mark.parametrize(
    "selector,max_norm",
    [
        ("ftw", 0.05),
        pytest.param("random", 0.05, marks=pytest.mark.slow),
        pytest.param("ftw", 1e6, marks=pytest.mark.slow),
    ],
)
def test_clip_then_step_matches_torch_clip_grad_norm_and_adamw(tmp_path, monkeypatch, selector, max_norm):
    """The loop clips with the norm it already computed; torch's clip_grad_norm_ + AdamW on the
    same gradients, from a copy of the model and optimizer, must land on the same parameters."""
    refs, diffs, orig_norm, orig_step = {}, [], fwsel.loop.grad_norm, Trainer.train_step

    def grad_norm(params):  # called once per step, right after the update is formed: snapshot here
        params = list(params)
        model = refs["trainer"].model
        ref_model, ref_opt = copy.deepcopy((model, refs["trainer"].optimizer))
        ref_params = [p for p in ref_model.parameters() if p.requires_grad]
        for p, q in zip(params, ref_params):
            q.grad = None if p.grad is None else p.grad.clone()
        norm = torch.nn.utils.clip_grad_norm_(ref_params, max_norm)
        ref_opt.step()
        refs["after"] = [p.detach().clone() for p in ref_params]
        refs["clipped"] = float(norm) > max_norm
        return orig_norm(params)

    def train_step(self, t):
        refs["trainer"] = self
        row = orig_step(self, t)
        got = torch.cat([p.detach().reshape(-1) for p in self.params])
        diffs.append((relerr(got, torch.cat([p.reshape(-1) for p in refs["after"]])), refs["clipped"]))
        return row

    monkeypatch.setattr(fwsel.loop, "grad_norm", grad_norm)
    monkeypatch.setattr(Trainer, "train_step", train_step)
    train(tmp_path, f"selector={selector}", f"optim.max_grad_norm={max_norm}", "optim.warmup_steps=0", *FP64)
    assert len(diffs) == 2 and max(d for d, _ in diffs) <= 1e-9, diffs
    assert all(c == (max_norm < 1) for _, c in diffs)  # clipping bound exactly where it should
