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


def reference(batch: Batch, scale: float, sliding_window=None, logit_cap=None):
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
        mask = pos[None, :] <= qpos[:, None]
        if sliding_window:
            mask &= qpos[:, None] - pos[None, :] < sliding_window
        scores = scores.masked_fill(~mask, float("-inf"))
        out[s:e] = torch.einsum("htl,lhd->thd", scores.softmax(-1), V)
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
