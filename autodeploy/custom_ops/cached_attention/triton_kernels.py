"""Triton kernels for paged cached attention (imported lazily: needs triton).

Layout (docs/architecture.md): the batch is flattened, q[T, H, D], k[T, KV, D], v[T, KV, Dv];
sequence b owns tokens cu_seqlen[b]:cu_seqlen[b+1], the first at position input_pos[b];
caches are [num_pages, page_size, KV, D] and page_table[b, i] holds the i-th page of sequence b.

Three kernels:
- ``_append_kv``: writes every new token's K/V into its page slot (prefill / mixed batches);
- ``_prefill_attn``: flash attention over the pages, causal, one program per (query block, KV
  head). Query heads that share a KV head are packed into the rows of one tile (GQA), so K/V is
  read once per group. Decode rows of a mixed batch are 1-token sequences here.
- ``_decode_attn``: every sequence has one new token (T == B). The new K/V is written by the
  kernel itself and also taken straight from the k/v inputs, so no other program depends on the
  write. Long contexts are split over ``NUM_SPLITS`` programs (flash-decoding), merged by
  ``_combine_splits`` in a second launch (the default, ``DECODE_MERGE``) or, with
  ``merge="last_split"``, by the last split of a (sequence, KV head) to finish, counted by an
  atomic per-group counter (one launch, but the merge then waits on one program: slower).
No kernel reads a host value: grids depend on shapes only, so all of it can be CUDA-graph captured.
Scores use exp2 with log2(e) folded into the scale (and into ALiBi slopes and sink logits).
Variants of the canonical op (constexpr flags, compiled out when unused): sliding window, soft-cap,
ALiBi (``slope_h * (j - i)`` added to the scores), chunk-local attention (keys of the query's
chunk only: they bound the key range like a window) and sinks (one extra logit per head in the
softmax denominator, folded in after the key loop, or when merging split decodes).
Timings and accuracy (scripts/gpu_check.py): docs/performance.md and
docs/performance-history.md#our-own-triton-attention-h100-2026-11-27.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _find_seq(cu_ptr, target, B, BLOCK_Q: tl.constexpr, BLOCK_MODE: tl.constexpr):
    """Largest b with start(b) <= target; start(b) = cu[b] (token mode) or cu[b] // BLOCK_Q + b
    (query-block mode: an upper bound on the blocks of sequences before b, so blocks never clash)."""
    lo = 0
    hi = B
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(cu_ptr + mid)
        if BLOCK_MODE:
            start = start // BLOCK_Q + mid
        if start <= target:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _in_dim(offs, N: tl.constexpr, BLOCK: tl.constexpr):
    """offs < N, as a constant when the block is exactly N wide: a mask that varies along the head
    dim stops 16-byte vector loads (measured: 255 registers and spills instead of ~130)."""
    if N == BLOCK:
        return tl.full([BLOCK], 1, tl.int1)
    else:
        return offs < N


@triton.jit
def _tanh(x):
    # tanh through sigmoid: available on every triton version
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _logits2(s, c1, c2, HAS_CAP: tl.constexpr):
    """Scores in the exp2 domain: s * scale * log2(e), or cap * tanh(s * scale / cap) * log2(e);
    the launcher folds the constants into c1, c2."""
    if HAS_CAP:
        return c2 * _tanh(s * c1)
    else:
        return s * c1


@triton.jit
def _append_kv(
    k_ptr, v_ptr, kc_ptr, vc_ptr, input_pos_ptr, cu_ptr, pt_ptr, B,
    s_kt, s_kh, s_vt, s_vh,
    s_kcp, s_kcs, s_kch, s_vcp, s_vcs, s_vch, s_ptb,
    PAGE_SIZE: tl.constexpr, KV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    t = tl.program_id(0)
    b = _find_seq(cu_ptr, t, B, 1, False)
    start = tl.load(cu_ptr + b)
    end = tl.load(cu_ptr + b + 1)
    if t >= end:  # tokens past cu_seqlen[B] belong to no sequence
        return
    pos = tl.load(input_pos_ptr + b) + (t - start)
    page = tl.load(pt_ptr + b * s_ptb + pos // PAGE_SIZE).to(tl.int64)
    slot = pos % PAGE_SIZE
    h = tl.arange(0, BLOCK_KV)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    dv = tl.arange(0, BLOCK_DV)[None, :]
    mk = (h < KV) & _in_dim(d, D, BLOCK_D)
    mv = (h < KV) & _in_dim(dv, DV, BLOCK_DV)
    kk = tl.load(k_ptr + t.to(tl.int64) * s_kt + h * s_kh + d, mask=mk)
    vv = tl.load(v_ptr + t.to(tl.int64) * s_vt + h * s_vh + dv, mask=mv)
    tl.store(kc_ptr + page * s_kcp + slot * s_kcs + h * s_kch + d, kk, mask=mk)
    tl.store(vc_ptr + page * s_vcp + slot * s_vcs + h * s_vch + dv, vv, mask=mv)


@triton.jit
def _add_sink(acc, m_i, l_i, sink2):
    """One more logit per row (log2 domain) in the softmax denominator, with no value."""
    m_new = tl.maximum(m_i, sink2)
    alpha = tl.exp2(m_i - m_new)
    return acc * alpha[:, None], m_new, l_i * alpha + tl.exp2(sink2 - m_new)


@triton.jit
def _prefill_range(
    acc, m_i, l_i, q, q_pos, start, stop, hi, window, chunk, slope2, c1, c2, kc_ptr, vc_ptr, pt_row, kvh,
    s_kcp, s_kcs, s_kch, s_vcp, s_vcs, s_vch, offs_d, offs_dv, d_ok, dv_ok,
    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_CHUNK: tl.constexpr, PREC: tl.constexpr, MASKED: tl.constexpr,
):
    """Online softmax over key blocks [start, stop); MASKED=False for blocks every row fully sees."""
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        if MASKED:
            page = tl.load(pt_row + offs_n // PAGE_SIZE, mask=n_ok, other=0).to(tl.int64)
        else:
            page = tl.load(pt_row + offs_n // PAGE_SIZE).to(tl.int64)
        slot = offs_n % PAGE_SIZE
        kv_ok = n_ok[:, None] if MASKED else tl.full([BLOCK_N, 1], 1, tl.int1)
        k = tl.load(kc_ptr + (page * s_kcp + slot * s_kcs + kvh * s_kch)[:, None] + offs_d[None, :],
                    mask=kv_ok & d_ok[None, :], other=0.0)
        s = _logits2(tl.dot(q, tl.trans(k), input_precision=PREC), c1, c2, HAS_CAP)
        if HAS_ALIBI:
            s += slope2[:, None] * (offs_n[None, :] - q_pos[:, None]).to(tl.float32)
        if MASKED:
            mask = n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None])
            if HAS_WINDOW:
                mask = mask & (q_pos[:, None] - offs_n[None, :] < window)
            if HAS_CHUNK:
                mask = mask & (offs_n[None, :] // chunk == q_pos[:, None] // chunk)
            s = tl.where(mask, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key yet
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vc_ptr + (page * s_vcp + slot * s_vcs + kvh * s_vch)[:, None] + offs_dv[None, :],
                    mask=kv_ok & dv_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _prefill_attn(
    q_ptr, o_ptr, kc_ptr, vc_ptr, input_pos_ptr, cu_ptr, pt_ptr, sinks_ptr, slopes_ptr, B,
    c1, c2, window, chunk,
    s_qt, s_qh, s_ot, s_oh,
    s_kcp, s_kcs, s_kch, s_vcp, s_vcs, s_vch, s_ptb,
    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CAP: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_CHUNK: tl.constexpr,
    REVERSE: tl.constexpr, PREC: tl.constexpr,
):
    qb = tl.program_id(0)
    if REVERSE:  # last (longest causal) blocks first, for a shorter tail
        qb = tl.num_programs(0) - 1 - qb
    kvh = tl.program_id(1)
    b = _find_seq(cu_ptr, qb, B, BLOCK_Q, True)
    start = tl.load(cu_ptr + b)
    n_new = tl.load(cu_ptr + b + 1) - start
    q0 = (qb - (start // BLOCK_Q + b)) * BLOCK_Q  # first query token of this block (in the sequence)
    if q0 >= n_new:  # the grid over-provisions blocks (no host sync to count them)
        return
    pos0 = tl.load(input_pos_ptr + b)

    # rows = BLOCK_Q tokens x G_PAD query heads of this KV head (BLOCK_M = BLOCK_Q * G_PAD)
    offs_m = tl.arange(0, BLOCK_M)
    tok = q0 + offs_m // G_PAD
    head = kvh * G + offs_m % G_PAD
    row_ok = (tok < n_new) & (offs_m % G_PAD < G)
    q_pos = pos0 + tok
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = _in_dim(offs_d, D, BLOCK_D)
    dv_ok = _in_dim(offs_dv, DV, BLOCK_DV)
    q_rows = (start + tok).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * s_qt + head[:, None] * s_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    slope2 = tl.zeros([BLOCK_M], tl.float32)
    if HAS_ALIBI:
        slope2 = tl.load(slopes_ptr + head, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634

    hi = pos0 + tl.minimum(q0 + BLOCK_Q, n_new)  # causal: nothing past the block's last query
    # the earliest key the block's first and last query see (a window or chunk moves it up)
    first_q = pos0 + q0
    last_q = first_q + BLOCK_Q - 1
    lo_first = 0
    lo_last = 0
    if HAS_WINDOW:
        lo_first = tl.maximum(first_q - window + 1, 0)
        lo_last = tl.maximum(last_q - window + 1, 0)
    if HAS_CHUNK:
        lo_first = tl.maximum(lo_first, (first_q // chunk) * chunk)
        lo_last = tl.maximum(lo_last, (last_q // chunk) * chunk)
    lo = (lo_first // BLOCK_N) * BLOCK_N
    # key blocks [full_lo, full_hi) are seen whole by every row: at or below the block's first
    # query and at or above the earliest key of its last one; only the blocks around them need masks
    full_hi = lo + ((first_q + 1 - lo) // BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(lo + tl.cdiv(tl.maximum(lo_last - lo, 0), BLOCK_N) * BLOCK_N, full_hi)
    pt_row = pt_ptr + b * s_ptb
    acc, m_i, l_i = _prefill_range(
        acc, m_i, l_i, q, q_pos, lo, full_lo, hi, window, chunk, slope2, c1, c2, kc_ptr, vc_ptr, pt_row, kvh,
        s_kcp, s_kcs, s_kch, s_vcp, s_vcs, s_vch, offs_d, offs_dv, d_ok, dv_ok,
        BLOCK_N, PAGE_SIZE, HAS_WINDOW, HAS_CAP, HAS_ALIBI, HAS_CHUNK, PREC, True)
    acc, m_i, l_i = _prefill_range(
        acc, m_i, l_i, q, q_pos, full_lo, full_hi, hi, window, chunk, slope2, c1, c2, kc_ptr, vc_ptr, pt_row, kvh,
        s_kcp, s_kcs, s_kch, s_vcp, s_vcs, s_vch, offs_d, offs_dv, d_ok, dv_ok,
        BLOCK_N, PAGE_SIZE, HAS_WINDOW, HAS_CAP, HAS_ALIBI, HAS_CHUNK, PREC, False)
    acc, m_i, l_i = _prefill_range(
        acc, m_i, l_i, q, q_pos, full_hi, hi, hi, window, chunk, slope2, c1, c2, kc_ptr, vc_ptr, pt_row, kvh,
        s_kcp, s_kcs, s_kch, s_vcp, s_vcs, s_vch, offs_d, offs_dv, d_ok, dv_ok,
        BLOCK_N, PAGE_SIZE, HAS_WINDOW, HAS_CAP, HAS_ALIBI, HAS_CHUNK, PREC, True)
    if HAS_SINKS:
        sink2 = tl.load(sinks_ptr + head, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        acc, m_i, l_i = _add_sink(acc, m_i, l_i, sink2)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + q_rows[:, None] * s_ot + head[:, None] * s_oh + offs_dv[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])


@triton.jit
def _decode_attn(
    q_ptr, k_ptr, v_ptr, o_ptr, po_ptr, plse_ptr, kc_ptr, vc_ptr, input_pos_ptr, pt_ptr, sinks_ptr, slopes_ptr,
    sem_ptr, c1, c2, window, chunk,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_ot, s_oh,
    s_kcp, s_kcs, s_kch, s_vcp, s_vcs, s_vch, s_ptb,
    H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_SPLITS: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_CAP: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_CHUNK: tl.constexpr, PREC: tl.constexpr, SPLITS_PAD: tl.constexpr, MERGE_HERE: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    pos = tl.load(input_pos_ptr + b)  # position of the new token; keys 0..pos are visible
    bl = b.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = _in_dim(offs_d, D, BLOCK_D)
    dv_ok = _in_dim(offs_dv, DV, BLOCK_DV)
    k_new = tl.load(k_ptr + bl * s_kt + kvh * s_kh + offs_d, mask=d_ok, other=0.0)
    v_new = tl.load(v_ptr + bl * s_vt + kvh * s_vh + offs_dv, mask=dv_ok, other=0.0)
    pt_row = pt_ptr + b * s_ptb
    if sp == 0:  # the new token's K/V goes into its page once; nobody in this launch reads it back
        page = tl.load(pt_row + pos // PAGE_SIZE).to(tl.int64)
        tl.store(kc_ptr + page * s_kcp + (pos % PAGE_SIZE) * s_kcs + kvh * s_kch + offs_d, k_new, mask=d_ok)
        tl.store(vc_ptr + page * s_vcp + (pos % PAGE_SIZE) * s_vcs + kvh * s_vch + offs_dv, v_new, mask=dv_ok)

    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(pos - window + 1, 0)
    if HAS_CHUNK:
        lo = tl.maximum(lo, (pos // chunk) * chunk)
    # this split's share of keys [lo, pos], in whole BLOCK_N blocks
    chunk = tl.cdiv(tl.cdiv(pos + 1 - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    s_lo = lo + sp * chunk
    s_hi = tl.minimum(s_lo + chunk, pos + 1)

    offs_g = tl.arange(0, G_PAD)
    g_ok = offs_g < G
    head = kvh * G + offs_g
    q = tl.load(q_ptr + bl * s_qt + head[:, None] * s_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    slope2 = tl.zeros([G_PAD], tl.float32)
    if HAS_ALIBI:
        slope2 = tl.load(slopes_ptr + head, mask=g_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_DV], tl.float32)

    cached_hi = tl.minimum(s_hi, pos)  # keys before the new token come from the pages
    for n0 in range(s_lo, cached_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < cached_hi
        page = tl.load(pt_row + offs_n // PAGE_SIZE, mask=n_ok, other=0).to(tl.int64)
        slot = offs_n % PAGE_SIZE
        k = tl.load(kc_ptr + (page * s_kcp + slot * s_kcs + kvh * s_kch)[:, None] + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = _logits2(tl.dot(q, tl.trans(k), input_precision=PREC), c1, c2, HAS_CAP)
        if HAS_ALIBI:
            s += slope2[:, None] * (offs_n - pos).to(tl.float32)[None, :]
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vc_ptr + (page * s_vcp + slot * s_vcs + kvh * s_vch)[:, None] + offs_dv[None, :],
                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    if (s_lo <= pos) & (pos < s_hi):  # the new token itself, straight from the k/v inputs
        s1 = _logits2(tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1), c1, c2, HAS_CAP)
        m_new = tl.maximum(m_i, s1)
        alpha = tl.exp2(m_i - m_new)
        p1 = tl.exp2(s1 - m_new)
        l_i = l_i * alpha + p1
        acc = acc * alpha[:, None] + p1[:, None] * v_new.to(tl.float32)[None, :]
        m_i = m_new

    if HAS_SINKS and NUM_SPLITS == 1:  # split decodes add the sink when combining
        sink2 = tl.load(sinks_ptr + head, mask=g_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        acc, m_i, l_i = _add_sink(acc, m_i, l_i, sink2)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if NUM_SPLITS == 1:
        tl.store(o_ptr + bl * s_ot + head[:, None] * s_oh + offs_dv[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=g_ok[:, None] & dv_ok[None, :])
    else:  # partial result + its log2-sum-exp; an empty split has lse = -inf and weighs nothing
        row = (bl * H + head) * NUM_SPLITS + sp
        tl.store(po_ptr + row[:, None] * DV + offs_dv[None, :], out, mask=g_ok[:, None] & dv_ok[None, :])
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(plse_ptr + row, lse, mask=g_ok)
        if MERGE_HERE:
            # the last split of (b, kvh) to get here combines them all (saves a kernel launch per
            # layer); acq_rel: the other splits' stores above are visible once their count is
            sem = sem_ptr + b * (H // G) + kvh
            if tl.atomic_add(sem, 1, sem="acq_rel") == NUM_SPLITS - 1:
                for g in tl.static_range(G):  # head by head: all of a head's splits in one load
                    h = kvh * G + g
                    _combine_head(po_ptr, plse_ptr, o_ptr, sinks_ptr, (bl * H + h) * NUM_SPLITS, h,
                                  bl * s_ot + h * s_oh, offs_dv, dv_ok, DV, NUM_SPLITS, SPLITS_PAD, HAS_SINKS)
                tl.atomic_xchg(sem, 0)  # ready for the next launch (CUDA graphs replay the same counters)


@triton.jit
def _combine_head(po_ptr, plse_ptr, o_ptr, sinks_ptr, row, h, o_off, offs_dv, dv_ok,
                  DV: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, HAS_SINKS: tl.constexpr):
    """Weigh one head's split outputs (rows ``row .. row + NUM_SPLITS``) by their log2-sum-exps,
    all splits in one load (.cg: written by other programs of this launch, not cached in L1)."""
    offs_s = tl.arange(0, SPLITS_PAD)
    s_ok = offs_s < NUM_SPLITS
    lse = tl.load(plse_ptr + row + offs_s, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
    m = tl.max(lse, 0)  # split 0 always holds keys, so the max is finite
    if HAS_SINKS:
        sink2 = tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634
        m = tl.maximum(m, sink2)
    w = tl.exp2(lse - m)
    denom = tl.sum(w, 0)
    if HAS_SINKS:
        denom += tl.exp2(sink2 - m)
    po = tl.load(po_ptr + (row + offs_s)[:, None] * DV + offs_dv[None, :], mask=s_ok[:, None] & dv_ok[None, :],
                 other=0.0, cache_modifier=".cg")
    out = tl.sum(po * w[:, None], 0) / denom
    tl.store(o_ptr + o_off + offs_dv, out.to(o_ptr.dtype.element_ty), mask=dv_ok)


@triton.jit
def _combine_splits(po_ptr, plse_ptr, o_ptr, sinks_ptr, s_ot, s_oh,
                    H: tl.constexpr, DV: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
                    BLOCK_DV: tl.constexpr, HAS_SINKS: tl.constexpr):
    """The separate merge (``merge="launch"``): one program per (sequence, head)."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_dv = tl.arange(0, BLOCK_DV)
    _combine_head(po_ptr, plse_ptr, o_ptr, sinks_ptr, (b * H + h) * NUM_SPLITS, h, b * s_ot + h * s_oh, offs_dv,
                  _in_dim(offs_dv, DV, BLOCK_DV), DV, NUM_SPLITS, SPLITS_PAD, HAS_SINKS)


