"""The per-sample buffer is reused between passes without a zero fill: whatever it held before
(here NaN) never leaks into a pass, also for a captured Linear the forward never calls."""

import pytest
import torch
from torch import nn

from fwsel.grads import GradEngine, sequence_losses
from fwsel.grads.loss import concat_batches

from helpers_models import random_batch, tiny_model


@pytest.mark.parametrize("kw", [{}, {"micro_batch_size": 3},
                                {"grad_path": "materialize", "loss_chunk_tokens": 5, "micro_batch_size": 3}])
def test_stale_buffer_contents_never_leak(kw):
    model = tiny_model()
    model.unused = nn.Linear(4, 4, dtype=torch.float64)  # captured, never called: its columns stay zero
    pool, target = random_batch(5, seed=1), random_batch(3, seed=2)
    engine = GradEngine(model, None, "sgd", **kw)
    first = engine.score(pool, target)
    ref = engine.cap.buf.clone()
    engine._free()  # the buffer becomes the spare the next pass reuses
    spare = engine.cap.spare.fill_(float("nan"))
    again = engine.score(pool, target)
    assert engine.cap.buf.data_ptr() == spare.data_ptr()  # really reused
    assert torch.equal(engine.cap.buf, ref)
    assert torch.equal(again.K, first.K) and torch.equal(again.b, first.b)
    site = next(s for s in engine.cap.sites if s.module is model.unused)
    cols = slice(site.weight.start, site.bias.end)
    assert ref[:, cols].abs().sum() == 0 and ref.abs().sum() > 0
    assert bool(again.finite.all())
    params = [b.param for b in engine.cap.mat_blocks]  # the rows are the gradients: sums against autograd
    losses = sequence_losses(model, concat_batches(pool, target)).losses
    for rows in (slice(0, 5), slice(5, 8)):
        gs = torch.autograd.grad(losses[rows].sum(), params, retain_graph=True, allow_unused=True)
        flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, gs)])
        assert torch.allclose(ref[rows].sum(0), flat, rtol=1e-10, atol=1e-12)
