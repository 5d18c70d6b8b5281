"""``autodeploy::rms_norm`` against HF's LlamaRMSNorm, bit for bit in fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

import autodeploy.custom_ops.rms_norm  # noqa: F401

rms_norm = torch.ops.autodeploy.rms_norm.default


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_matches_llama_rmsnorm(dtype, eps):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(48, eps=eps).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x = (torch.randn(3, 5, 48) * 3).to(dtype)
    with torch.no_grad():
        expected = norm(x)
    got = rms_norm(x, norm.weight.detach(), eps)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_fake_kernel_and_registration():
    torch.library.opcheck(rms_norm, (torch.randn(2, 3, 8, dtype=torch.bfloat16), torch.randn(8, dtype=torch.bfloat16), 1e-6))
    with torch.device("meta"):
        out = rms_norm(torch.empty(4, 7, 4096, dtype=torch.bfloat16), torch.empty(4096, dtype=torch.bfloat16), 1e-5)
    assert out.shape == (4, 7, 4096) and out.dtype == torch.bfloat16
