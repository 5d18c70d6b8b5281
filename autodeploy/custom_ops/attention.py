"""``autodeploy::attention``: causal self-attention over bsnd tensors, GQA inside.

The canonical, uncached attention op that the pattern matcher rewrites HF's SDPA and eager
attention into. There is no mask input: attention is causal (bottom-right aligned when the query
is shorter than the keys) and every variant is an argument, so cached backends can implement the
same semantics over a paged cache. Positions count from 0 at the first key.

- ``sliding_window=W`` follows HF: query position i sees key positions j with ``i - W < j <= i``
  (W tokens including itself).
- ``logit_cap=c``: tanh soft-capping ``c * tanh(s / c)`` of the scaled scores (Gemma-2).
- ``sinks [H]``: one learned logit per query head that joins the softmax's denominator and has
  no value (gpt-oss): ``p_j = exp(s_j) / (sum_j exp(s_j) + exp(sink_h))``.
- ``alibi_slopes [H]``: ALiBi, ``slope_h * (j - i)`` added to the (capped) scores (BLOOM).
- ``attention_chunk_size=C``: chunk-local causal attention, query i sees keys j <= i with
  ``i // C == j // C`` (Llama-4).
The per-head tensors are arguments with the head dimension first, so tensor parallelism slices
them with the heads.
"""

from typing import Optional

import torch
import torch.nn.functional as F


def allowed_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: Optional[int] = None,
    attention_chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Bool ``[..., S_q, S_k]``: True where a query at ``q_pos [..., S_q]`` may attend a key at ``k_pos [S_k]``."""
    q, k = q_pos.unsqueeze(-1), k_pos
    allowed = k <= q
    if sliding_window is not None:
        allowed &= k > q - sliding_window
    if attention_chunk_size is not None:
        allowed &= torch.div(k, attention_chunk_size, rounding_mode="floor") == torch.div(
            q, attention_chunk_size, rounding_mode="floor")
    return allowed


def causal_allowed_mask(
    s_q: int, s_k: int, sliding_window: Optional[int], device: torch.device,
    attention_chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Bool ``[s_q, s_k]``: True where a query may attend a key (queries are the last s_q positions)."""
    q_pos = torch.arange(s_k - s_q, s_k, device=device)
    return allowed_mask(q_pos, torch.arange(s_k, device=device), sliding_window, attention_chunk_size)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks=None, alibi_slopes=None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"autodeploy::attention expects 4-D bsnd tensors, got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    n_heads, n_kv = q.shape[2], k.shape[2]
    if v.shape[2] != n_kv:
        raise ValueError(f"autodeploy::attention: k has {n_kv} heads but v has {v.shape[2]}")
    if n_heads % n_kv != 0:
        raise ValueError(f"autodeploy::attention: {n_heads} query heads are not a multiple of {n_kv} kv heads")
    for name, t in (("sinks", sinks), ("alibi_slopes", alibi_slopes)):
        if t is not None and tuple(t.shape) != (n_heads,):
            raise ValueError(f"autodeploy::attention: {name} must be [{n_heads}] (one per query head), got {tuple(t.shape)}")


@torch.library.custom_op("autodeploy::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    sliding_window: Optional[int] = None,
    logit_cap: Optional[float] = None,
    sinks: Optional[torch.Tensor] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    attention_chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """q ``[B,S,H,D]``, k ``[B,S,KV,D]``, v ``[B,S,KV,Dv]`` -> ``[B,S,H,Dv]``."""
    _check(q, k, v, sinks, alibi_slopes)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    s_q, s_k = q.shape[1], k.shape[1]
    n_rep = q.shape[2] // k.shape[2]
    plain = sliding_window is None and attention_chunk_size is None and s_q == s_k
    if logit_cap is None and sinks is None and alibi_slopes is None:
        if plain:
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=n_rep > 1)
        else:
            mask = causal_allowed_mask(s_q, s_k, sliding_window, q.device, attention_chunk_size)
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=n_rep > 1)
        return out.transpose(1, 2).contiguous()
    # SDPA cannot soft-cap or take sinks: plain math in HF's order (scale, cap, bias, mask, fp32 softmax)
    if n_rep > 1:
        kh, vh = kh.repeat_interleave(n_rep, dim=1), vh.repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(qh, kh.transpose(-2, -1)) * scale
    if logit_cap is not None:
        scores = torch.tanh(scores / logit_cap) * logit_cap
    if alibi_slopes is not None:
        q_pos = torch.arange(s_k - s_q, s_k, device=q.device)
        distance = torch.arange(s_k, device=q.device) - q_pos.unsqueeze(-1)  # j - i, [S_q, S_k]
        scores = scores + alibi_slopes.to(scores.dtype).view(-1, 1, 1) * distance
    mask = causal_allowed_mask(s_q, s_k, sliding_window, q.device, attention_chunk_size)
    scores = scores.masked_fill(~mask, float("-inf")).float()
    if sinks is not None:  # an extra logit per head in the denominator, dropped after the softmax
        sink_col = sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink_col], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs.to(q.dtype), vh)
    return out.transpose(1, 2).contiguous()


@attention.register_fake
def _attention_fake(q, k, v, scale, sliding_window=None, logit_cap=None, sinks=None, alibi_slopes=None,
                    attention_chunk_size=None):
    _check(q, k, v, sinks, alibi_slopes)
    return q.new_empty((*q.shape[:3], v.shape[-1]))
