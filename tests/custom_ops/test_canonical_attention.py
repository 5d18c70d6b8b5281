"""``autodeploy::attention`` against HF's eager attention (repeat_kv + additive mask + fp32 softmax)."""

from __future__ import annotations

import types

import pytest
import torch

import autodeploy.custom_ops.attention  # noqa: F401

attention = torch.ops.autodeploy.attention.default


def hf_mask(seq: int, window=None) -> torch.Tensor:
    """HF-style additive mask [1, 1, S, S]: 0 where allowed, dtype-min elsewhere."""
    i = torch.arange(seq).unsqueeze(1)
    j = torch.arange(seq).unsqueeze(0)
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]


def hf_eager(q, k, v, scale, window=None, softcap=None):
    """HF eager attention on bsnd inputs (Llama's for no soft-cap, Gemma-2's with it)."""
    if softcap is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward
    else:
        from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward
    module = types.SimpleNamespace(num_key_value_groups=q.shape[2] // k.shape[2], training=False, head_dim=q.shape[-1])
    kwargs = {"softcap": softcap} if softcap is not None else {}
    out, _ = eager_attention_forward(
        module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), hf_mask(q.shape[1], window), scaling=scale, **kwargs
    )
    return out  # HF returns [B, S, H, D]


def qkv(batch, seq, heads, kv_heads, head_dim, v_dim=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, heads, head_dim, generator=gen)
    k = torch.randn(batch, seq, kv_heads, head_dim, generator=gen)
    v = torch.randn(batch, seq, kv_heads, v_dim or head_dim, generator=gen)
    return q, k, v


