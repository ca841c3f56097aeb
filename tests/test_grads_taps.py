"""The tensor-hook taps: what a tap keeps alive, what it is handed, and what the unrestricted
scoring backward may touch."""

import weakref

import pytest
import torch
from test_grads import trained

from fwsel.grads import GradEngine
from fwsel.grads import capture as capture_mod

from helpers_models import random_batch


@pytest.mark.parametrize("setting", ["lora", "full"])
def test_a_captured_input_is_freed_once_its_gradient_is_taken(setting, monkeypatch):
    """A tap holds its layer's input `x` (for an LLM: nearly every activation of the forward) only
    until its backward has used it, as `_Tap`'s saved tensor did. A tensor hook whose closure keeps
    `x` holds it as long as the graph's nodes live: `score` keeps the last micro-batch's graph (`out`,
    `total`) through the next micro-batch's forward and backward and through the products, so the
    activations of two micro-batches were alive at once."""
    refs = []  # (first row of the micro-batch, weakref to an x handed to the sink)
    sink = capture_mod.Capture._sink

    def spy(self, site, rows, mask, span, x, grad):
        refs.append((span[0], weakref.ref(x)))
        return sink(self, site, rows, mask, span, x, grad)

    monkeypatch.setattr(capture_mod.Capture, "_sink", spy)
    model, opt = trained(setting)
    eng = GradEngine(model, opt, "sgd", micro_batch_size=2, grad_path="materialize")  # ghost sites keep X
    alive = []

    def pre(module, args, kwargs):  # each micro-batch's forward: earlier micro-batches' inputs
        alive.append(sum(r() is not None for row0, r in refs if row0 < eng.cap.offset))

    base = model.get_base_model() if setting == "lora" else model
    handle = base.get_decoder().register_forward_pre_hook(pre, with_kwargs=True)
    products = eng._products

    def at_products(*a, **kw):
        alive.append(sum(r() is not None for _, r in refs))
        return products(*a, **kw)

    eng._products = at_products
    try:
        eng.score(random_batch(4, seed=1), random_batch(2, seed=2), k=2)
    finally:
        handle.remove()
        eng.close()
    assert len(refs) > 0 and len(alive) == 4  # three micro-batches, then the products
    assert alive == [0, 0, 0, 0]


def test_scoring_never_writes_grad_of_a_parameter_made_trainable_after_the_engine_was_built():
    """Scoring freezes the parameters that were trainable when the engine was built (captured and
    fallback). The scoring backward used to end at the dummy leaf, so it could never touch `.grad`;
    now that it is unrestricted, a parameter unfrozen later (progressive unfreezing, a
    switched peft adapter) would silently receive the unweighted gradient of every pool and target
    row, which the next optimizer step applies. It must be refused (or kept out), never written."""
    model, opt = trained("lora")
    eng = GradEngine(model, opt, "sgd")
    head = model.get_base_model().get_output_embeddings().weight
    head.requires_grad_(True)
    try:
        eng.score(random_batch(3, seed=1), random_batch(2, seed=2), k=2)
    except ValueError as e:
        assert "trainable" in str(e)
    assert head.grad is None
    eng.close()


class _Blocked(torch.autograd.Function):
    """Identity in forward; hands back no gradient (None), as a custom kernel may for an input
    it treats as constant."""

    @staticmethod
    def forward(ctx, a):
        return a.view_as(a)

    @staticmethod
    def backward(ctx, grad):
        return None


@pytest.mark.parametrize("setting", ["lora", "full"])
def test_a_layer_whose_output_gets_no_gradient_has_zero_rows(setting):
    """Autograd hands a tensor hook None where the output's node runs without a gradient (every
    consumer returned None for it); `_Tap` materialised zeros. The sink must see zeros (or nothing),
    not crash: the layer's per-sample gradients are zero, and so is its weight's oracle gradient."""
    from helpers_models import captured_params, row_loss

    model, opt = trained(setting)
    eng = GradEngine(model, opt, "sgd", grad_path="materialize")
    base = model.get_base_model() if setting == "lora" else model
    layer = base.model.layers[1].mlp.up_proj
    blocked = layer.lora_B["default"] if setting == "lora" else layer
    blocked.register_forward_hook(lambda m, a, out: _Blocked.apply(out))  # after the engine's tap
    pool = random_batch(4, seed=1)
    eng.score(pool, random_batch(2, seed=2), k=2)
    params = captured_params(model)
    G = torch.stack([torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for p, g in zip(
        params, torch.autograd.grad(row_loss(model, pool, i), params, allow_unused=True))]) for i in range(4)])
    blk = next(b for b in eng.cap.blocks if b.param is blocked.weight)
    assert float(G[:, blk.start : blk.end].abs().max()) == 0
    assert float((eng.cap.buf[:4] - G).abs().max() / G.abs().max()) <= 1e-10
    eng.close()
