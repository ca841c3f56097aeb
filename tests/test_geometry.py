"""The linearised AdamW step (docs/method.md#adamw-geometry) against torch's own AdamW update."""

import pytest
import torch
from test_grads import trained

from fwsel.grads.loss import sequence_losses
from fwsel.grads.metric import adam_diag, group_of

from helpers_models import captured_params, random_batch


def _predicted(opt, params, grads, adam_q="taylor"):
    """dtheta = a + P(g): drift a = -eta [b1/(1-b1^(t+1)) D m + lam theta], P(g) = -eta c D g."""
    groups, out = group_of(opt), []
    for p, g in zip(params, grads):
        grp, st = groups[id(p)], opt.state[p]
        (b1, _), eta, lam, t = grp["betas"], grp["lr"], grp["weight_decay"], float(st["step"])
        flat = g.reshape(-1)  # pool q of a one-row "pool": the row's own g*g
        D, _ = adam_diag(p, opt, groups, flat, adam_q, q=flat * flat if adam_q == "pool" else None)
        D = D.view_as(p)
        c = (1 - b1) / (1 - b1 ** (t + 1))
        a = -eta * (b1 / (1 - b1 ** (t + 1)) * D * st["exp_avg"] + lam * p.detach())
        out.append(a - eta * c * D * g)
    return out


@pytest.mark.parametrize("adam_q", ["taylor", "pool"])
def test_linearised_step_matches_adamw_to_first_order(adam_q):
    """For a gradient of size eps the prediction error of the g-dependent part shrinks like eps."""
    model, opt = trained("lora")  # fp64, 3 AdamW steps, weight decay 0.1
    params = captured_params(model)
    base = torch.autograd.grad(sequence_losses(model, random_batch(4, seed=9)).losses.sum(), params)
    errs = []
    for eps in (1e-3, 1e-4):
        grads = [eps * g / max(float(g.abs().max()), 1e-30) * 1e-3 for g in base]  # |g| << sqrt(v)
        before = [p.detach().clone() for p in params]
        state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()} for p in params}
        pred = _predicted(opt, params, grads, adam_q)
        drift = _predicted(opt, params, [torch.zeros_like(g) for g in grads], adam_q)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        actual = [p.detach() - b for p, b in zip(params, before)]
        num = sum(float((a - q).norm() ** 2) for a, q in zip(actual, pred)) ** 0.5
        den = sum(float((q - d).norm() ** 2) for q, d in zip(pred, drift)) ** 0.5
        errs.append(num / den)
        with torch.no_grad():  # undo the step
            for p, b in zip(params, before):
                p.copy_(b)
        for p in params:
            opt.state[p] = state[p]
    if adam_q == "taylor":  # exact first-order expansion at g = 0
        assert errs[0] < 1e-2 and errs[1] < 0.2 * errs[0]
    else:  # pool freezes v' at the pool's own g*g: a first-order-accurate frozen denominator too
        assert errs[1] < 1e-2