@pytest.mark.parametrize("batch,seq", [(1, 1), (2, 9), (3, 33)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_causal_gqa_matches_hf(batch, seq, heads, kv_heads):
    q, k, v = qkv(batch, seq, heads, kv_heads, 16)
    torch.testing.assert_close(attention(q, k, v, 0.25), hf_eager(q, k, v, 0.25), rtol=0, atol=1e-5)


@pytest.mark.parametrize("window", [1, 3, 8])
def test_sliding_window_matches_hf(window):
    q, k, v = qkv(2, 20, 4, 2, 8)
    torch.testing.assert_close(attention(q, k, v, 0.3, window), hf_eager(q, k, v, 0.3, window), rtol=0, atol=1e-5)


@pytest.mark.parametrize("window", [None, 5])
def test_soft_capping_matches_gemma2(window):
    # float64: logits near the cap magnify the matmul's summation order (which differs between CPUs)
    # into ~1e-4 in fp32; both sides still take their softmax in fp32, so a wrong order of scale/cap/mask shows
    q, k, v = (t.double() for t in qkv(2, 17, 4, 2, 16))
    q = q * 4  # large logits, so the cap matters
    got = attention(q, k, v, 0.25, window, 20.0)
    torch.testing.assert_close(got, hf_eager(q, k, v, 0.25, window, softcap=20.0), rtol=0, atol=1e-5)
    assert not torch.allclose(got, attention(q, k, v, 0.25, window))


def test_value_head_dim_may_differ():
    q, k, v = qkv(2, 6, 4, 2, 16, v_dim=8)
    out = attention(q, k, v, 0.25)
    assert out.shape == (2, 6, 4, 8)
    torch.testing.assert_close(out, hf_eager(q, k, v, 0.25), rtol=0, atol=1e-5)


def test_shorter_query_attends_bottom_right():
    """The last s_q queries of a longer sequence see the same keys as in the full computation."""
    q, k, v = qkv(1, 10, 2, 2, 8)
    full = attention(q, k, v, 0.5, 4)
    tail = attention(q[:, -3:], k, v, 0.5, 4)
    torch.testing.assert_close(tail, full[:, -3:], rtol=0, atol=1e-6)


def test_fake_kernel_and_registration():
    q, k, v = qkv(2, 5, 4, 2, 16, v_dim=8)
    torch.library.opcheck(attention, (q, k, v, 0.25, 3, None))
    torch.library.opcheck(attention, (q, k, v, 0.25, None, 10.0))
    with torch.device("meta"):
        out = attention(torch.empty(3, 7, 8, 64), torch.empty(3, 7, 2, 64), torch.empty(3, 7, 2, 32), 0.1)
    assert out.shape == (3, 7, 8, 32) and out.device.type == "meta"


def test_heads_that_do_not_divide_fail_clearly():
    q, k, v = qkv(1, 3, 6, 4, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        attention(q, k, v, 0.1)


def additive_attention(q, k, v, scale, bias, sinks=None):
    """Plain math on bsnd inputs with an additive bias [.., S_q, S_k] (-inf where blocked)."""
    rep = q.shape[2] // k.shape[2]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(rep, 1), v.transpose(1, 2).repeat_interleave(rep, 1)
    scores = (qh @ kh.transpose(-1, -2)).double() * scale + bias
    if sinks is not None:
        scores = torch.cat([scores, sinks.double().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)], -1)
    probs = scores.softmax(-1)[..., : kh.shape[2]]
    return (probs @ vh.double()).transpose(1, 2).float()


@pytest.mark.parametrize("window", [None, 4])
def test_sinks_match_gpt_oss_eager(window):
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    q, k, v = qkv(2, 13, 4, 2, 16)
    sinks = torch.randn(4) * 3
    module = types.SimpleNamespace(num_key_value_groups=2, training=False, sinks=sinks)
    ref, _ = eager_attention_forward(module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                     hf_mask(13, window), scaling=0.25)
    got = attention(q, k, v, 0.25, window, None, sinks)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert not torch.allclose(got, attention(q, k, v, 0.25, window), atol=1e-3)


def test_alibi_matches_bloom_bias():
    """BLOOM adds slope * key_position (softmax is shift-invariant per query, so that is slope * (j - i))."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    q, k, v = qkv(2, 11, 6, 6, 8)
    alibi = build_alibi_tensor(torch.ones(2, 11), 6, torch.float32).view(2, 6, 1, 11)
    slopes = alibi[0, :, 0, 1]  # slope * position 1
    ref = additive_attention(q, k, v, 0.3, alibi.double() + hf_mask(11).double())
    torch.testing.assert_close(attention(q, k, v, 0.3, None, None, None, slopes), ref, rtol=0, atol=1e-5)
    # a shorter query lines up with the end of the keys, as without ALiBi
    tail = attention(q[:, -4:], k, v, 0.3, None, None, None, slopes)
    torch.testing.assert_close(tail, ref[:, -4:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_chunked_attention_is_chunk_local_causal(chunk):
    q, k, v = qkv(2, 20, 4, 2, 8)
    i, j = torch.arange(20)[:, None], torch.arange(20)[None, :]
    allowed = (j <= i) & (i // chunk == j // chunk)
    ref = additive_attention(q, k, v, 0.3, torch.where(allowed, 0.0, float("-inf")).double())
    torch.testing.assert_close(attention(q, k, v, 0.3, None, None, None, None, chunk), ref, rtol=0, atol=1e-5)
    tail = attention(q[:, -5:], k, v, 0.3, None, None, None, None, chunk)
    torch.testing.assert_close(tail, ref[:, -5:], rtol=0, atol=1e-5)


def test_variants_combine():
    q, k, v = qkv(1, 17, 4, 2, 16)
    sinks, slopes = torch.randn(4), torch.rand(4)
    i, j = torch.arange(17)[:, None], torch.arange(17)[None, :]
    allowed = (j <= i) & (j > i - 6) & (i // 5 == j // 5)
    capped = lambda s: 7.0 * torch.tanh(s / 7.0)  # noqa: E731
    rep = 2
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(rep, 1), v.transpose(1, 2).repeat_interleave(rep, 1)
    scores = capped((qh @ kh.transpose(-1, -2)).double() * 0.4) + slopes.double().view(-1, 1, 1) * (j - i)
    scores = torch.cat([scores.masked_fill(~allowed, float("-inf")), sinks.double().view(1, -1, 1, 1).expand(1, 4, 17, 1)], -1)
    ref = (scores.softmax(-1)[..., :17] @ vh.double()).transpose(1, 2).float()
    torch.testing.assert_close(attention(q, k, v, 0.4, 6, 7.0, sinks, slopes, 5), ref, rtol=0, atol=1e-5)


def test_fake_kernel_and_registration_with_variants():
    q, k, v = qkv(2, 5, 4, 2, 16, v_dim=8)
    torch.library.opcheck(attention, (q, k, v, 0.25, 3, 5.0, torch.randn(4), torch.rand(4), 2))
    with pytest.raises(ValueError, match="sinks must be \\[4\\]"):
        attention(q, k, v, 0.25, None, None, torch.randn(2))
