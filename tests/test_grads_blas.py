"""The CPU per-row matmul through numpy's BLAS: the same numbers as torch's, at torch's thread count."""

import pytest
import torch
from threadpoolctl import ThreadpoolController, threadpool_info, threadpool_limits

from fwsel.grads import blas


@pytest.mark.parametrize("dtype,T", [(torch.float32, 7), (torch.float64, 7), (torch.bfloat16, 7),
                                     (torch.float32, 1),  # one token: torch's (numpy's plain loop is slow)
                                     (torch.float32, 2 * blas.SMALL // 24)])  # past SMALL: torch's
def test_bmm_into_a_strided_buffer_equals_torch(dtype, T):
    g = torch.Generator().manual_seed(0)
    E, X = torch.randn(5, T, 6, generator=g).to(dtype), torch.randn(5, T, 4, generator=g).to(dtype)
    buf = torch.full((5, 40), float("nan"), dtype=dtype)
    out = buf[:, 3:27].view(5, 6, 4)  # one block of a row-major per-sample buffer: batch stride 40
    blas.bmm_into(E.transpose(1, 2), X, out)
    ref = torch.bmm(E.transpose(1, 2).double(), X.double())
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, 2e-2)
    assert (out.double() - ref).abs().max() <= tol * ref.abs().max()
    assert buf[:, :3].isnan().all() and buf[:, 27:].isnan().all()  # nothing outside the block written


def test_the_scoring_pass_holds_numpys_blas_to_torchs_threads():
    def blas_threads():
        return {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    with threadpool_limits(limits=3, user_api="blas"):  # as OpenBLAS starts on a 3-core machine
        with blas.threads():
            inside = blas_threads()
        after = blas_threads()
    assert inside and set(inside.values()) == {torch.get_num_threads()} and set(after.values()) == {3}
    libs = ThreadpoolController().select(user_api="blas").lib_controllers
    torch_threads, before = torch.get_num_threads(), [lib.num_threads for lib in libs]
    try:  # a lower limit the user set stays: the context caps each library, it never raises one
        torch.set_num_threads(2)
        for lib, k in zip(libs, (1, 3)):
            lib.set_num_threads(k)
        with blas.threads():
            inside = [lib.num_threads for lib in libs]
        assert inside[:2] == [1, 2][: len(libs)] and [lib.num_threads for lib in libs][:2] == [1, 3][: len(libs)]
    finally:
        torch.set_num_threads(torch_threads)
        for lib, k in zip(libs, before):
            lib.set_num_threads(k)
