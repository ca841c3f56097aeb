"""Which parameters the engine captures, and the hooks that capture them (docs/method.md#per-sample-gradient-products).

Every trainable `nn.Linear` is captured (peft's `lora_A` / `lora_B` sub-modules, or every
Linear in full fine-tuning, an untied `lm_head` included); a Linear whose weight is shared
with a non-Linear module (a head tied to the embedding) is not. Everything else trainable
(embeddings, norms, peft `modules_to_save` copies that are not Linear) is a *fallback*
parameter, left out of the products: row-wise modules (embeddings, norms) are updated locally
from what their hooks keep (fwsel.grads.local), the rest through an ordinary weighted backward.

While scoring, every trainable parameter is temporarily marked `requires_grad=False` and each
captured Linear's output is tapped (`tap`): a tensor hook where the output already requires
grad, else an identity autograd function tied to a dummy leaf (which makes the rest of the
graph require grad). The backward then delivers each call's output gradient `E` to the tap,
which forms `G_i = E_i^T X_i` for every row at once (batched matmul) into one row-major buffer
`[rows, P]`, while autograd never forms the summed weight gradients nor touches `.grad`.
A site on the token-Gram path (`Site.ghost`, chosen per scoring pass) keeps its weight's
factors instead (`X` and `E` of every unpadded token, fwsel.grads.ghost) and has no columns in
the buffer; its bias, if any, is still materialised.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from .blas import bmm_into
from .local import LocalSite, find_local
from .loss import unwrap


@dataclass
class Block:
    """One captured parameter: columns `start:end` of the per-sample buffer."""

    param: nn.Parameter
    name: str
    start: int
    end: int
    ghost: "Site | None" = None  # this scoring pass: the token-Gram site holding the factors


@dataclass
class Site:
    """One captured Linear module and its parameter blocks."""

    module: nn.Linear
    weight: Block
    bias: Block | None
    ghost: bool = False  # token-Gram path for the weight in this scoring pass
    factors: list = field(default_factory=list)  # (X [tok, d_in], E [tok, d_out], rows [tok])


def lora_layers(model: nn.Module) -> list:
    """(name, module) of every peft LoraLayer in the model (none without peft)."""
    if "peft" not in sys.modules:  # never imported: the model holds no peft layer (saves its import)
        return []
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def check_peft(model: nn.Module, layers=None) -> None:
    """Raise on peft setups whose adapter output is not `lora_B(lora_A(dropout(x))) * s`.

    `layers`: `lora_layers(model)` found before (every score re-checks their state, not the tree)."""
    cfgs = getattr(model, "peft_config", None) or {}
    for name, cfg in cfgs.items():
        kind = str(getattr(cfg, "peft_type", "LORA")).split(".")[-1]
        if kind != "LORA":
            raise ValueError(f"fwsel.grads supports only peft LoRA; adapter {name!r} is {kind}")
    for mname, m in lora_layers(model) if layers is None else layers:
        if m.merged:
            raise ValueError(f"{mname}: merged LoRA adapters cannot be captured (unmerge first)")
        if m.disable_adapters:
            raise ValueError(f"{mname}: adapters are disabled; enable them before scoring")
        for a in m.active_adapters:
            if a in m.lora_variant or m.use_dora.get(a, False):
                raise ValueError(f"{mname}: adapter {a!r} is a LoRA variant (DoRA, ...): unsupported")
            if a in m.lora_embedding_A:
                raise ValueError(f"{mname}: LoRA on embeddings is unsupported")
            for sub in (m.lora_A[a] if a in m.lora_A else None, m.lora_B[a] if a in m.lora_B else None):
                if sub is not None and type(sub) is not nn.Linear:
                    raise ValueError(f"{mname}: adapter {a!r} uses {type(sub).__name__}, not nn.Linear")


def find_sites(model: nn.Module):
    """(captured sites, blocks in buffer order, fallback parameters)."""
    base = unwrap(model)
    shared = {id(p) for m in base.modules() if not isinstance(m, nn.Linear) for p in m.parameters(False)}
    names = {id(p): n for n, p in base.named_parameters(remove_duplicate=False)}
    blocks: dict[int, Block] = {}
    sites, offset = [], 0

    def block(p):
        nonlocal offset
        if id(p) not in blocks:
            blocks[id(p)] = Block(p, names.get(id(p), "?"), offset, offset + p.numel())
            offset += p.numel()
        return blocks[id(p)]

    for m in base.modules():
        if isinstance(m, nn.Linear) and m.weight.requires_grad and id(m.weight) not in shared:
            bias = m.bias if m.bias is not None and m.bias.requires_grad else None
            sites.append(Site(m, block(m.weight), block(bias) if bias is not None else None))
    fallback = [p for p in base.parameters() if p.requires_grad and id(p) not in blocks]
    return sites, list(blocks.values()), fallback


@contextmanager
def requires_grad(params, flag: bool):
    """Temporarily set `requires_grad` on `params` (restored on exit)."""
    old = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(flag)
        yield
    finally:
        for p, o in zip(params, old):
            p.requires_grad_(o)


class _Tap(torch.autograd.Function):
    """Identity on a module output; hands the module input `x` and the output gradient to `sink`
    in backward. `x` is a saved tensor, so gradient checkpointing drops it after the forward and
    recomputes it for the backward, as it does the layer's own activations."""

    @staticmethod
    def forward(ctx, out, dummy, x, sink):
        ctx.sink = sink
        ctx.save_for_backward(x)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        if ctx.sink is not None:
            ctx.sink(ctx.saved_tensors[0], grad)
        return grad, None, None, None


