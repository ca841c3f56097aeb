"""One training step of the real Trainer runs exactly one forward and one backward
(docs/method.md#per-sample-gradient-products)."""

import pytest
import torch
from hydra import compose, initialize_config_module

from fwsel.grads.loss import unwrap
from fwsel.loop import Trainer
from fwsel.outputs import RunWriter
from fwsel.tracking import NoTracker


def make_trainer(tmp_path, *overrides):
    with initialize_config_module(config_module="fwsel.conf", version_base="1.3"):
        cfg = compose("train", overrides=["steps=3", "batch_size=2", "budget=0.5", "target.batch_size=2",
                                          "target.eval_size=8", "device=cpu",
                                          "eval_samples=0", *overrides])  # samples add generate()'s forwards
    return Trainer(cfg, RunWriter(str(tmp_path)), NoTracker())


class Counter:
    """Decoder forwards (grad / no-grad) and autograd backward calls while active."""

    def __init__(self, trainer, monkeypatch):
        self.fwd_grad = self.fwd_nograd = self.backward = 0
        decoder = unwrap(trainer.model).get_decoder()  # sequence_losses calls the decoder body
        self.handle = decoder.register_forward_pre_hook(self._pre)
        real_backward, real_grad = torch.autograd.backward, torch.autograd.grad

        def backward(*a, **kw):  # Tensor.backward goes through torch.autograd.backward too
            self.backward += 1
            return real_backward(*a, **kw)

        def grad(*a, **kw):
            self.backward += 1
            return real_grad(*a, **kw)

        monkeypatch.setattr(torch.autograd, "backward", backward)
        monkeypatch.setattr(torch.autograd, "grad", grad)

    def _pre(self, module, args):
        if torch.is_grad_enabled():
            self.fwd_grad += 1
        else:
            self.fwd_nograd += 1

    def counts(self):
        return self.fwd_grad, self.fwd_nograd, self.backward


@pytest.mark.parametrize("lora,selector,path", [(True, "ftw", "auto"), (False, "ftw", "auto"),
                                                (False, "tracin", "ghost")])
def test_one_forward_and_one_backward_per_gradient_step(tmp_path, monkeypatch, lora, selector, path):
    trainer = make_trainer(tmp_path, f"lora.enabled={str(lora).lower()}", f"selector={selector}",
                           f"engine.grad_path={path}")
    count = Counter(trainer, monkeypatch)
    before = [p.detach().clone() for p in trainer.params]
    trainer.train_step(0)
    trainer.train_step(1)  # the second step has Adam state (the first LR may be 0 in warm-up)
    fwd, nograd, bwd = count.counts()
    if lora:
        assert (fwd, nograd, bwd) == (2, 0, 2)
    else:  # embeddings and norms: on the first update one more autograd call through those modules
        # alone (no model forward), which also checks their closed forms; later updates use those
        assert (fwd, nograd, bwd) == (2, 0, 3)
        assert all(s.closed for s in trainer.engine.cap.local)
    assert any(not torch.equal(p.detach(), b) for p, b in zip(trainer.params, before))
    assert all(s.ghost for s in trainer.engine.cap.sites) == (path == "ghost")
    trainer.eval_row()  # an eval step adds one no-grad forward (eval split fits one batch)
    assert count.counts() == (fwd, 1, bwd)
    count.handle.remove()
    trainer.close()
