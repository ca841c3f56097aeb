"""Row-wise fallback modules (embeddings, norms) updated without a second pass through the model.

Parameters outside the products (docs/method.md#per-sample-gradient-products: embeddings, norms) still need the weighted
subset's gradient at update time. For a module whose output row i depends only on input row i
(an `nn.Embedding`, a LayerNorm, an RMSNorm) that owns its parameters alone (not tied to another
module), the scoring pass keeps the module's input and output gradient `E`, and the update
re-runs just that module on the selected rows and back-propagates `w_i E_i / |S|` into its own
parameters: the same gradient as a weighted backward through the whole model, at the cost of
the module alone. Cheaper still, a closed form for these module kinds (`closed_form`) takes
over once it has matched that re-run on the site's first update (a module that only looks like
one of them, e.g. a norm with another formula, keeps the re-run). Everything else (a head tied
to the embedding, unknown module types) keeps the weighted backward over the selected rows
(`GradEngine._fallback_backward`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .loss import unwrap


@dataclass
class LocalSite:
    module: nn.Module
    params: list
    saved: list = field(default_factory=list)  # (input, output grad, first global row) per call
    closed: bool | None = None  # `closed_form` in use: None until checked against a re-run (finite, non-zero)


def row_wise(m: nn.Module) -> bool:
    """Module types whose output row i is a function of input row i alone."""
    if isinstance(m, nn.Embedding):
        return m.max_norm is None  # max_norm renormalises the weight in forward
    return isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")


def find_local(model: nn.Module, fallback) -> list[LocalSite]:
    """Row-wise modules owning only fallback parameters that no other module shares."""
    base = unwrap(model)
    fb = {id(p) for p in fallback}
    owners: dict[int, int] = {}
    for m in base.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    out = []
    for m in base.modules():
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if own and row_wise(m) and all(id(p) in fb and owners[id(p)] == 1 for p in own):
            out.append(LocalSite(m, own))
    return out


def _lead_sum(t: torch.Tensor, d: int) -> torch.Tensor:
    """`t` summed over every dimension but its last `d`."""
    return t.reshape(-1, *t.shape[t.dim() - d :]).sum(0)


def closed_form(m: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict | None:
    """{id(param): gradient of sum(g * m(x))} for an embedding (the kernel autograd calls), an
    RMSNorm (`g * x / rms(x)` as Llama forms it) or a LayerNorm; None for any other module. Cheaper
    than re-running the module under autograd; `local_update` checks it against that once."""
    if isinstance(m, nn.Embedding):
        if m.scale_grad_by_freq or m.sparse:
            return None
        pad = -1 if m.padding_idx is None else m.padding_idx
        return {id(m.weight): torch.ops.aten.embedding_dense_backward(g, x, m.num_embeddings, pad, False)}
    if isinstance(m, nn.LayerNorm):
        shape = tuple(m.normalized_shape)
        xhat = nn.functional.layer_norm(x, shape, None, None, m.eps)
        out = {id(m.weight): _lead_sum(g * xhat, len(shape))} if m.weight is not None else {}
        return out | ({id(m.bias): _lead_sum(g, len(shape))} if m.bias is not None else {})
    w = getattr(m, "weight", None)
    eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
    if type(m).__name__.endswith("RMSNorm") and isinstance(w, torch.Tensor) and w.dim() == 1 and eps is not None:
        xf = x.to(torch.float32)
        n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        return {id(w): _lead_sum(g * n, 1)}
    return None


def _agrees(got: dict, params, ref) -> bool | None:
    """Whether the closed form's gradients `got` match autograd's `ref` (to rounding); None (check
    again next update) when autograd's are not finite or all zero: no evidence either way."""
    verdicts = []
    for p, r in zip(params, ref):
        mine = got.get(id(p))
        if r is None or mine is None or mine.shape != r.shape:
            return False
        scale = float(r.abs().max())
        if not math.isfinite(scale) or scale == 0:
            verdicts.append(None)
            continue
        tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(r.dtype, 3e-2) * scale
        verdicts.append(float((mine.to(r.dtype) - r).abs().max()) <= tol)  # NaN: False
    return False if False in verdicts else None if None in verdicts else True


def _add_grad(p, g) -> None:
    g = g if g.dtype == p.dtype else g.to(p.dtype)
    p.grad = g if p.grad is None else p.grad.add_(g)


def _picks(row_coef: torch.Tensor):
    """`(r0, rows, like) -> (selected local rows, their coefficients in at least float32)`,
    memoised: every site saved in the same micro-batch selects the same rows."""
    memo = {}

    def pick(r0: int, m: int, like: torch.Tensor):
        key = (r0, m, like.device, like.dtype)
        if key not in memo:
            c = row_coef[r0 : r0 + m].to(like.device)
            sel = torch.nonzero(c).flatten()
            wide = torch.promote_types(like.dtype, torch.float32)  # weight in at least float32
            memo[key] = (sel, c[sel].to(wide)) if sel.numel() else (None, None)
        return memo[key]
    return pick


def local_update(sites, row_coef: torch.Tensor) -> None:
    """Add `sum_i row_coef_i * grad l_i` into `.grad` of every local site's parameters.

    The sites' modules are re-run on the selected rows under autograd (module-local graphs, one
    call), except where a closed form (`closed_form`) agreed with that on the site's first update.
    """
    runs, checks = [], []  # (site, parts) to re-run; (site, parts, closed-form gradients) to check
    pick = _picks(row_coef)
    for site in sites:
        parts = []  # (selected inputs, scaled output gradient) per call
        for x, e, r0 in site.saved:
            sel, scale = pick(r0, x.shape[0], e)
            if sel is None:
                continue
            s = scale.view(-1, *[1] * (e.dim() - 1))
            es = e[sel] * s if e.dtype == s.dtype else (e[sel].to(s.dtype) * s).to(e.dtype)
            parts.append((x[sel], es))
        forms = [closed_form(site.module, xs, g) for xs, g in parts] if parts and site.closed is not False else []
        if forms and all(f is not None for f in forms):
            got = forms[0] if len(forms) == 1 else {key: sum(f[key] for f in forms) for key in forms[0]}
            if site.closed:
                for p in site.params:
                    _add_grad(p, got[id(p)])
            else:
                checks.append((site, parts, got))
        elif parts:
            site.closed = False
            runs.append((site, parts))
    todo = runs + [(site, parts) for site, parts, _ in checks]
    if not todo:
        return
    params = [p for site, _ in todo for p in site.params]
    with torch.enable_grad():
        outs = [site.module(xs) for site, parts in todo for xs, _ in parts]
        ref = torch.autograd.grad(outs, params, [g for _, parts in todo for _, g in parts], allow_unused=True)
    ref = dict(zip(map(id, params), ref))
    for site, _, got in checks:  # the first update takes autograd's gradient; the check picks the next ones'
        site.closed = _agrees(got, site.params, [ref[id(p)] for p in site.params])
    for p in params:
        if ref[id(p)] is not None:
            _add_grad(p, ref[id(p)])