class _OnGrad:
    """A tap's tensor hook. It lets go of `x` and `sink` once it has fired, as `_Tap` releases its
    saved `x` after its backward: the graph's nodes (and with them their hooks) outlive the backward
    while the caller holds the loss, and `x` is, layer by layer, nearly every activation."""

    __slots__ = ("sink", "x")

    def __init__(self, sink, x):
        self.sink, self.x = sink, x

    def __call__(self, grad):
        sink, x, self.sink, self.x = self.sink, self.x, None, None
        if sink is not None and grad is not None:  # None: no consumer passed a gradient (zero; `_Tap` got zeros)
            sink(x, grad)


def _saving_hooked() -> bool:
    """Whether saved-tensor hooks are active (a non-reentrant checkpoint's forward, offloading)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def tap(output, dummy, x, sink):
    """Hand `x` and `output`'s gradient to `sink` in backward. An output that already requires grad
    gets a tensor hook (a fraction of a custom autograd node's cost each way): the backward is not
    limited to `dummy`, so the hook fires wherever the loss depends on the output, even through a
    leaf that some forward hook made require grad (transformers' `enable_input_require_grads`).
    One that does not (the first captured layer, with every parameter frozen) is tied to `dummy`
    by `_Tap`, as is every output under saved-tensor hooks, so that checkpointing still drops and
    recomputes `x`."""
    if output.requires_grad and not _saving_hooked():
        output.register_hook(_OnGrad(sink, x))
        return None
    return _Tap.apply(output, dummy, x, sink)


class Capture:
    """Forward hooks registered once on the captured Linears; they act only while `active`."""

    def __init__(self, model: nn.Module):
        self.sites, self.blocks, self.fallback = find_sites(model)
        self.base = unwrap(model)
        self.local = find_local(model, self.fallback)
        local = {id(p) for s in self.local for p in s.params}
        self.pass_params = [p for p in self.fallback if id(p) not in local]  # need the weighted backward
        self.size = self.blocks[-1].end if self.blocks else 0
        self.mat_blocks = list(self.blocks)  # blocks with buffer columns (see `layout`)
        self.captured = [b.param for b in self.blocks]
        frozen = {id(p) for p in self.captured + self.fallback}  # what scoring freezes
        self._others = [p for p in self.base.parameters() if id(p) not in frozen]  # frozen when built
        dt = {p.dtype for p in self.captured}
        self.dtype = torch.float64 if torch.float64 in dt else torch.float32  # per-sample grads
        self.device = self.captured[0].device if self.captured else torch.device("cpu")
        self.active = False
        self.buf: torch.Tensor | None = None  # [rows, size] per-sample gradients
        self.spare: torch.Tensor | None = None  # the last buffer, reused on the CPU (see `release`)
        self.written: set = set()  # (id(block), first row, end row) written in this pass (see `scoring`)
        self.offset = 0  # global row of the current micro-batch's first row
        self.mb_rows = 0  # rows in the current micro-batch
        self.tok_mask: torch.Tensor | None = None  # [mb_rows, width] unpadded tokens (ghost factors)
        self.chunk_rows: torch.Tensor | None = None  # local row of each head-chunk token
        self.dummy: torch.Tensor | None = None
        self.handles = [s.module.register_forward_hook(partial(self._hook, s)) for s in self.sites]
        self.handles += [s.module.register_forward_hook(partial(self._local_hook, s)) for s in self.local]

    def on_chunk(self, rows: torch.Tensor) -> None:
        self.chunk_rows = rows

    def layout(self, ghost) -> None:
        """Mark the token-Gram sites (a set of site indices) and give the other blocks buffer columns."""
        for s in self.sites:
            s.ghost, s.factors = False, []
        for s in self.local:
            s.saved = []
        for b in self.blocks:
            b.ghost = None
        for i in ghost:
            self.sites[i].ghost = True
            self.sites[i].weight.ghost = self.sites[i]
        offset = 0
        for b in self.blocks:
            n = 0 if b.ghost is not None else b.param.numel()
            b.start, b.end, offset = offset, offset + n, offset + n
        self.size = offset
        self.mat_blocks = [b for b in self.blocks if b.ghost is None]  # blocks with buffer columns

    @contextmanager
    def scoring(self, n_rows: int):
        """Allocate the buffer and capture, with no parameter requiring grad.

        The buffer is not zero-filled (a pass over all of it): a block's first contribution for a
        micro-batch writes its rows (`_first`), and what none reached is zeroed at the end."""
        if any(p.requires_grad for p in self._others):  # the scoring backward would write their .grad
            others = {id(q) for q in self._others}
            late = [n for n, p in self.base.named_parameters() if id(p) in others and p.requires_grad]
            raise ValueError(f"{len(late)} parameters ({', '.join(late[:3])}, ...) became trainable after the "
                             "gradient engine was built; build a new engine for the new trainable set")
        spare, self.spare = self.spare, None
        if spare is not None and spare.shape == (n_rows, self.size):
            self.buf = spare
        else:
            self.buf = torch.empty(n_rows, self.size, dtype=self.dtype, device=self.device)
        self.written = set()
        self.dummy = torch.zeros((), device=self.device, requires_grad=True)
        self.active = True
        try:
            with requires_grad(self.captured + self.fallback, False):  # local params are fallback ones
                yield
            self._zero_unwritten()
        finally:
            self.active, self.dummy, self.chunk_rows, self.tok_mask = False, None, None, None

    def _first(self, block: Block, span: tuple) -> bool:
        """Whether this is the block's first contribution for the micro-batch rows `span`."""
        key = (id(block), *span)
        if key in self.written:
            return False
        self.written.add(key)
        return True

    def _zero_first(self, block: Block, span: tuple) -> None:
        """Before accumulating into the block's rows of `span` from several calls: zero them once."""
        if self._first(block, span):
            self.buf[span[0] : span[1], block.start : block.end].zero_()

    def _zero_unwritten(self) -> None:
        """Zero each materialised block's rows that no contribution wrote (a module not called,
        a micro-batch with no backward): the gradient there is zero."""
        rows = {(r0, r1) for _, r0, r1 in self.written}
        if sum(r1 - r0 for r0, r1 in rows) == self.buf.shape[0] and \
                len(self.written) == len(rows) * sum(b.end > b.start for b in self.mat_blocks):
            return  # every block written for every micro-batch (the usual case)
        spans: dict[int, list] = {}
        for key, r0, r1 in self.written:
            spans.setdefault(key, []).append((r0, r1))
        for b in self.mat_blocks:
            done = sorted(spans.get(id(b), ()))
            if b.end == b.start or sum(r1 - r0 for r0, r1 in done) == self.buf.shape[0]:
                continue
            at = 0
            for r0, r1 in [*done, (self.buf.shape[0], None)]:
                if r0 > at:
                    self.buf[at:r0, b.start : b.end].zero_()
                at = r1

    def release(self) -> None:
        """Drop the buffer. On the CPU it is kept for the next pass of the same shape: a fresh
        allocation of that size costs page faults every step (CUDA's caching allocator avoids them)."""
        if self.buf is not None and self.buf.device.type == "cpu":
            self.spare = self.buf
        self.buf = None

    def factors(self, site):
        """The site's (X, E, rows) over every scored row, tokens sorted by row."""
        if not site.factors:  # never called in this pass: no tokens, zero gradient
            m, kw = site.module, dict(dtype=self.dtype, device=self.device)
            return (torch.zeros(0, m.in_features, **kw), torch.zeros(0, m.out_features, **kw),
                    torch.zeros(0, dtype=torch.long, device=self.device))
        X, E, rows = (parts[0] if len(parts) == 1 else torch.cat(parts) for parts in zip(*site.factors))
        if rows.numel() < 2 or bool((rows[1:] >= rows[:-1]).all()):  # calls came in row order
            return X, E, rows
        order = torch.argsort(rows, stable=True)
        return X[order], E[order], rows[order]

    def _state(self) -> str | None:
        """None outside scoring, "recompute" in a non-reentrant checkpoint's recomputation (inside
        backward: the tap is applied again with no sink, so the recomputed saved tensors line up
        with the forward's), else "capture"."""
        if not self.active:
            return None
        if torch._C._current_graph_task_id() != -1:
            return "recompute"
        if not torch.is_grad_enabled():  # scoring always runs under grad
            raise RuntimeError("a captured module ran without grad while scoring: reentrant gradient "
                               "checkpointing is unsupported (use use_reentrant=False)")
        return "capture"

    def _local_hook(self, site: LocalSite, module, args, output):
        state = self._state()
        if state is None:
            return None
        x = args[0].detach() if args else None
        if state == "recompute":
            return _Tap.apply(output, self.dummy, x, None)
        if x is None or x.dim() < 2 or x.shape[0] != self.mb_rows or not isinstance(output, torch.Tensor):
            raise RuntimeError(f"{type(module).__name__}: expected one [batch, ...] input and output")
        return tap(output, self.dummy, x, partial(self._local_sink, site, self.offset))

    @staticmethod
    def _local_sink(site, row0, x, grad):
        site.saved.append((x, grad.detach(), row0))

    def _hook(self, site, module, args, output):
        state = self._state()
        if state is None:
            return None
        x = args[0].detach()
        if state == "recompute":
            return _Tap.apply(output, self.dummy, x, None)
        if x.dim() >= 3:
            if x.shape[0] != self.mb_rows:
                raise RuntimeError(f"captured Linear saw batch {x.shape[0]}, expected {self.mb_rows}")
            rows = self.offset
        else:
            if self.chunk_rows is None or self.chunk_rows.numel() != x.shape[0]:
                raise RuntimeError("a captured Linear was called on 2-D input outside the loss head")
            rows = self.chunk_rows + self.offset
        span = (self.offset, self.offset + self.mb_rows)
        return tap(output, self.dummy, x, partial(self._sink, site, rows, self.tok_mask, span))

    def _sink(self, site, rows, mask, span, x, grad):
        x, e = x.to(self.dtype), grad.to(self.dtype)
        w, b = site.weight, site.bias
        if isinstance(rows, int):  # batched [B, ..., d]: every row's tokens at once
            n = x.shape[0]
            X, E = x.reshape(n, -1, x.shape[-1]), e.reshape(n, -1, e.shape[-1])
            if site.ghost:
                r = torch.arange(rows, rows + n, device=X.device)[:, None].expand(X.shape[:2])
                if mask is None or mask.shape != X.shape[:2] or bool(mask.all()):  # every token: views
                    site.factors.append((X.reshape(-1, X.shape[-1]), E.reshape(-1, E.shape[-1]), r.reshape(-1)))
                else:
                    site.factors.append((X[mask], E[mask], r[mask]))
            else:  # G_i = E_i^T X_i written (first call) or added in place into the row's columns
                dst = self.buf[rows : rows + n, w.start : w.end].view(n, E.shape[-1], X.shape[-1])
                if self._first(w, span):
                    bmm_into(E.transpose(1, 2), X, dst)
                else:
                    dst.baddbmm_(E.transpose(1, 2), X)
            if b is not None:
                self._zero_first(b, span)
                self.buf[rows : rows + n, b.start : b.end] += E.sum(1)
            return
        # head chunk [tokens, d]: tokens of one row are contiguous
        if site.ghost:
            site.factors.append((x, e, rows))
            if b is not None:
                self._zero_first(b, span)
                self.buf[:, b.start : b.end].index_add_(0, rows, e)
            return
        self._zero_first(w, span)
        if b is not None:
            self._zero_first(b, span)
        uniq, counts = torch.unique_consecutive(rows, return_counts=True)
        sizes = counts.tolist()
        for r, xs, es in zip(uniq.tolist(), x.split(sizes), e.split(sizes)):
            self.buf[r, w.start : w.end] += (es.T @ xs).reshape(-1)
            if b is not None:
                self.buf[r, b.start : b.end] += es.sum(0)

    def close(self) -> None:
        self.buf = self.spare = None
        for h in self.handles:
            h.remove()
        self.handles = []
