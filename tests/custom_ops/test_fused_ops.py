"""The fusion ops on the CPU: exactly the eager ops they replace (HF's rounding), fake kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import autodeploy.custom_ops.add_rms_norm  # noqa: F401
import autodeploy.custom_ops.last_tokens  # noqa: F401
import autodeploy.custom_ops.rms_norm  # noqa: F401
import autodeploy.custom_ops.silu_mul  # noqa: F401

ops = torch.ops.autodeploy
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_is_add_then_norm(dtype):
    gen = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(3, 5, 64, generator=gen) * 4).to(dtype), torch.randn(3, 5, 64, generator=gen).to(dtype)
    weight = torch.randn(64, generator=gen).to(dtype)
    normed, total = ops.fused_add_rms_norm(x, residual, weight, 1e-5)
    expected_total = residual + x
    torch.testing.assert_close(total, expected_total, rtol=0, atol=0)
    torch.testing.assert_close(normed, ops.rms_norm(expected_total, weight, 1e-5), rtol=0, atol=0)


def test_fused_add_rms_norm_keeps_the_weight_promotion():
    # HF multiplies an fp32 weight with the bf16 normalized value: an fp32 result
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    normed, total = ops.fused_add_rms_norm(x, x, torch.randn(32), 1e-6)
    assert normed.dtype == torch.float32 and total.dtype == torch.bfloat16


def test_fused_add_rms_norm_rejects_broadcasting():
    with pytest.raises(ValueError, match="one shape and dtype"):
        ops.fused_add_rms_norm(torch.randn(2, 8), torch.randn(8), torch.randn(8), 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_is_swiglu(dtype):
    gen = torch.Generator().manual_seed(1)
    gate, up = (torch.randn(2, 7, 48, generator=gen) * 3).to(dtype), torch.randn(2, 7, 48, generator=gen).to(dtype)
    out = ops.silu_mul(torch.cat([gate, up], dim=-1))
    # the dtype's default tolerance: CPU silu on a strided half may round the last bit differently
    torch.testing.assert_close(out, F.silu(gate) * up)


def test_silu_mul_needs_two_halves():
    with pytest.raises(ValueError, match="even last dim"):
        ops.silu_mul(torch.randn(3, 5))


def test_last_tokens_and_the_flattened_batch_rows():
    from autodeploy.runtime.sequence_info import SequenceInfo

    x = torch.randn(3, 6, 8)
    torch.testing.assert_close(ops.last_tokens(x), x[:, -1:])
    # in the flattened batch the cached graph keeps the rows of logits_idx: sequences of 4, 1 and 5
    # tokens back to back -> their last tokens, or every token of the ones that ask (prompt logprobs)
    info = SequenceInfo(4, 16, 2)
    args = ([[1] * 4, [2], [3] * 5], [0, 0, 0], [[1], [2], [3]], [1, 2, 3])
    assert info.build(*args).logits_idx.tolist() == [3, 4, 9]
    full = info.build(*args, full_logits=[True, False, True])
    assert full.logits_idx.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] and full.num_logits == 10
    assert info.build(*args, full_logits=[False, True, False]).logits_idx.tolist() == [3, 4, 9]
    # the metadata after the longer logits_idx is laid out right
    assert full.named_args["input_ids"].tolist() == [[1, 1, 1, 1, 2, 3, 3, 3, 3, 3]]
    assert full.named_args["cu_seqlen"].tolist() == [0, 4, 5, 10] and full.named_args["slot_idx"].tolist() == [1, 2, 3]


def test_opcheck_and_meta():
    bf = torch.bfloat16
    torch.library.opcheck(ops.fused_add_rms_norm.default,
                          (torch.randn(2, 3, 16, dtype=bf), torch.randn(2, 3, 16, dtype=bf), torch.randn(16, dtype=bf), 1e-6))
    torch.library.opcheck(ops.silu_mul.default, (torch.randn(4, 32, dtype=bf),))
    torch.library.opcheck(ops.last_tokens.default, (torch.randn(2, 5, 8),))
    with torch.device("meta"):
        normed, total = ops.fused_add_rms_norm(torch.empty(7, 4096, dtype=bf), torch.empty(7, 4096, dtype=bf),
                                               torch.empty(4096, dtype=bf), 1e-5)
        assert normed.shape == total.shape == (7, 4096)
        assert ops.silu_mul(torch.empty(7, 2 * 14336, dtype=bf)).shape == (7, 14336)
        assert ops.last_tokens(torch.empty(2, 9, 4096)).shape == (2, 1, 4096)
