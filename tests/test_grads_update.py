"""The one-pass update, LoRA dropout, micro-batching and gradient checkpointing against autograd."""

import copy

import pytest
import torch
from test_grads import relerr, trained

from fwsel.grads import GradEngine, sequence_losses
from fwsel.grads.local import LocalSite, local_update
from fwsel.grads.loss import concat_batches, take_rows

from helpers_models import captured_params, random_batch, tiny_model, with_lora

F64 = torch.float64


def grads_of(params):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]).double()


def test_lora_dropout_buffer_sums_to_the_autograd_gradient_of_the_same_forward():
    """peft dropout masks are random: replay the scoring pass with the same RNG state instead."""
    model = with_lora(tiny_model(), dropout=0.3)
    pool, target = random_batch(5, seed=11), random_batch(3, seed=12, max_len=14)
    engine = GradEngine(model, None, "sgd")
    state = torch.get_rng_state()
    engine.score(pool, target)
    buf = engine.cap.buf.clone()

    torch.set_rng_state(state)  # the same masks: same module order, same shapes
    losses = sequence_losses(model, concat_batches(pool, target)).losses
    params = captured_params(model)
    n = pool["input_ids"].shape[0]
    g_pool = torch.autograd.grad(losses[:n].sum(), params, retain_graph=True)
    g_tgt = torch.autograd.grad(losses[n:].sum(), params)
    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs]).double()  # noqa: E731
    assert relerr(buf[:n].sum(0), flat(g_pool)) <= 1e-10
    assert relerr(buf[n:].sum(0), flat(g_tgt)) <= 1e-10
    model.eval()  # without dropout the gradient differs: the masks really were inside the capture
    g_eval = torch.autograd.grad(sequence_losses(model, concat_batches(pool, target)).losses[:n].sum(), params)
    assert relerr(buf[:n].sum(0), flat(g_eval)) > 1e-3


def assert_update_matches_autograd(model, opt, metric, pool, target, idx, w, **engine_kw):
    """apply_update == autograd of (1/|S|) sum w_i l_i added to accumulated .grad; same AdamW step."""
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(5)
    for p in params:  # gradients accumulated by earlier micro-steps must survive scoring and update
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    ref_model, ref_opt = copy.deepcopy((model, opt))
    ref_params = [p for p in ref_model.parameters() if p.requires_grad]
    before = [p.grad.clone() for p in params]
    for p, b in zip(ref_params, before):  # deepcopy does not copy Parameter.grad
        p.grad = b.clone()

    engine = GradEngine(model, opt, metric, **engine_kw)
    engine.score(pool, target, k=len(idx))
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))  # scoring leaves .grad alone
    engine.apply_update(idx, w)

    sub = take_rows(pool, torch.tensor(idx))
    loss = (sequence_losses(ref_model, sub).losses * torch.tensor(w, dtype=F64)).sum() / len(idx)
    loss.backward()  # adds to the same accumulated .grad
    assert relerr(grads_of(params), grads_of(ref_params)) <= 1e-10
    fb = {id(p) for p in engine.cap.fallback}  # the fallback path really carried embeddings and norms
    assert all(not torch.equal(p.grad, b) for p, b in zip(params, before) if id(p) in fb)
    assert all(s.closed for s in engine.cap.local)  # embeddings and Llama's norms: closed forms, checked
    opt.step()
    ref_opt.step()
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    ref_theta = torch.cat([p.detach().reshape(-1) for p in ref_params])
    assert relerr(theta, ref_theta) <= 1e-10
    return engine


# powers of two: transformers' RMSNorm runs in float32 even in fp64 models, so autograd's
# backward of a loss scaled by 1.7 rounds at ~1e-8; scaling by 2^-j is exact in any precision
IDX, W = [4, 0, 2, 5], [2.0, 1.0, 0.5, 0.5]


@pytest.mark.parametrize("setting,metric,kind", [("lora", "adam", "llama"), ("full", "adam", "llama"),
                                                 ("full", "sgd", "qwen3"), ("full_tied", "sgd", "llama")])
def test_update_equals_autograd_of_the_weighted_subset_loss_and_adamw_step(setting, metric, kind):
    model, opt = trained(setting, kind=kind)
    pool, target = random_batch(6, seed=21), random_batch(3, seed=22)
    engine = assert_update_matches_autograd(model, opt, metric, pool, target, IDX, W)
    assert bool(engine.cap.fallback) == (setting != "lora")
    # embeddings and norms are updated locally; only a weight tied to the head needs the extra pass
    emb = model.get_input_embeddings().weight
    assert [id(p) for p in engine.cap.pass_params] == ([id(emb)] if setting == "full_tied" else [])


@pytest.mark.parametrize("setting", ["lora", "full"])
def test_micro_batching_gives_identical_products_and_update(setting):
    model, opt = trained(setting)
    pool, target = random_batch(7, seed=31), random_batch(3, seed=32)
    out = []
    for mb in (None, 2, 3):
        for p in model.parameters():
            p.grad = None
        eng = GradEngine(model, opt, "adam", micro_batch_size=mb, loss_chunk_tokens=6)
        eng.group_entries = 7 * 3000 if mb == 3 else eng.group_entries  # also: blocks in many small runs
        sc = eng.score(pool, target, extra_dirs=("momentum",), k=3)
        eng.apply_update([1, 6, 3], [0.5, 2.0, 0.5])
        out.append((sc, grads_of([p for p in model.parameters() if p.requires_grad])))
        eng.close()
    (a, ga), rest = out[0], out[1:]
    for b, gb in rest:
        assert relerr(b.K, a.K) <= 1e-12 and relerr(b.b, a.b) <= 1e-12
        assert relerr(b.losses, a.losses) <= 1e-12 and relerr(gb, ga) <= 1e-12


