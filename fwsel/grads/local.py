"""Row-wise fallback modules (embeddings, norms) updated without a second pass through the model.

Parameters outside the products (docs/method.md#per-sample-gradient-products: embeddings, norms) still need the weighted
subset's gradient at update time. For a module whose output row i depends only on input row i
(an `nn.Embedding`, a LayerNorm, an RMSNorm) that owns its parameters alone (not tied to another
module), the scoring pass keeps the module's input and output gradient `E`, and the update
re-runs just that module on the selected rows and back-propagates `w_i E_i / |S|` into its own
parameters: the same gradient as a weighted backward through the whole model, at the cost of
the module alone. Everything else (a head tied to the embedding, unknown module types) keeps
the weighted backward over the selected rows (`GradEngine._fallback_backward`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .loss import unwrap


@dataclass
class LocalSite:
    module: nn.Module
    params: list
    saved: list = field(default_factory=list)  # (input, output grad, first global row) per call


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


def local_update(sites, row_coef: torch.Tensor) -> None:
    """Add `sum_i row_coef_i * grad l_i` into `.grad` of every local site's parameters.

    One autograd call over every site's re-run on the selected rows (module-local graphs only).
    """
    outs, grads = [], []
    with torch.enable_grad():
        for site in sites:
            for x, e, r0 in site.saved:
                c = row_coef[r0 : r0 + x.shape[0]].to(e.device)
                sel = torch.nonzero(c).flatten()
                if sel.numel() == 0:
                    continue
                wide = torch.promote_types(e.dtype, torch.float32)  # weight in at least float32
                scale = c[sel].to(wide).view(-1, *[1] * (e.dim() - 1))
                out = site.module(x[sel])
                outs.append(out)
                grads.append((e[sel].to(wide) * scale).to(out.dtype))
        if outs:
            torch.autograd.backward(outs, grads, inputs=[p for s in sites for p in s.params])
