"""``torch`` backend: reference paged attention in plain PyTorch (CPU and GPU; what CI runs).

The op first writes the new tokens' K/V into their pages, then each query attends to the first
``input_pos + i + 1`` tokens of its sequence (causal), with the variants of the canonical op
(``custom_ops/attention.py``): sliding window, tanh soft-capping, sinks, ALiBi, chunk-local
attention. Math runs in float32.

A decode-only batch (T == B: every sequence has exactly one new token) is one batched computation
without host syncs, so it can be captured in a CUDA graph. A batch with prefills reads the
sequence lengths on the host once and handles each prefill on its own.

On the CPU, plain causal attention (none of the variants) takes a shorter path: host syncs cost
nothing there, so each sequence attends to exactly its cached prefix (a view of the cache when its
pages are consecutive, as they mostly are) through ``F.scaled_dot_product_attention``, the kernel
HF's SDPA attention runs; gathering every page of the page table and masking costs a decode step
of SmolLM2-135M more than its matmuls (0.8 ms per layer with 4 pages, 2-3 ms with 32, against
0.15 ms).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..attention import allowed_mask, causal_allowed_mask
from . import AttentionBackend, register_backend


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_len: torch.Tensor,
    input_pos: torch.Tensor,
    cu_seqlen: torch.Tensor,
    page_table: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
    sliding_window: Optional[int] = None,
    logit_cap: Optional[float] = None,
    sinks: Optional[torch.Tensor] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    attention_chunk_size: Optional[int] = None,
) -> torch.Tensor:
    q, k, v = q[0], k[0], v[0]  # [T, heads, dim]
    num_tokens, num_seqs = q.shape[0], seq_len.shape[0]
    attend = dict(scale=scale, sliding_window=sliding_window, logit_cap=logit_cap, sinks=sinks,
                  alibi_slopes=alibi_slopes, attention_chunk_size=attention_chunk_size)
    if not q.is_cuda and all(a is None for a in (sliding_window, logit_cap, sinks, alibi_slopes, attention_chunk_size)):
        return _host_causal(q, k, v, seq_len, input_pos, cu_seqlen, page_table, k_cache, v_cache, scale).unsqueeze(0)
    write_kv_to_pages(k, v, seq_len, input_pos, cu_seqlen, page_table, k_cache, v_cache)

    if num_tokens == num_seqs:  # decode only
        out = _decode(q, input_pos, page_table, k_cache, v_cache, **attend)
        return out.unsqueeze(0)

    out = q.new_empty(num_tokens, q.shape[1], v.shape[-1])
    lens, starts, cached = torch.stack([seq_len, cu_seqlen[:-1], input_pos]).tolist()
    decodes = [i for i, n in enumerate(lens) if n == 1]
    if decodes:
        seqs = torch.tensor(decodes, device=q.device)
        tokens = cu_seqlen[seqs]
        out[tokens] = _decode(q[tokens], input_pos[seqs], page_table[seqs], k_cache, v_cache, **attend)
    page_size = k_cache.shape[1]
    for i, (n, start, pos) in enumerate(zip(lens, starts, cached)):
        if n == 1:
            continue
        total = pos + n
        pages = page_table[i, : -(-total // page_size)]
        keys = k_cache[pages].flatten(0, 1)[:total]
        values = v_cache[pages].flatten(0, 1)[:total]
        q_pos = torch.arange(pos, total, device=q.device)
        out[start: start + n] = _attention(
            q[start: start + n].unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0), q_pos.unsqueeze(0), **attend
        )[0]
    return out.unsqueeze(0)


# the op; the host's torch-simple graphs call ``cached_attention`` itself (compile/inline.py)
torch_cached_attention = torch.library.custom_op(
    "autodeploy::torch_cached_attention", mutates_args=("k_cache", "v_cache"))(cached_attention)


@torch_cached_attention.register_fake
def _(q, k, v, seq_len, input_pos, cu_seqlen, page_table, k_cache, v_cache, scale, sliding_window=None,
      logit_cap=None, sinks=None, alibi_slopes=None, attention_chunk_size=None):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def write_kv_to_pages(k, v, seq_len, input_pos, cu_seqlen, page_table, k_cache, v_cache) -> None:
    """Scatter the new tokens' K/V ``[T, KV, D]`` into their pages (no host sync)."""
    num_tokens, num_seqs = k.shape[0], seq_len.shape[0]
    device = k.device
    seq_of_token = torch.repeat_interleave(
        torch.arange(num_seqs, device=device), seq_len.to(torch.int64), output_size=num_tokens
    )
    offset_in_seq = torch.arange(num_tokens, device=device) - cu_seqlen[:-1].to(torch.int64)[seq_of_token]
    position = input_pos.to(torch.int64)[seq_of_token] + offset_in_seq
    page_size = k_cache.shape[1]
    page = page_table.to(torch.int64)[seq_of_token, position // page_size]
    slot = position % page_size
    k_cache[page, slot] = k.to(k_cache.dtype)
    v_cache[page, slot] = v.to(v_cache.dtype)


def _host_causal(q, k, v, seq_len, input_pos, cu_seqlen, page_table, k_cache, v_cache, scale) -> torch.Tensor:
    """Plain causal attention, sequence by sequence, with host-side lengths (CPU): ``[T, H, Dv]``."""
    page_size = k_cache.shape[1]
    lens, starts, cached = torch.stack([seq_len, cu_seqlen[:-1], input_pos]).tolist()
    f32 = (lambda t: t) if q.dtype == k_cache.dtype == torch.float32 else (lambda t: t.float())  # math in float32
    flat_k, flat_v = (c.view(-1, *c.shape[2:]) for c in (k_cache, v_cache))  # [pages * page_size, KV, D]
    outs = []
    for n, start, pos, table in zip(lens, starts, cached, page_table.tolist()):
        if n == 0:  # a padding sequence
            continue
        total = pos + n
        pages = table[: -(-total // page_size)]
        _write_pages(k[start: start + n], v[start: start + n], pages, pos, k_cache, v_cache)
        runs = [(flat_k[a: a + length], flat_v[a: a + length]) for a, length in _runs(pages, total, page_size)]
        if n == 1:  # decode: the runs' scores side by side, no copy of the cache
            outs.append(_attend_one(f32(q[start]), [(f32(a), f32(b)) for a, b in runs], scale))
            continue
        keys, values = runs[0] if len(runs) == 1 else (torch.cat([r[i] for r in runs]) for i in (0, 1))
        # 4-D [1, heads, tokens, dim]: with three dims SDPA leaves its CPU flash kernel for the math one
        q_i, keys, values = (f32(t.transpose(0, 1)[None]) for t in (q[start: start + n], keys, values))
        # a whole prompt is square causal attention (the flash kernel skips the masked blocks), a chunk
        # after cached tokens needs the offset mask
        mask = None if pos == 0 else causal_allowed_mask(n, total, None, q.device)
        attended = F.scaled_dot_product_attention(q_i, keys, values, attn_mask=mask, is_causal=pos == 0, scale=scale,
                                                  enable_gqa=True)
        outs.append(attended[0].transpose(0, 1))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)  # the sequences' tokens are back to back
    return out if out.dtype == q.dtype else out.to(q.dtype)


def _runs(pages: list[int], total: int, page_size: int) -> list[tuple[int, int]]:
    """A sequence's first ``total`` cache rows as (flat start, length) runs of consecutive pages."""
    runs, first, count = [], pages[0], 1
    for page in pages[1:] + [None]:
        if page is not None and page == first + count:
            count += 1
            continue
        runs.append((first * page_size, count * page_size))
        if page is not None:
            first, count = page, 1
    start, length = runs[-1]
    runs[-1] = (start, length - (len(pages) * page_size - total))  # the last page is partly filled
    return runs


def _attend_one(q: torch.Tensor, runs: list[tuple[torch.Tensor, torch.Tensor]], scale: float) -> torch.Tensor:
    """One query ``[H, D]`` against keys/values in runs of ``[L_i, KV, D]`` views: ``[1, H, Dv]``. Two
    small batched matmuls per run read the cache where it lies (SDPA wants one tensor, a gather)."""
    heads, kv = q.shape[0], runs[0][0].shape[1]
    qg = q.view(kv, heads // kv, q.shape[-1])  # query head h uses kv head h // group
    scores = [torch.bmm(qg, keys.permute(1, 2, 0)) for keys, _ in runs]  # [KV, G, L_i]
    probs = (scores[0] if len(scores) == 1 else torch.cat(scores, -1)).mul_(scale).softmax(-1)
    parts = probs.split([keys.shape[0] for keys, _ in runs], -1) if len(runs) > 1 else [probs]
    out = torch.bmm(parts[0], runs[0][1].transpose(0, 1))  # [KV, G, Dv]
    for p, (_, values) in zip(parts[1:], runs[1:]):
        out += torch.bmm(p, values.transpose(0, 1))
    return out.view(1, heads, -1)


def _write_pages(k, v, pages: list[int], pos: int, k_cache, v_cache) -> None:
    """One sequence's new K/V (positions ``pos``...) into its pages, one slice per page touched."""
    page_size, t, end = k_cache.shape[1], pos, pos + k.shape[0]
    while t < end:
        page, slot = pages[t // page_size], t % page_size
        count = min(page_size - slot, end - t)
        k_cache[page, slot: slot + count] = k[t - pos: t - pos + count]
        v_cache[page, slot: slot + count] = v[t - pos: t - pos + count]
        t += count


def _decode(q, input_pos, page_table, k_cache, v_cache, **attend) -> torch.Tensor:
    """One query per sequence: q ``[N, H, D]`` against each sequence's pages -> ``[N, H, Dv]``."""
    keys = k_cache[page_table.to(torch.int64)].flatten(1, 2)  # [N, pages * page_size, KV, D]
    values = v_cache[page_table.to(torch.int64)].flatten(1, 2)
    q_pos = input_pos.to(torch.int64).unsqueeze(1)  # the new token's position
    return _attention(q.unsqueeze(1), keys, values, q_pos, **attend)[:, 0]


def _attention(q, keys, values, q_pos, scale, sliding_window, logit_cap, sinks, alibi_slopes,
               attention_chunk_size) -> torch.Tensor:
    """q ``[N, S, H, D]`` at positions ``q_pos [N, S]``; keys/values ``[N, L, KV, D]`` at 0..L-1.

    Keys past a query's position (including padding past the sequence's length) are masked.
    """
    n, s, heads, dim = q.shape
    kv_heads = keys.shape[2]
    group = heads // kv_heads
    qg = q.float().view(n, s, kv_heads, group, dim)  # query head h uses kv head h // group
    scores = torch.einsum("nskgd,nlkd->nkgsl", qg, keys.float()) * scale
    if logit_cap is not None:
        scores = logit_cap * torch.tanh(scores / logit_cap)
    key_pos = torch.arange(keys.shape[1], device=q.device)
    if alibi_slopes is not None:
        distance = key_pos.view(1, 1, -1) - q_pos.unsqueeze(-1)  # j - i, [N, S, L]
        scores = scores + alibi_slopes.float().view(1, kv_heads, group, 1, 1) * distance[:, None, None]
    visible = allowed_mask(q_pos, key_pos, sliding_window, attention_chunk_size)  # [N, S, L]
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    if sinks is not None:  # one more logit per head in the denominator, without a value
        sink_col = sinks.float().view(1, kv_heads, group, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.cat([scores, sink_col], dim=-1).softmax(dim=-1)[..., :-1]
    else:
        probs = scores.softmax(dim=-1)
    out = torch.einsum("nkgsl,nlkd->nskgd", probs, values.float())
    return out.reshape(n, s, heads, values.shape[-1]).to(q.dtype)


def _always_available() -> None:
    return None


register_backend(
    AttentionBackend(
        name="torch",
        module=__name__,
        op_name="torch_cached_attention",
        check_available=_always_available,
    )
)