@pytest.mark.parametrize("setting", ["lora", "full"])
def test_gradient_checkpointing_does_not_capture_recomputed_forwards_twice(setting):
    """Non-reentrant checkpointing re-runs each layer's forward inside backward; hooks must skip it."""
    model, opt = trained(setting, dropout=0.2) if setting == "lora" else trained(setting)
    pool, target = random_batch(5, seed=41), random_batch(2, seed=42)
    res = []
    for ckpt in (False, True):
        base = model.get_base_model() if setting == "lora" else model
        if ckpt:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(7)  # the same dropout masks in both runs (checkpoint replays the RNG)
        eng = GradEngine(model, opt, "sgd", loss_chunk_tokens=8)
        res.append(eng.score(pool, target))
        eng.close()
    assert base.is_gradient_checkpointing
    assert relerr(res[1].K, res[0].K) <= 1e-12 and relerr(res[1].b, res[0].b) <= 1e-12


@pytest.mark.parametrize("ckpt", [False, True])
def test_a_forward_hook_making_embeddings_require_grad_changes_nothing(ckpt):
    """transformers' `enable_input_require_grads` (which Trainers call for checkpointing) makes the
    embedding output a leaf that requires grad. Layers downstream then hand over their gradient by
    tensor hooks, not through the dummy leaf: every captured and local gradient must still arrive
    (the embedding's own local update included)."""
    model, opt = trained("full")
    pool, target = random_batch(5, seed=41), random_batch(2, seed=42)
    out = []
    for hooked in (False, True):
        if hooked:
            model.enable_input_require_grads()
            if ckpt:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for p in model.parameters():
            p.grad = None
        eng = GradEngine(model, opt, "sgd", loss_chunk_tokens=8)
        sc = eng.score(pool, target, k=3)
        eng.apply_update([0, 2, 4], [1.0, 0.5, 1.5])
        out.append((sc, grads_of([p for p in model.parameters() if p.requires_grad])))
        eng.close()
    (a, ga), (b, gb) = out
    emb = model.get_input_embeddings().weight
    assert emb.grad is not None and float(emb.grad.abs().sum()) > 0
    assert relerr(b.K, a.K) <= 1e-12 and relerr(b.b, a.b) <= 1e-12 and relerr(gb, ga) <= 1e-12


def test_reentrant_checkpointing_is_refused():
    """Reentrant checkpointing runs forwards under no_grad: nothing would be captured."""
    model = tiny_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(RuntimeError, match="reentrant"):
        GradEngine(model, None, "sgd").score(random_batch(3, seed=1), random_batch(2, seed=2))


class PlainRMSNorm(torch.nn.Module):
    """Named like an RMSNorm but only scales: the RMSNorm closed form does not fit it."""

    def __init__(self, d):
        super().__init__()
        self.weight, self.eps = torch.nn.Parameter(torch.rand(d, dtype=F64) + 0.5), 1e-6

    def forward(self, x):
        return self.weight * x * 2.0


@pytest.mark.parametrize("module", [PlainRMSNorm(6), torch.nn.LayerNorm(6, dtype=F64),
                                    torch.nn.Embedding(9, 6, padding_idx=0, dtype=F64)])
def test_local_closed_forms_are_checked_once_and_fall_back_when_wrong(module):
    """The row-wise update by closed form equals autograd through the module, or (a module the
    form does not fit) is found out on the first update and re-run from then on."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 9, (4, 5), generator=g) if isinstance(module, torch.nn.Embedding) else \
        torch.randn(4, 5, 6, generator=g, dtype=F64)
    e = torch.randn(4, 5, 6, generator=g, dtype=F64)
    coef = torch.tensor([0.5, 0.0, 2.0, 1.0], dtype=F64)
    params = [p for p in module.parameters()]
    site = LocalSite(module, params, saved=[(x, e, 0)])
    for _ in range(2):
        for p in params:
            p.grad = None
        local_update([site], coef)
        with torch.enable_grad():
            ref = torch.autograd.grad((module(x) * e * coef[:, None, None]).sum(), params)
        assert all(relerr(p.grad, r) <= 1e-12 for p, r in zip(params, ref))
        assert site.closed is (not isinstance(module, PlainRMSNorm))
    if isinstance(module, torch.nn.Embedding):
        assert (params[0].grad[0] == 0).all()  # the padding row never trains


def test_a_closed_form_is_judged_only_on_a_finite_non_zero_gradient():
    """A first update whose module gradient is not finite proves nothing: the check waits."""
    module = PlainRMSNorm(6)
    g = torch.Generator().manual_seed(1)
    x, e = torch.randn(2, 3, 6, generator=g, dtype=F64), torch.randn(2, 3, 6, generator=g, dtype=F64)
    bad = e.clone()
    bad[0, 0, 0] = float("inf")
    site = LocalSite(module, [module.weight], saved=[(x, bad, 0)])
    local_update([site], torch.ones(2, dtype=F64))
    assert site.closed is None
    site.saved = [(x, torch.zeros_like(e), 0)]  # an all-zero gradient: no evidence either
    local_update([site], torch.ones(2, dtype=F64))
    assert site.closed is None
    site.saved = [(x, e, 0)]
    local_update([site], torch.ones(2, dtype=F64))
    assert site.closed is False
