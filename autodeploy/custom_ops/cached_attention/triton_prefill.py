"""Triton attention for batches with prompt tokens: new keys straight from the inputs.

``triton_kernels._prefill_attn`` reads every key, the new ones too, back from the pages it just
appended them to: a page-table lookup and a gather per key block, so it cannot stream K/V the way
flash attention does (about 2x slower than dense SDPA on fresh prompts).
Here a sequence's keys come from two places:
- the new tokens' K/V (the ``k``/``v`` inputs, contiguous rows): a fresh prompt reads only these,
  with causal masking on the diagonal blocks only;
- the cached prefix ``[0, input_pos)`` (later prefill chunks, and decodes in a mixed batch), from the
  pages, with bounds (and window) masks.
With ``append`` the kernel also writes the new K/V to the pages for later steps, each program its
own tokens of its KV head (``_store_new_kv``): ``append_kv``'s work without a launch of its own.
No program reads those slots (new keys come from k/v; the pages it reads hold earlier positions).

One program per (query block, KV head): the query heads sharing a KV head are packed into the
tile's rows (``BLOCK_Q`` tokens x ``G_PAD`` heads), so K/V is loaded once per group. A sequence
with one new token (a decode in a mixed batch) takes a small-tile branch of the same program
(``G`` rows instead of ``BLOCK_M``, 128 keys per block with the 16-bit tiles). Grids depend on shapes only (no host sync): blocks are
over-provisioned by B and programs past their sequence's end return at once. Scores use exp2.
Sliding windows and tanh soft-capping are supported; options the old kernels learn later (sinks,
ALiBi) keep that path: see ``triton_kernels.cached_attention``.

torch's flash attention (FA2) for a step's fresh prompts was measured slower than this kernel and
dropped (commit 74c67ca has it): docs/performance-history.md#prefill-graphs-the-kv-append-flash-attention-dropped-h200-2026-12-01.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_kernels import (
    _cache_strides,
    _dot_precision,
    _find_seq,
    _in_dim,
    _last_dim_contiguous,
    _p2,
    _score_consts,
)


@triton.jit
def _scores(q, k, c1, c2, HAS_CAP: tl.constexpr, PREC: tl.constexpr):
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    if HAS_CAP:  # cap * tanh(s * scale / cap), tanh through sigmoid, in the exp2 domain
        return c2 * (2.0 * tl.sigmoid(2.0 * s * c1) - 1.0)
    else:
        return s * c1


@triton.jit
def _online_softmax(acc, m_i, l_i, s, v, MASKED: tl.constexpr, PREC: tl.constexpr):
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:  # rows that have seen no key yet keep m = -inf
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def _attend_pages(acc, m_i, l_i, q, q_pos, lo, hi, window, c1, c2, kc_ptr, vc_ptr, pt_row, kvh,
                  s_kcp, s_kcs, s_kch, s_vcp, s_vcs, s_vch, offs_d, offs_dv, d_ok, dv_ok,
                  BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  HAS_CAP: tl.constexpr, PREC: tl.constexpr):
    """Keys at positions [lo, hi) of the cached prefix: every query (position >= hi) sees them,
    within the window."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        page = tl.load(pt_row + offs_n // PAGE_SIZE, mask=n_ok, other=0).to(tl.int64)
        slot = offs_n % PAGE_SIZE
        k = tl.load(kc_ptr + (page * s_kcp + slot * s_kcs + kvh * s_kch)[:, None] + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        mask = n_ok[None, :]
        if HAS_WINDOW:
            mask = mask & (q_pos[:, None] - offs_n[None, :] < window)
        s = tl.where(mask, _scores(q, k, c1, c2, HAS_CAP, PREC), float("-inf"))
        v = tl.load(vc_ptr + (page * s_vcp + slot * s_vcs + kvh * s_vch)[:, None] + offs_dv[None, :],
                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        acc, m_i, l_i = _online_softmax(acc, m_i, l_i, s, v, True, PREC)
    return acc, m_i, l_i


@triton.jit
def _attend_new(acc, m_i, l_i, q, tok, lo, hi, window, c1, c2, k_rows, v_rows, s_kt, s_vt,
                offs_d, offs_dv, d_ok, dv_ok, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                HAS_WINDOW: tl.constexpr, HAS_CAP: tl.constexpr, PREC: tl.constexpr):
    """New keys j in [lo, hi) from the k/v inputs (``k_rows`` points at the sequence's first
    new token of this KV head); query row of new token t sees j <= t (and t - j < window)."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)  # int32 offsets inside one sequence's rows
        if MASKED:
            n_ok = offs_n < hi
            k = tl.load(k_rows + offs_n[:, None] * s_kt + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            mask = n_ok[None, :] & (offs_n[None, :] <= tok[:, None])
            if HAS_WINDOW:
                mask = mask & (tok[:, None] - offs_n[None, :] < window)
            s = tl.where(mask, _scores(q, k, c1, c2, HAS_CAP, PREC), float("-inf"))
            v = tl.load(v_rows + offs_n[:, None] * s_vt + offs_dv[None, :], mask=n_ok[:, None] & dv_ok[None, :],
                        other=0.0)
            acc, m_i, l_i = _online_softmax(acc, m_i, l_i, s, v, True, PREC)
        else:  # blocks every row sees whole: no masks, so the loads can be pipelined freely
            k = tl.load(k_rows + offs_n[:, None] * s_kt + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            s = _scores(q, k, c1, c2, HAS_CAP, PREC)
            v = tl.load(v_rows + offs_n[:, None] * s_vt + offs_dv[None, :], mask=dv_ok[None, :], other=0.0)
            acc, m_i, l_i = _online_softmax(acc, m_i, l_i, s, v, False, PREC)
    return acc, m_i, l_i


@triton.jit
def _store_new_kv(k_ptr, v_ptr, kc_ptr, vc_ptr, pt_row, kvh, start, pos0, q0, n_new, s_kt, s_kh, s_vt, s_vh,
                  s_kcp, s_kcs, s_kch, s_vcp, s_vcs, s_vch, offs_d, offs_dv, d_ok, dv_ok,
                  BLOCK_Q: tl.constexpr, STORE_Q: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """K/V head ``kvh`` of new tokens [q0, q0 + BLOCK_Q) into their page slots (STORE_Q >= BLOCK_Q
    rows, a power of two >= 16, masked). Every (query block, KV head) program writes its own
    share, so the kernel appends the whole batch; no program reads these slots (new keys come
    from k/v), and the pages it reads hold positions before ``pos0``."""
    offs = tl.arange(0, STORE_Q)
    tok = q0 + offs
    ok = (offs < BLOCK_Q) & (tok < n_new)
    rows = (start + tok).to(tl.int64)
    pos = pos0 + tok
    page = tl.load(pt_row + pos // PAGE_SIZE, mask=ok, other=0).to(tl.int64)
    slot = pos % PAGE_SIZE
    mk = ok[:, None] & d_ok[None, :]
    mv = ok[:, None] & dv_ok[None, :]
    kk = tl.load(k_ptr + rows[:, None] * s_kt + kvh * s_kh + offs_d[None, :], mask=mk)
    vv = tl.load(v_ptr + rows[:, None] * s_vt + kvh * s_vh + offs_dv[None, :], mask=mv)
    tl.store(kc_ptr + (page * s_kcp + slot * s_kcs + kvh * s_kch)[:, None] + offs_d[None, :], kk, mask=mk)
    tl.store(vc_ptr + (page * s_vcp + slot * s_vcs + kvh * s_vch)[:, None] + offs_dv[None, :], vv, mask=mv)


@triton.jit
def _attend_rows(q_ptr, k_ptr, v_ptr, o_ptr, kc_ptr, vc_ptr, pt_row, kvh, start, pos0, q0, n_new,
                 c1, c2, window, s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_ot, s_oh,
                 s_kcp, s_kcs, s_kch, s_vcp, s_vcs, s_vch,
                 G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CAP: tl.constexpr,
                 PREC: tl.constexpr, STORE_Q: tl.constexpr):
    """Attention of new tokens [q0, q0 + BLOCK_Q) of one sequence, the G query heads of KV head
    ``kvh`` packed into the BLOCK_M = BLOCK_Q * G_PAD rows (row r: token q0 + r // G_PAD, head
    kvh * G + r % G_PAD). STORE_Q > 0: also append those tokens' K/V of head ``kvh`` to the pages."""
    offs_m = tl.arange(0, BLOCK_M)
    tok = q0 + offs_m // G_PAD
    head = kvh * G + offs_m % G_PAD
    row_ok = (tok < n_new) & (offs_m % G_PAD < G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = _in_dim(offs_d, D, BLOCK_D)
    dv_ok = _in_dim(offs_dv, DV, BLOCK_DV)
    if STORE_Q:
        _store_new_kv(k_ptr, v_ptr, kc_ptr, vc_ptr, pt_row, kvh, start, pos0, q0, n_new, s_kt, s_kh, s_vt, s_vh,
                      s_kcp, s_kcs, s_kch, s_vcp, s_vcs, s_vch, offs_d, offs_dv, d_ok, dv_ok,
                      BLOCK_Q, STORE_Q, PAGE_SIZE)
    q_rows = (start + tok).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * s_qt + head[:, None] * s_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    # the cached prefix [lo, pos0), from the pages
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(pos0 + q0 - window + 1, 0)
    acc, m_i, l_i = _attend_pages(
        acc, m_i, l_i, q, pos0 + tok, lo, pos0, window, c1, c2, kc_ptr, vc_ptr, pt_row, kvh,
        s_kcp, s_kcs, s_kch, s_vcp, s_vcs, s_vch, offs_d, offs_dv, d_ok, dv_ok,
        BLOCK_N, PAGE_SIZE, HAS_WINDOW, HAS_CAP, PREC)

    # the new tokens [0, hi): causal, so nothing past the block's last query
    k_rows = k_ptr + start.to(tl.int64) * s_kt + kvh * s_kh
    v_rows = v_ptr + start.to(tl.int64) * s_vt + kvh * s_vh
    hi = tl.minimum(q0 + BLOCK_Q, n_new)
    if HAS_WINDOW:  # every block masked; the first one any row of the block can see
        lo_new = (tl.maximum(q0 - window + 1, 0) // BLOCK_N) * BLOCK_N
        acc, m_i, l_i = _attend_new(acc, m_i, l_i, q, tok, lo_new, hi, window, c1, c2, k_rows, v_rows, s_kt,
                                    s_vt, offs_d, offs_dv, d_ok, dv_ok, BLOCK_N, True, True, HAS_CAP, PREC)
    else:  # blocks wholly at or before the block's first query, then the diagonal ones
        full_hi = ((q0 + 1) // BLOCK_N) * BLOCK_N
        acc, m_i, l_i = _attend_new(acc, m_i, l_i, q, tok, 0, full_hi, window, c1, c2, k_rows, v_rows, s_kt,
                                    s_vt, offs_d, offs_dv, d_ok, dv_ok, BLOCK_N, False, False, HAS_CAP, PREC)
        acc, m_i, l_i = _attend_new(acc, m_i, l_i, q, tok, full_hi, hi, window, c1, c2, k_rows, v_rows, s_kt,
                                    s_vt, offs_d, offs_dv, d_ok, dv_ok, BLOCK_N, True, False, HAS_CAP, PREC)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + q_rows[:, None] * s_ot + head[:, None] * s_oh + offs_dv[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])


@triton.jit
def _varlen_attn(
    q_ptr, k_ptr, v_ptr, o_ptr, kc_ptr, vc_ptr, input_pos_ptr, cu_ptr, pt_ptr, B,
    c1, c2, window,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_ot, s_oh,
    s_kcp, s_kcs, s_kch, s_vcp, s_vcs, s_vch, s_ptb,
    G: tl.constexpr, G_PAD: tl.constexpr, G_ONE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_N_ONE: tl.constexpr, PAGE_SIZE: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_CAP: tl.constexpr, PREC: tl.constexpr,
    STORE_Q: tl.constexpr, STORE_Q_ONE: tl.constexpr,  # rows of the K/V append per branch, 0: none
):
    qb = tl.num_programs(0) - 1 - tl.program_id(0)  # last (longest causal) blocks first: a shorter tail
    kvh = tl.program_id(1)
    b = _find_seq(cu_ptr, qb, B, BLOCK_Q, True)
    start = tl.load(cu_ptr + b)
    n_new = tl.load(cu_ptr + b + 1) - start
    q0 = (qb - (start // BLOCK_Q + b)) * BLOCK_Q  # first new token of this block
    if q0 >= n_new:  # the grid over-provisions blocks (no host sync to count them)
        return
    pos0 = tl.load(input_pos_ptr + b)
    pt_row = pt_ptr + b * s_ptb
    if n_new == 1:  # a decode in a mixed batch: G rows, not BLOCK_Q * G_PAD
        _attend_rows(q_ptr, k_ptr, v_ptr, o_ptr, kc_ptr, vc_ptr, pt_row, kvh, start, pos0, q0, n_new,
                     c1, c2, window, s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_ot, s_oh,
                     s_kcp, s_kcs, s_kch, s_vcp, s_vcs, s_vch,
                     G, G_ONE, 1, G_ONE, BLOCK_N_ONE, PAGE_SIZE, D, DV, BLOCK_D, BLOCK_DV, HAS_WINDOW, HAS_CAP, PREC,
                     STORE_Q_ONE)
    else:
        _attend_rows(q_ptr, k_ptr, v_ptr, o_ptr, kc_ptr, vc_ptr, pt_row, kvh, start, pos0, q0, n_new,
                     c1, c2, window, s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_ot, s_oh,
                     s_kcp, s_kcs, s_kch, s_vcp, s_vcs, s_vch,
                     G, G_PAD, BLOCK_Q, BLOCK_M, BLOCK_N, PAGE_SIZE, D, DV, BLOCK_D, BLOCK_DV, HAS_WINDOW, HAS_CAP,
                     PREC, STORE_Q)


def _block_n_one(block_n: int) -> int:
    """Keys per block of a decode row in a mixed batch: its loop over the cached context is latency
    bound, so few large blocks (128 was the fastest: docs/performance-history.md). The smallest
    tiles (wide heads, fp32) keep theirs: shared memory."""
    return 128 if block_n >= 64 else block_n


# tile configurations, largest first: 128 query rows x 64 keys with 3 pipeline stages keep K/V
# tiles of 16 KiB each in flight per stage for 16-bit heads up to 128 wide; a config that does not
# fit the GPU's shared memory (both branches of the kernel count) falls through to the next
CONFIGS = (
    {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3},
    {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 2},
    {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2},
    {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 2},
)
_first_fit: dict[tuple, int] = {}  # (device, dtype, D, DV, G) -> first config that launched


def _out_of_resources() -> tuple[type, ...]:
    try:
        from triton.runtime.errors import OutOfResources
    except ImportError:  # older layouts
        from triton.runtime.autotuner import OutOfResources
    return (OutOfResources,)


def varlen_attention(q, k, v, k_cache, v_cache, input_pos, cu_seqlen, page_table, scale, window, cap,
                     block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None, block_n_one: int | None = None,
                     append: bool = False):
    """Causal attention of q[T, H, D] over each sequence's cached prefix (pages) and its new
    tokens (k[T, KV, D], v[T, KV, Dv]); -> [T, H, Dv]. Every sequence may bring any number of
    tokens (prefills, later chunks, decodes). Tiles: the arguments, else the first of ``CONFIGS``
    that fits (16-bit heads up to 128 wide start at the largest, others at the smallest).
    ``block_n_one``: keys per block of the one-token sequences (decodes in a mixed batch).
    ``append``: also write the new tokens' K/V into their page slots (``append_kv``'s work, in the
    same launch: the op's path; one Triton launch less per layer)."""
    T, H, D = q.shape
    KV, DV = k.shape[1], v.shape[-1]
    B = input_pos.shape[0]
    out = q.new_empty((T, H, DV))
    if T == 0 or B == 0:
        return out
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    args = (q, k, v, out, k_cache, v_cache, input_pos, cu_seqlen, page_table, scale, window, cap, append)
    if block_m or block_n or num_warps or num_stages or block_n_one:
        base = CONFIGS[0] if max(D, DV) <= 128 and q.element_size() <= 2 else CONFIGS[-1]
        _launch(*args, {"block_m": block_m or base["block_m"], "block_n": block_n or base["block_n"],
                        "num_warps": num_warps or base["num_warps"], "num_stages": num_stages or base["num_stages"],
                        "block_n_one": block_n_one})
        return out
    key = (q.device, q.dtype, D, DV, H // KV)
    start = _first_fit.get(key, 0 if max(D, DV) <= 128 and q.element_size() <= 2 else len(CONFIGS) - 1)
    for i in range(start, len(CONFIGS)):
        try:
            _launch(*args, CONFIGS[i])
        except _out_of_resources():
            if i == len(CONFIGS) - 1:
                raise
            continue
        _first_fit[key] = i
        return out
    return out


def _launch(q, k, v, out, k_cache, v_cache, input_pos, cu_seqlen, page_table, scale, window, cap, append, cfg):
    T, H, D = q.shape
    KV, DV = k.shape[1], v.shape[-1]
    B = input_pos.shape[0]
    G = H // KV
    G_PAD = _p2(G)
    block_q = max(1, cfg["block_m"] // G_PAD)
    _varlen_attn[(T // block_q + B, KV)](
        q, k, v, out, k_cache, v_cache, input_pos, cu_seqlen, page_table, B,
        *_score_consts(scale, cap), int(window or 0),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        *_cache_strides(k_cache), *_cache_strides(v_cache), page_table.stride(0),
        G=G, G_PAD=G_PAD, G_ONE=max(16, G_PAD), BLOCK_Q=block_q, BLOCK_M=block_q * G_PAD, BLOCK_N=cfg["block_n"],
        BLOCK_N_ONE=cfg.get("block_n_one") or _block_n_one(cfg["block_n"]), PAGE_SIZE=k_cache.shape[1],
        D=D, DV=DV, BLOCK_D=max(16, _p2(D)), BLOCK_DV=max(16, _p2(DV)),
        HAS_WINDOW=bool(window), HAS_CAP=bool(cap), PREC=_dot_precision(q),
        STORE_Q=max(16, block_q) if append else 0, STORE_Q_ONE=16 if append else 0,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
