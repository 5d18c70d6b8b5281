"""The Triton kernels of the fusion ops on the CPU through Triton's interpreter.

Skipped unless TRITON_INTERPRET=1 (it must be set before triton loads):
    TRITON_INTERPRET=1 pytest tests/custom_ops/test_fused_kernels_interpret.py
"""

import os

import pytest
import torch
import torch.nn.functional as F

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("set TRITON_INTERPRET=1 to run the Triton kernels on the CPU", allow_module_level=True)
pytest.importorskip("triton")

from autodeploy.custom_ops.fused_kernels import rms_norm_triton, silu_mul_triton  # noqa: E402
from autodeploy.custom_ops.rms_norm import rms_norm_reference  # noqa: E402


@pytest.mark.parametrize("n", [64, 100])  # a power of two and a masked row
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_kernel(n, with_residual):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(2, 3, n, generator=gen) * 3
    residual = torch.randn(2, 3, n, generator=gen) if with_residual else None
    weight = torch.randn(n, generator=gen)
    out, total = rms_norm_triton(x, weight, 1e-5, residual=residual)
    expected_in = x + residual if with_residual else x
    torch.testing.assert_close(out, rms_norm_reference(expected_in, weight, 1e-5), rtol=1e-5, atol=1e-5)
    if with_residual:
        torch.testing.assert_close(total, expected_in, rtol=0, atol=0)
    else:
        assert total is None


def test_rms_norm_kernel_strided_rows():
    x = torch.randn(5, 96)[:, :64]  # rows 96 apart
    weight = torch.randn(64)
    out, _ = rms_norm_triton(x, weight, 1e-6)
    torch.testing.assert_close(out, rms_norm_reference(x, weight, 1e-6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cols", [16, 40])
def test_silu_mul_kernel(cols):
    x = torch.randn(3, 4, 2 * cols) * 2
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(silu_mul_triton(x), F.silu(gate) * up, rtol=1e-5, atol=1e-5)
    wide = torch.randn(6, 3 * cols)[:, cols:]  # a slice of a wider GEMM output
    gate, up = wide.chunk(2, dim=-1)
    torch.testing.assert_close(silu_mul_triton(wide), F.silu(gate) * up, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [(8, 512, 4), (16, 256, 4), (4, 1024, 4)])
@pytest.mark.parametrize("n,k,bias", [(40, 1024, False), (33, 100, True), (8, 2048, True)])
def test_one_token_gemv_kernel(config, n, k, bias):
    """Every tile config on shapes that fill whole tiles or leave ragged rows/columns."""
    from autodeploy.custom_ops.gemv import gemv

    gen = torch.Generator().manual_seed(n * k)
    x, w = torch.randn(1, 1, k, generator=gen), torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    out = gemv(x, w, b, config)
    assert out.shape == (1, 1, n)
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_one_token_gemv_refuses_what_it_cannot_take():
    from autodeploy.custom_ops.gemv import gemv

    with pytest.raises(ValueError, match="one row"):
        gemv(torch.randn(2, 16), torch.randn(8, 16))
    with pytest.raises(ValueError, match="contiguous"):
        gemv(torch.randn(1, 16), torch.randn(16, 8).t())