# ----------------------------------------------------------------------------- launchers

_NUM_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # interpreter
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def _p2(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


def _p2_dot(x: int) -> int:
    return max(16, _p2(x))  # tl.dot needs every dim >= 16


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _cache_strides(c: torch.Tensor) -> tuple[int, int, int]:
    if c.stride(-1) != 1:
        raise ValueError(f"paged cache must be contiguous in its last dim, got strides {c.stride()}")
    return c.stride(0), c.stride(1), c.stride(2)


def _dot_precision(q: torch.Tensor) -> str:
    # fp32 inputs (tests, fp32 models) get exact fp32 products rather than Triton's tf32 default
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _per_head(t, like: torch.Tensor) -> torch.Tensor:
    """A per-head [H] argument as the kernels read it; ``like`` stands in (never read) when absent."""
    return like if t is None else t.contiguous()


def _score_consts(scale: float, cap: float) -> tuple[float, float]:
    """(c1, c2) of _logits2."""
    if cap:
        return float(scale) / cap, cap * LOG2E
    return float(scale) * LOG2E, 0.0


# how a split decode merges its splits (decode_attention's ``merge``): a second launch was faster
# at every batch size (scripts/gpu_check.py --decode-merge; docs/performance-history.md)
DECODE_MERGE = "launch"


def decode_num_splits(batch: int, kv_heads: int, max_ctx: int, device: torch.device, block_n: int) -> int:
    """Programs per (sequence, KV head): enough to give every SM ~2 programs, never a split shorter
    than one key block of the longest context the page table can hold (known without a sync)."""
    want = triton.cdiv(2 * _num_sms(device), batch * kv_heads)
    return max(1, min(want, 32, triton.cdiv(max_ctx, block_n)))


def append_kv(k, v, k_cache, v_cache, input_pos, cu_seqlen, page_table):
    """Write every new token's K/V (k[T, KV, D], v[T, KV, Dv]) into its page slot."""
    T, KV, D = k.shape
    DV = v.shape[-1]
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    B = input_pos.shape[0]
    if T == 0 or B == 0:
        return
    _append_kv[(T,)](
        k, v, k_cache, v_cache, input_pos, cu_seqlen, page_table, B,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *_cache_strides(k_cache), *_cache_strides(v_cache), page_table.stride(0),
        PAGE_SIZE=k_cache.shape[1], KV=KV, D=D, DV=DV,
        BLOCK_KV=_p2(KV), BLOCK_D=_p2(D), BLOCK_DV=_p2(DV),
    )


def prefill_attention(q, k_cache, v_cache, input_pos, cu_seqlen, page_table, scale, window, cap,
                      block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                      num_stages: int = 2, reverse: bool = True, sinks=None, alibi_slopes=None, chunk: int = 0):
    """Causal attention of q[T, H, D] over the pages (the new K/V must already be appended);
    ``sinks`` / ``alibi_slopes`` are [H] tensors or None, ``chunk`` > 0 makes it chunk-local."""
    T, H, D = q.shape
    KV, DV = k_cache.shape[2], v_cache.shape[-1]
    # tiles that fit shared memory and registers (halved for wide heads or fp32); 64x64 with 4 warps
    # was the fastest of six configs at Llama-8B shapes (scripts/gpu_check.py)
    big = max(D, DV) > 128 or q.element_size() > 2
    block_m = block_m or 64
    block_n = block_n or (32 if big else 64)
    num_warps = num_warps or (8 if big else 4)
    G = H // KV
    G_PAD = _p2(G)
    block_q = max(1, block_m // G_PAD)
    B = input_pos.shape[0]
    out = q.new_empty((T, H, DV))
    if T == 0 or B == 0:
        return out
    q = _last_dim_contiguous(q)
    grid = (T // block_q + B, KV)
    _prefill_attn[grid](
        q, out, k_cache, v_cache, input_pos, cu_seqlen, page_table, _per_head(sinks, q), _per_head(alibi_slopes, q),
        B, *_score_consts(scale, cap), int(window or 0), int(chunk or 0),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *_cache_strides(k_cache), *_cache_strides(v_cache), page_table.stride(0),
        G=G, G_PAD=G_PAD, BLOCK_Q=block_q, BLOCK_M=block_q * G_PAD, BLOCK_N=block_n, PAGE_SIZE=k_cache.shape[1],
        D=D, DV=DV, BLOCK_D=_p2_dot(D), BLOCK_DV=_p2_dot(DV),
        HAS_WINDOW=bool(window), HAS_CAP=bool(cap), HAS_SINKS=sinks is not None,
        HAS_ALIBI=alibi_slopes is not None, HAS_CHUNK=bool(chunk), REVERSE=reverse, PREC=_dot_precision(q),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def decode_attention(q, k, v, k_cache, v_cache, input_pos, page_table, scale, window, cap,
                     num_splits: int | None = None, block_n: int | None = None, num_warps: int = 4,
                     num_stages: int = 2, sinks=None, alibi_slopes=None, chunk: int = 0, merge: str | None = None):
    """One new token per sequence (q[B, H, D], k[B, KV, D]): writes its K/V into the pages and
    attends over positions 0..input_pos[b] (within the window or chunk). A split decode merges its
    splits in the last split to finish (``merge="last_split"``) or in a second launch (``"launch"``);
    None = ``DECODE_MERGE``."""
    B, H, D = q.shape
    KV, DV = k.shape[1], v.shape[-1]
    G = H // KV
    block_n = block_n or (32 if max(D, DV) > 128 or q.element_size() > 2 else 64)
    out = q.new_empty((B, H, DV))
    if B == 0:
        return out
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    max_ctx = page_table.shape[1] * k_cache.shape[1]
    if window:
        max_ctx = min(max_ctx, int(window))
    if chunk:
        max_ctx = min(max_ctx, int(chunk))
    splits = num_splits or decode_num_splits(B, KV, max_ctx, q.device, block_n)
    merge = merge or DECODE_MERGE
    if merge not in ("last_split", "launch"):
        raise ValueError(f"merge must be 'last_split' or 'launch', got {merge!r}")
    if splits > 1:
        part_o = torch.empty((B, H, splits, DV), device=q.device, dtype=torch.float32)
        part_lse = torch.empty((B, H, splits), device=q.device, dtype=torch.float32)
        sem = _split_counters(q.device, B * KV) if merge == "last_split" else part_lse  # unused: no counting
    else:
        part_o = part_lse = sem = out  # unused
    has_sinks, has_alibi = sinks is not None, alibi_slopes is not None
    sinks, alibi_slopes = _per_head(sinks, q), _per_head(alibi_slopes, q)
    _decode_attn[(B, KV, splits)](
        q, k, v, out, part_o, part_lse, k_cache, v_cache, input_pos, page_table, sinks, alibi_slopes, sem,
        *_score_consts(scale, cap), int(window or 0), int(chunk or 0),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        *_cache_strides(k_cache), *_cache_strides(v_cache), page_table.stride(0),
        H=H, G=G, G_PAD=max(16, _p2(G)), BLOCK_N=block_n, PAGE_SIZE=k_cache.shape[1],
        D=D, DV=DV, BLOCK_D=_p2_dot(D), BLOCK_DV=_p2_dot(DV), NUM_SPLITS=splits,
        HAS_WINDOW=bool(window), HAS_CAP=bool(cap), HAS_SINKS=has_sinks, HAS_ALIBI=has_alibi,
        HAS_CHUNK=bool(chunk), PREC=_dot_precision(q), SPLITS_PAD=_p2(splits), MERGE_HERE=merge == "last_split",
        num_warps=num_warps, num_stages=num_stages,
    )
    if splits > 1 and merge == "launch":
        _combine_splits[(B, H)](part_o, part_lse, out, sinks, out.stride(0), out.stride(1), H=H, DV=DV,
                                NUM_SPLITS=splits, SPLITS_PAD=_p2(splits), BLOCK_DV=_p2_dot(DV), HAS_SINKS=has_sinks)
    return out


_COUNTERS: dict[torch.device, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []  # counters replaced by larger ones: CUDA graphs may still read them


def _split_counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 counters, one per (sequence, KV head), that split decodes count up and the last
    split resets. Allocated once per device, generously (a CUDA graph keeps the address it captured)."""
    t = _COUNTERS.get(device)
    if t is None or t.numel() < n:
        if t is not None:
            _OUTGROWN.append(t)
        t = _COUNTERS[device] = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
    return t


def cached_attention(q, k, v, seq_len, input_pos, cu_seqlen, page_table, k_cache, v_cache,
                     scale, sliding_window=None, logit_cap=None, sinks=None, alibi_slopes=None,
                     attention_chunk_size=None):
    """The op body: q[1, T, H, D] ... -> [1, T, H, Dv]. Decode-only batches (T == B, i.e. every
    sequence brings one token, since none brings zero) take the decode kernel; others attend and
    append the new K/V in one ``triton_prefill.varlen_attention`` launch (``prefill_attention``
    above, which reads every key from the pages after ``append_kv``, serves sinks, ALiBi and
    chunked attention, and scripts/gpu_check.py times it beside)."""
    q3, k3, v3 = q[0], k[0], v[0]
    T, B = q3.shape[0], seq_len.shape[0]
    window = int(sliding_window) if sliding_window is not None and sliding_window > 0 else 0
    cap = float(logit_cap) if logit_cap is not None and logit_cap > 0 else 0.0
    variants = dict(sinks=sinks, alibi_slopes=alibi_slopes, chunk=int(attention_chunk_size or 0))
    if T == B:
        out = decode_attention(q3, k3, v3, k_cache, v_cache, input_pos, page_table, scale, window, cap, **variants)
    elif sinks is None and alibi_slopes is None and not variants["chunk"]:
        # new keys straight from k/v, the cached prefix from the pages, the new K/V appended to the
        # pages in the same launch (triton_prefill.py)
        from .triton_prefill import varlen_attention

        out = varlen_attention(q3, k3, v3, k_cache, v_cache, input_pos, cu_seqlen, page_table, scale, window, cap,
                               append=True)
    else:  # sinks, ALiBi and chunked attention: the kernel that reads every key from the pages
        append_kv(k3, v3, k_cache, v_cache, input_pos, cu_seqlen, page_table)
        out = prefill_attention(q3, k_cache, v_cache, input_pos, cu_seqlen, page_table, scale, window, cap,
                                **variants)
    return out.unsqueeze(0)
