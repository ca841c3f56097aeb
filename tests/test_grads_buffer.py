"""The per-sample buffer is reused between passes without a zero fill: whatever it held before
(here NaN) never leaks into a pass, also for a captured Linear the forward never calls. A row
whose gradient holds a NaN while its loss is finite is found whichever way its finiteness is
checked (before the products, or from its squared norm in sgd geometry)."""

import pytest
import torch
from test_grads import relerr, trained
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


class Poisoned(GradEngine):
    """Puts a NaN into pool row 2's per-sample gradient (its loss stays finite)."""

    def _exchange(self, n, losses, rows):
        rows[2, rows.shape[1] // 2] = float("nan")
        return super()._exchange(n, losses, rows)


@pytest.mark.parametrize("metric,products", [("sgd", ("b", "sq_norms")), ("sgd", ("b", "k")),
                                             ("sgd", ("b", "k", "sq_norms")), ("adam", ("b", "k")),
                                             ("sgd", ("b",)), ("sgd", ("b", "nonzero"))])
def test_a_nan_gradient_row_is_dropped_and_the_others_are_untouched(metric, products):
    model, opt = trained("full")
    pool, target = random_batch(5, seed=7), random_batch(2, seed=8)
    clean = GradEngine(model, opt, metric, products=products).score(pool, target)
    engine = Poisoned(model, opt, metric, products=products)
    sc = engine.score(pool, target)
    keep = [0, 1, 3, 4]
    assert sc.finite.tolist() == [True, True, False, True, True] and bool(clean.finite.all())
    assert (sc.b[2] == 0).all() and (engine.cap.buf[2] == 0).all()
    assert sc.sq_norms is None if products[-1] in ("b", "nonzero") else sc.sq_norms[2] == 0
    if metric == "sgd":  # no pool statistic: the other rows' products are exactly the clean ones
        assert torch.equal(sc.b[keep], clean.b[keep])
        if sc.sq_norms is not None:
            assert torch.equal(sc.sq_norms[keep], clean.sq_norms[keep])
    if sc.K is not None:
        assert (sc.K[2] == 0).all() and (sc.K[:, 2] == 0).all() and torch.isfinite(sc.K).all()
        if metric == "sgd":
            assert torch.equal(sc.K[keep][:, keep], clean.K[keep][:, keep])
    with pytest.warns(UserWarning, match="non-finite"):
        engine.apply_update([1, 2], [1.0, 1.0])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


class PoisonedTarget(GradEngine):
    """Puts a NaN into target row 1's gradient (its loss stays finite)."""

    def _exchange(self, n, losses, rows):
        rows[n + 1, rows.shape[1] // 3] = float("nan")
        return super()._exchange(n, losses, rows)


@pytest.mark.parametrize("metric,products,kw", [
    ("sgd", ("b", "nonzero"), {}), ("sgd", ("b", "k"), {}), ("adam", ("b", "k"), {}),
    ("sgd", ("b",), {"grad_path": "materialize"})])
def test_a_nan_gradient_target_row_leaves_g_T_like_a_target_without_it(metric, products, kw):
    """The target rows' finiteness comes from their mean `g_T` (no pass over each row first): a
    target row with a NaN entry must still leave `g_T`, `b` and `y2` (token-Gram layers included)
    exactly as if it were not in the target batch, and no pool row may be dropped for it."""
    model, opt = trained("full")
    pool, target = random_batch(5, seed=7), random_batch(3, seed=8)
    without = {key: val[[0, 2]] for key, val in target.items()}
    clean = GradEngine(model, opt, metric, products=products, **kw).score(pool, without, k=2)
    sc = PoisonedTarget(model, opt, metric, products=products, **kw).score(pool, target, k=2)
    assert bool(sc.finite.all())
    assert relerr(sc.b, clean.b) <= 1e-10 and abs(sc.y2 - clean.y2) <= 1e-10 * abs(clean.y2)
    if sc.K is not None:
        assert relerr(sc.K, clean.K) <= 1e-10


def test_a_metric_folded_into_the_pool_rows_is_divided_out_for_readers():
    """adam with K: the pool rows hold g * sqrt(M) after the products; plain_rows gives g back."""
    model, opt = trained("full")
    pool, target = random_batch(5, seed=3), random_batch(2, seed=4)
    folded = GradEngine(model, opt, "adam")
    plain = GradEngine(model, opt, "adam", aux_metrics=("sgd",))  # aux metrics read the plain rows: no fold
    a, b = folded.score(pool, target, k=2), plain.score(pool, target, k=2)
    assert folded._roots and not plain._roots
    assert not torch.allclose(folded._rows, plain._rows)
    assert torch.allclose(folded.plain_rows(), plain._rows, rtol=1e-12, atol=1e-14)
    assert torch.allclose(a.K, b.K, rtol=1e-10) and torch.allclose(a.b, b.b, rtol=1e-10)
    assert abs(a.y2 - b.y2) <= 1e-10 * abs(b.y2)


class Gathered(GradEngine):
    """Products over a copy of the rows, as the sharded engine's gathered matrix: the metric is
    folded into the copy, the update still reads the captured (unscaled) buffer."""

    def _exchange(self, n, losses, rows):
        return n, losses, rows.clone()


def test_the_update_is_the_same_when_the_products_read_a_copy_of_the_rows():
    pool, target = random_batch(5, seed=5), random_batch(2, seed=6)
    grads = []
    for cls in (GradEngine, Gathered):
        model, opt = trained("full")
        engine = cls(model, opt, "adam")
        engine.score(pool, target, k=2)
        assert engine._roots  # the metric was folded into the rows the products read
        engine.apply_update([0, 3], [1.0, 2.0])
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-10, atol=1e-14)


class ZeroRows(GradEngine):
    """Zeroes pool row 1's gradient and, with `no_target`, every target row's (g_T = 0, so b = 0)."""

    no_target = False

    def _exchange(self, n, losses, rows):
        rows[1] = 0
        if self.no_target:
            rows[n:] = 0
        return super()._exchange(n, losses, rows)


@pytest.mark.parametrize("grad_path", ["materialize", "auto"])
@pytest.mark.parametrize("no_target", [False, True])
def test_the_nonzero_mask_equals_positive_norms_without_forming_them(no_target, grad_path):
    """TracIn's candidate mask from b (b_i != 0 means g_i != 0); rows with b_i = 0 (here every row,
    when g_T = 0) settle it by their norms, the token-Gram head's (auto) included."""
    model, opt = trained("full")
    pool, target = random_batch(5, seed=11), random_batch(2, seed=12)
    ref = ZeroRows(model, opt, "sgd", products=("b", "sq_norms"), grad_path=grad_path)
    eng = ZeroRows(model, opt, "sgd", products=("b", "nonzero"), grad_path=grad_path)
    ref.no_target = eng.no_target = no_target
    a, b = ref.score(pool, target), eng.score(pool, target)
    assert b.sq_norms is None and b.nonzero.tolist() == (a.sq_norms > 0).tolist()
    if grad_path == "materialize":  # row 1's whole gradient is zero
        assert b.nonzero.tolist() == [True, False, True, True, True] and bool((b.b == 0).all()) == no_target
    else:  # its head part is not (a token-Gram layer: not in the buffer)
        assert eng._ghost and bool(b.nonzero.all())


def test_adam_finds_a_nan_row_through_pool_q_also_after_earlier_runs_were_folded():
    """adam with pool q checks no row before the products: the NaN shows in pool q, the runs
    already scaled by sqrt(M) are unscaled and the products redone without the row, the same
    (to rounding) whether the columns go in one run or in many."""
    model, opt = trained("full")
    pool, target = random_batch(5, seed=7), random_batch(2, seed=8)
    one, many = Poisoned(model, opt, "adam"), Poisoned(model, opt, "adam")
    many.group_entries = 2**12  # runs of ~800 columns: the NaN (mid-buffer) is met after several folds
    a, b = one.score(pool, target, k=2), many.score(pool, target, k=2)
    assert a.finite.tolist() == b.finite.tolist() == [True, True, False, True, True]
    assert relerr(b.K, a.K) <= 1e-6 and relerr(b.b, a.b) <= 1e-6 and (b.K[2] == 0).all()
    assert torch.isfinite(b.K).all() and (many.cap.buf[2] == 0).all()


def test_a_metric_that_is_zero_somewhere_is_not_folded_and_nothing_turns_nan():
    """AdamW's D is 0 where the second moment is inf (an overflowed gradient, frozen since): the
    fold could not be divided out, so it is skipped; the update, plain_rows() and a NaN row's
    retry stay finite, and only the NaN row is dropped."""
    model, opt = trained("full")
    pool, target = random_batch(5, seed=7), random_batch(2, seed=8)
    eng = GradEngine(model, opt, "adam")
    p = eng.cap.mat_blocks[0].param  # a captured weight whose rows are in the buffer
    opt.state[p]["exp_avg_sq"].view(-1)[0] = float("inf")
    eng.score(pool, target, k=2)
    assert torch.isfinite(eng.plain_rows()).all()
    eng.apply_update([0, 1], [1.0, 1.0])
    assert all(torch.isfinite(q.grad).all() for q in model.parameters() if q.grad is not None)
    for q in model.parameters():
        q.grad = None
    bad = Poisoned(model, opt, "adam")
    bad.group_entries = 2**12
    sc = bad.score(pool, target, k=2)
    assert sc.finite.tolist() == [True, True, False, True, True] and torch.isfinite(sc.K).all()
