"""Batched per-row gradients on the CPU through numpy's BLAS (docs/method.md#per-sample-gradient-products).

`G_i = E_i^T X_i` for every row goes into the rows of the per-sample buffer, whose block of
columns is strided (one buffer row per sample). Given a strided `out`, torch's CPU `bmm` runs
one small matmul per row through its dispatcher (40 rows x 14 layers: ~560 calls a step at the
default size, mostly overhead); numpy's `matmul` loops over the rows in C and calls the BLAS
directly: about 1.6x faster for these shapes, the same numbers to rounding (for larger per-row
products torch's MKL kernels win, and those stay with torch: `SMALL`). numpy's OpenBLAS
starts a thread per core unless told otherwise, so the scoring pass holds it to torch's thread
count (`threads`). A matmul with a dimension of 1 stays with torch: numpy takes its plain loop there.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

_controller = None  # threadpoolctl's view of the loaded BLAS libraries, made on first use


@contextlib.contextmanager
def threads():
    """Context: each BLAS library loaded by the first call (numpy's, scipy's) at no more threads
    than torch uses (a library already at fewer stays as it is)."""
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()
    n = torch.get_num_threads()
    over = [(lib, lib.num_threads) for lib in _controller.select(user_api="blas").lib_controllers
            if lib.num_threads > n]
    for lib, _ in over:
        lib.set_num_threads(n)
    try:
        yield
    finally:
        for lib, old in over:
            lib.set_num_threads(old)


SMALL = 2**18  # multiply-adds per row below which numpy's loop wins (measured: 0.3-0.9x of torch's time
# up to ~5e5 at 16-128 tokens, 1.2-1.5x from ~1e6: there MKL's kernels beat OpenBLAS's)


def bmm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """`out = a @ b` batched (`out` may be a strided view): numpy's matmul for small float32/float64
    products on the CPU when every operand has unit stride in one of its last two dims, else
    torch's `bmm`."""
    if out.device.type == "cpu" and out.dtype in (torch.float32, torch.float64) and \
            a.dtype == b.dtype == out.dtype and a.shape[-2] * a.shape[-1] * b.shape[-1] <= SMALL and \
            min(a.shape[-2], a.shape[-1], b.shape[-1]) > 1 and \
            all(min(t.stride()[-2:]) == 1 for t in (a, b, out)):
        np.matmul(a.detach().numpy(), b.detach().numpy(), out=out.detach().numpy())
    else:
        torch.bmm(a, b, out=out)
