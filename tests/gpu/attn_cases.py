"""Paged-attention test batches and a float64 reference (shared by the GPU tests, the Triton
interpreter tests and scripts/gpu_check.py). Imports torch only."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    q: torch.Tensor  # [1, T, H, D]
    k: torch.Tensor  # [1, T, KV, D]
    v: torch.Tensor  # [1, T, KV, Dv]
    seq_len: torch.Tensor  # [B] int32
    input_pos: torch.Tensor
    cu_seqlen: torch.Tensor
    page_table: torch.Tensor  # [B, P] int32
    k_cache: torch.Tensor  # [num_pages, page_size, KV, D]
    v_cache: torch.Tensor

    def args(self):
        return (self.q, self.k, self.v, self.seq_len, self.input_pos, self.cu_seqlen, self.page_table,
                self.k_cache, self.v_cache)

    def clone(self) -> "Batch":
        return Batch(*(t.clone() for t in self.args()))


def make_batch(seqs, H, KV, D, page_size, dtype=torch.float32, device="cpu", Dv=None, extra_pages=3,
               generator=None) -> Batch:
    """``seqs``: list of (input_pos, seq_len), prefills first. Pages are handed out in a shuffled
    order (page 0 is scratch and never used) and the cache is filled with random values, so an
    unwritten slot or a wrong page lookup shows up as a mismatch."""
    Dv = Dv or D
    g = generator or torch.Generator().manual_seed(0)
    B = len(seqs)
    pages_per = [math.ceil((p + n) / page_size) for p, n in seqs]
    P = max(pages_per) + 1  # one spare column, left 0 like the runtime does
    num_pages = sum(pages_per) + 1 + extra_pages
    order = (torch.randperm(num_pages - 1, generator=g) + 1).tolist()
    table = torch.zeros(B, P, dtype=torch.int32)
    for b, n in enumerate(pages_per):
        table[b, :n] = torch.tensor([order.pop() for _ in range(n)], dtype=torch.int32)
    T = sum(n for _, n in seqs)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    seq_len = torch.tensor([n for _, n in seqs], dtype=torch.int32)
    return Batch(
        q=rnd(1, T, H, D).to(device), k=rnd(1, T, KV, D).to(device), v=rnd(1, T, KV, Dv).to(device),
        seq_len=seq_len.to(device),
        input_pos=torch.tensor([p for p, _ in seqs], dtype=torch.int32).to(device),
        cu_seqlen=torch.cat([torch.zeros(1, dtype=torch.int64), seq_len.cumsum(0)]).to(torch.int32).to(device),
        page_table=table.to(device),
        k_cache=rnd(num_pages, page_size, KV, D).to(device), v_cache=rnd(num_pages, page_size, KV, Dv).to(device),
    )


def reference(batch: Batch, scale: float, sliding_window=None, logit_cap=None, sinks=None, alibi_slopes=None,
              attention_chunk_size=None):
    """float64 attention on the CPU; returns (out [1, T, H, Dv], expected k_cache, expected v_cache)."""
    q, k, v = (t[0].double().cpu() for t in (batch.q, batch.k, batch.v))
    kc, vc = batch.k_cache.double().cpu().clone(), batch.v_cache.double().cpu().clone()
    table = batch.page_table.cpu().long()
    ps = kc.shape[1]
    H, KV = q.shape[1], k.shape[1]
    out = torch.zeros(q.shape[0], H, v.shape[-1], dtype=torch.float64)
    cu = batch.cu_seqlen.cpu().tolist()
    for b, pos0 in enumerate(batch.input_pos.cpu().tolist()):
        s, e = cu[b], cu[b + 1]
        for i in range(e - s):  # write the new tokens into their pages
            p = pos0 + i
            kc[table[b, p // ps], p % ps] = k[s + i]
            vc[table[b, p // ps], p % ps] = v[s + i]
        L = pos0 + e - s
        if L == 0:
            continue
        pos = torch.arange(L)
        K = kc[table[b, pos // ps], pos % ps].repeat_interleave(H // KV, dim=1)  # [L, H, D]
        V = vc[table[b, pos // ps], pos % ps].repeat_interleave(H // KV, dim=1)
        qpos = pos0 + torch.arange(e - s)
        scores = torch.einsum("thd,lhd->htl", q[s:e], K) * scale
        if logit_cap:
            scores = logit_cap * torch.tanh(scores / logit_cap)
        if alibi_slopes is not None:
            scores = scores + alibi_slopes.double().cpu()[:, None, None] * (pos[None, :] - qpos[:, None])
        mask = pos[None, :] <= qpos[:, None]
        if sliding_window:
            mask &= qpos[:, None] - pos[None, :] < sliding_window
        if attention_chunk_size:
            mask &= pos[None, :] // attention_chunk_size == qpos[:, None] // attention_chunk_size
        scores = scores.masked_fill(~mask, float("-inf"))
        if sinks is not None:  # the sink joins the denominator only
            sink_col = sinks.double().cpu()[:, None, None].expand(-1, scores.shape[1], 1)
            probs = torch.cat([scores, sink_col], -1).softmax(-1)[..., :-1]
        else:
            probs = scores.softmax(-1)
        out[s:e] = torch.einsum("htl,lhd->thd", probs, V)
    return out.unsqueeze(0), kc, vc


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# (name, seqs, H, KV, D, page_size, sliding_window, logit_cap): small shapes for the interpreter,
# covering prefill, chunked prefill, decode, mixed batches, page boundaries, odd lengths, GQA.
SMALL_CASES = [
    ("prefill", [(0, 13), (0, 1), (0, 32)], 4, 2, 16, 8, None, None),
    ("chunked_prefill", [(16, 9), (5, 11)], 4, 2, 16, 8, None, None),
    ("decode", [(0, 1), (7, 1), (8, 1), (63, 1), (64, 1)], 4, 2, 16, 8, None, None),
    ("decode_long", [(300, 1), (129, 1)], 8, 2, 32, 16, None, None),
    ("mixed", [(0, 21), (9, 4), (31, 1), (16, 1), (0, 1)], 4, 2, 16, 8, None, None),
    ("gqa3_odd_dim", [(3, 17), (40, 1)], 6, 2, 24, 4, None, None),
    ("mha", [(0, 19), (12, 1)], 3, 3, 16, 16, None, None),
    ("window_prefill", [(0, 37), (20, 15)], 4, 2, 16, 8, 7, None),
    ("window_decode", [(50, 1), (3, 1), (130, 1)], 4, 2, 16, 8, 16, None),
    ("softcap", [(5, 14), (29, 1)], 4, 1, 16, 8, None, 5.0),
    ("window_softcap_mixed", [(10, 30), (70, 1), (1, 1)], 8, 4, 16, 16, 24, 3.0),
]


# (name, seqs, H, KV, D, page_size, variants): the canonical op's per-head and chunk variants;
# "sinks" / "alibi" ask for random per-head tensors (variant_args builds them)
VARIANT_CASES = [
    ("sinks_prefill_decode", [(0, 21), (9, 4), (31, 1), (16, 1)], 4, 2, 16, 8, dict(sinks=True)),
    ("sinks_decode_long", [(300, 1), (129, 1), (0, 1)], 8, 2, 32, 16, dict(sinks=True)),
    ("sinks_window", [(0, 37), (20, 15), (50, 1)], 4, 2, 16, 8, dict(sinks=True, sliding_window=7)),
    ("alibi_prefill_decode", [(0, 21), (9, 4), (31, 1), (16, 1)], 4, 4, 16, 8, dict(alibi=True)),
    ("alibi_gqa_long", [(3, 40), (200, 1), (130, 1)], 6, 2, 16, 8, dict(alibi=True)),
    ("chunk_prefill", [(0, 37), (5, 30), (20, 15)], 4, 2, 16, 8, dict(attention_chunk_size=8)),
    ("chunk_odd_decode", [(50, 1), (3, 1), (130, 1), (7, 1)], 4, 2, 16, 8, dict(attention_chunk_size=13)),
    ("chunk_long_decode", [(300, 1), (129, 1), (64, 1)], 8, 2, 32, 16, dict(attention_chunk_size=100)),
    ("all_mixed", [(10, 30), (70, 1), (1, 1)], 8, 4, 16, 16,
     dict(sinks=True, alibi=True, attention_chunk_size=24, logit_cap=3.0)),
]


def variant_args(variants: dict, H: int, device="cpu", generator=None) -> dict:
    """The op's keyword arguments for a VARIANT_CASES entry (random sinks and slopes, fp32)."""
    g = generator or torch.Generator().manual_seed(1)
    out = {k: v for k, v in variants.items() if k not in ("sinks", "alibi")}
    if variants.get("sinks"):
        out["sinks"] = (torch.randn(H, generator=g) * 2).to(device)
    if variants.get("alibi"):
        out["alibi_slopes"] = (torch.rand(H, generator=g) * 0.5).to(device)
    return out
