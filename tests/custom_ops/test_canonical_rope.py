"""``autodeploy::rope`` against HF's apply_rotary_pos_emb (Llama rotate-half, GLM interleaved + partial)."""

from __future__ import annotations

import pytest
import torch

import autodeploy.custom_ops.rope  # noqa: F401

rope = torch.ops.autodeploy.rope.default


def tables(batch, seq, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    freqs = torch.rand(batch, seq, dim // 2, generator=gen) * 6
    emb = torch.cat((freqs, freqs), dim=-1)  # HF's duplicated-halves layout
    return emb.cos(), emb.sin()


def qk(batch, seq, heads, kv_heads, head_dim, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, seq, head_dim, generator=gen), torch.randn(batch, kv_heads, seq, head_dim, generator=gen)


@pytest.mark.parametrize("batch,seq", [(1, 1), (2, 7)])
def test_rotate_half_matches_llama(batch, seq):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = qk(batch, seq, 4, 2, 16)
    cos, sin = tables(batch, seq, 16)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    q_ad, k_ad = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin, False)
    torch.testing.assert_close(q_ad, q_hf.transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(k_ad, k_hf.transpose(1, 2), rtol=0, atol=0)


def test_interleaved_partial_matches_glm():
    from transformers.models.glm.modeling_glm import apply_rotary_pos_emb

    q, k = qk(2, 5, 4, 2, 16)
    cos, sin = tables(2, 5, 8)  # rotary dim 8 of head dim 16
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    # GLM feeds the interleaved layout: the first half of the table, each entry repeated twice
    cos_i, sin_i = (t[..., :4].repeat_interleave(2, dim=-1) for t in (cos, sin))
    q_ad, k_ad = rope(q.transpose(1, 2), k.transpose(1, 2), cos_i, sin_i, True)
    torch.testing.assert_close(q_ad, q_hf.transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(k_ad, k_hf.transpose(1, 2), rtol=0, atol=0)


def test_partial_rotate_half_leaves_the_rest():
    q, k = (t.transpose(1, 2) for t in qk(1, 4, 2, 2, 16))
    cos, sin = tables(1, 4, 4)
    q_ad, k_ad = rope(q, k, cos, sin, False)
    torch.testing.assert_close(q_ad[..., 4:], q[..., 4:], rtol=0, atol=0)
    assert not torch.allclose(q_ad[..., :4], q[..., :4])


def test_bf16_keeps_hf_rounding():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = (t.bfloat16() for t in qk(2, 6, 4, 2, 32))
    cos, sin = (t.bfloat16() for t in tables(2, 6, 32))
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    q_ad, k_ad = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin, False)
    assert q_ad.dtype == torch.bfloat16
    torch.testing.assert_close(q_ad, q_hf.transpose(1, 2), rtol=0, atol=0)


def test_fake_kernel_and_registration():
    q, k = (t.transpose(1, 2) for t in qk(2, 3, 4, 2, 16))
    cos, sin = tables(2, 3, 8)
    torch.library.opcheck(rope, (q, k, cos, sin, True))
    with torch.device("meta"):
        qo, ko = rope(torch.empty(2, 9, 8, 128), torch.empty(2, 9, 2, 128), torch.empty(2, 9, 64), torch.empty(2, 9, 64), False)
    assert qo.shape == (2, 9, 8, 128) and ko.shape == (2, 9, 2, 128)
