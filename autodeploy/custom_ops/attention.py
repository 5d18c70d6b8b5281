"""``autodeploy::attention``: causal self-attention over bsnd tensors, GQA inside.

The canonical, uncached attention op that the pattern matcher rewrites HF's SDPA and eager
attention into. There is no mask input: attention is causal (bottom-right aligned when the query
is shorter than the keys), optionally restricted to a sliding window, optionally with tanh logit
soft-capping (Gemma-2 style). Cached backends implement the same semantics over a paged cache.

``sliding_window=W`` follows HF: query position i sees key positions j with ``i - W < j <= i``
(W tokens including itself).
"""

from typing import Optional

import torch
import torch.nn.functional as F


def causal_allowed_mask(
    s_q: int, s_k: int, sliding_window: Optional[int], device: torch.device
) -> torch.Tensor:
    """Bool ``[s_q, s_k]``: True where a query may attend a key (queries are the last s_q positions)."""
    q_pos = torch.arange(s_k - s_q, s_k, device=device).unsqueeze(-1)
    k_pos = torch.arange(s_k, device=device).unsqueeze(0)
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    return allowed


def _check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"autodeploy::attention expects 4-D bsnd tensors, got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    n_heads, n_kv = q.shape[2], k.shape[2]
    if v.shape[2] != n_kv:
        raise ValueError(f"autodeploy::attention: k has {n_kv} heads but v has {v.shape[2]}")
    if n_heads % n_kv != 0:
        raise ValueError(f"autodeploy::attention: {n_heads} query heads are not a multiple of {n_kv} kv heads")


@torch.library.custom_op("autodeploy::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    sliding_window: Optional[int] = None,
    logit_cap: Optional[float] = None,
) -> torch.Tensor:
    """q ``[B,S,H,D]``, k ``[B,S,KV,D]``, v ``[B,S,KV,Dv]`` -> ``[B,S,H,Dv]``."""
    _check_heads(q, k, v)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    s_q, s_k = q.shape[1], k.shape[1]
    n_rep = q.shape[2] // k.shape[2]
    if logit_cap is None:
        if sliding_window is None and s_q == s_k:
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=n_rep > 1)
        else:
            mask = causal_allowed_mask(s_q, s_k, sliding_window, q.device)
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=n_rep > 1)
    else:
        # SDPA cannot soft-cap: plain math in HF's order (scale, cap, mask, fp32 softmax)
        if n_rep > 1:
            kh, vh = kh.repeat_interleave(n_rep, dim=1), vh.repeat_interleave(n_rep, dim=1)
        scores = torch.matmul(qh, kh.transpose(-2, -1)) * scale
        scores = torch.tanh(scores / logit_cap) * logit_cap
        mask = causal_allowed_mask(s_q, s_k, sliding_window, q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, vh)
    return out.transpose(1, 2).contiguous()


@attention.register_fake
def _attention_fake(q, k, v, scale, sliding_window=None, logit_cap=None):
    _check_heads(q, k, v)
    return q.new_empty((*q.shape[:3], v.shape[-1]))
