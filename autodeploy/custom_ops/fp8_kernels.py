"""Triton kernels for FP8 weights (imported lazily: needs triton). Math in ``fp8_linear.py``.

- ``fp8_mm``: ``y[M, N] = x[M, K] @ (q * scale)[N, K].T`` (+ bias) for 16-bit ``x``. Each program
  owns ``BLOCK_N`` output columns and streams their FP8 weights in ``BLOCK_K`` tiles; the activations
  stay 16-bit (decode is bound by the weight bytes, not the math). One row (batch-1 decode) is a
  GEMV: products accumulate in fp32 registers, summed once at the end (as ``gemv.py``). More rows
  use ``tl.dot`` on the tiles converted to the activations' dtype. Per-channel scales multiply the
  result once; block scales multiply each tile's partial product (``tl.dot`` tiles never straddle a
  scale block; the GEMV scales each element). The tile sizes are tuned per shape at the first call outside a CUDA-graph capture
  (a few configs timed with CUDA events), or fixed with ``AUTODEPLOY_FP8_TUNE=0``.
- ``quantize_rows``: per-token activation scales (amax / 448) and the FP8 rows, one program per
  row, for ``torch._scaled_mm`` (prefill).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .fp8_linear import FP8, FP8_MAX

# (BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K) candidates: one row (GEMV) and up to 64 rows
# (tl.dot). Every program of the tl.dot path reads all rows of x: a narrow BLOCK_N multiplies those
# reads (from L2), a wide one leaves SMs idle on N = 4096 unless K is split (partial sums in fp32,
# added by one reduction)
GEMV_CONFIGS = [(8, 1024, 4, 3, 1), (16, 512, 4, 3, 1), (4, 2048, 4, 3, 1), (8, 1024, 4, 3, 2)]
DOT_CONFIGS = [(16, 256, 4, 4, 1), (32, 256, 4, 3, 2), (64, 128, 4, 4, 4), (64, 256, 8, 3, 2), (128, 128, 8, 3, 4)]
LARGE_M_CONFIG = (64, 128, 128, 8, 3, 1)  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, SPLIT_K) past 64 rows
DOT_MAX_M = 64


@triton.jit
def _fp8_mm(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, k_split, s_xm, s_wn, s_sn, s_ym, s_yk,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            SCALE_BN: tl.constexpr, SCALE_BK: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr):
    # program (n block, m block, k split): the columns' sum over K in [k_begin, k_end), which is
    # all of K without split (y) or one partial sum (y[k split], fp32, added up by the caller)
    k_begin = tl.program_id(2) * k_split
    k_end = tl.minimum(k_begin + k_split, K)
    cols_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cols_n < N
    rows_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rows_m < M
    w_rows = w_ptr + cols_n.to(tl.int64)[:, None] * s_wn
    x_rows = x_ptr + rows_m.to(tl.int64)[:, None] * s_xm
    if DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    else:
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_end
        w = tl.load(w_rows + ks[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT:
            x = tl.load(x_rows + ks[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            part = tl.dot(x, tl.trans(w.to(x.dtype)))
            if SCALE_BK > 0:  # this tile lies in one scale block along K
                s = tl.load(s_ptr + (cols_n // SCALE_BN) * s_sn + k0 // SCALE_BK, mask=n_ok, other=0.0)
                part = part * s[None, :]
            acc += part
        else:
            x = tl.load(x_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            if SCALE_BK > 0:  # the tile may span scale blocks: each element's (cached) scale
                s = tl.load(s_ptr + (cols_n // SCALE_BN)[:, None] * s_sn + (ks // SCALE_BK)[None, :],
                            mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                acc2 += w.to(tl.float32) * x[None, :] * s
            else:
                acc2 += w.to(tl.float32) * x[None, :]
    if DOT:
        y = acc
    else:
        y = tl.sum(acc2, 1)[None, :]
    if SCALE_BK == 0:
        y = y * tl.load(s_ptr + cols_n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + cols_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + tl.program_id(2) * s_yk + rows_m.to(tl.int64)[:, None] * s_ym + cols_n[None, :]
    tl.store(out, y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


_TUNED: dict[tuple, tuple] = {}


def _tuning() -> bool:
    return os.environ.get("AUTODEPLOY_FP8_TUNE", "1") != "0"


def _launch(x, w, scale, bias, block_size, config, block_m: int, dot: bool) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[0]
    block_n, block_k, warps, stages, split = config
    scale_bn, scale_bk = block_size if block_size is not None else (0, 0)
    if scale_bk and dot:
        block_k = min(block_k, scale_bk)  # a K tile within one scale block
        if scale_bk % block_k:
            raise ValueError(f"fp8 block size {list(block_size)}: K blocks must be a multiple of {block_k}")
    split = max(1, min(split, triton.cdiv(k, block_k)))
    k_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k  # whole tiles per split
    split = triton.cdiv(k, k_split)
    y = x.new_empty((m, n)) if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split)
    _fp8_mm[grid](
        x, w, scale, bias if bias is not None else scale, y, m, n, k, k_split, x.stride(0), w.stride(0),
        scale.stride(0) if scale_bk else 0, y.stride(-2), y.stride(0) if split > 1 else 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SCALE_BN=scale_bn, SCALE_BK=scale_bk,
        HAS_BIAS=bias is not None and split == 1, DOT=dot, num_warps=warps, num_stages=stages,
    )
    if split == 1:
        return y
    y = y.sum(0)
    if bias is not None:
        y += bias
    return y.to(x.dtype)


def _pick(key: tuple, candidates: list, run) -> tuple:
    """The fastest candidate for ``key`` (timed once, at the first call outside a capture)."""
    best = _TUNED.get(key)
    if best is not None:
        return best
    if len(candidates) == 1 or not _tuning() or not run.cuda or torch.cuda.is_current_stream_capturing():
        return candidates[0]
    times = []
    for config in candidates:
        run(config)  # compile
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            run(config)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    _TUNED[key] = best = candidates[times.index(min(times))]
    return best


def fp8_mm(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
           block_size: Optional[Sequence[int]] = None, config: Optional[tuple] = None) -> torch.Tensor:
    """``x[..., K]`` (16-bit) times FP8 ``w[N, K]`` with per-channel ``scale[N]`` or block scales
    (``block_size``) -> ``[..., N]`` in ``x``'s dtype. ``config`` fixes (BLOCK_N, BLOCK_K, warps,
    stages, SPLIT_K)."""
    n, k = w.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if w.stride(-1) != 1:
        raise ValueError(f"fp8_mm needs the weight's last dim contiguous, got strides {w.stride()}")
    m = x2.shape[0]
    scale = scale.float().contiguous()
    if m == 1:
        dot, block_m, candidates = False, 1, GEMV_CONFIGS
    elif m <= DOT_MAX_M:
        dot, block_m, candidates = True, max(16, triton.next_power_of_2(m)), DOT_CONFIGS
    else:
        block_m, *big = LARGE_M_CONFIG
        dot, candidates = True, [tuple(big)]
    block = tuple(block_size) if block_size is not None else None

    def run(cfg):
        return _launch(x2, w, scale, bias, block, cfg, block_m, dot)

    run.cuda = x2.is_cuda  # the interpreter (CPU tests) runs the first config

    if config is None:
        config = _pick((block_m, n, k, block, x2.dtype, bias is not None), candidates, run)
    return run(config).view(*lead, n)


@triton.jit
def _quantize_rows(x_ptr, q_ptr, s_ptr, K, s_xm, s_qm, fp8_max, MIN_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, K, BLOCK):
        ks = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * s_xm + ks, mask=ks < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    # IEEE divisions (div_rn), as torch's: the rounded e4m3 values then agree bit for bit
    scale = tl.math.div_rn(tl.maximum(tl.max(amax, 0), MIN_SCALE), fp8_max)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        ks = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * s_xm + ks, mask=ks < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -fp8_max), fp8_max)
        tl.store(q_ptr + row * s_qm + ks, q.to(q_ptr.dtype.element_ty), mask=ks < K)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x[M, K]`` -> (FP8 ``q[M, K]``, float32 ``scale[M, 1]``), as ``fp8_linear.quantize_rows``."""
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty((m, k), dtype=FP8, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        block = min(triton.next_power_of_2(k), 4096)
        _quantize_rows[(m,)](x, q, scale, k, x.stride(0), q.stride(0), FP8_MAX, MIN_SCALE=1e-12,
                             BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return q, scale
