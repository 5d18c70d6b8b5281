"""A one-token GEMV in Triton: ``y[1, N] = x[1, K] @ w[N, K].T`` (+ bias), for batch-1 decode.

cuBLAS reads the small decode weights of an 8B model well below the copy bandwidth at one token
(scripts/gemm_check.py; docs/performance-history.md#the-one-token-gemv-h200-2026-11-30). Here each program owns ``BLOCK_N`` output rows and
streams their weights in ``BLOCK_K`` columns with plain coalesced loads; many small programs keep
enough bytes in flight. Products accumulate in fp32, summed once at the end.
Imported lazily: needs triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# (BLOCK_N, BLOCK_K, num_warps): the tile of weights each program streams per step. The default
# (8, 512, 4) was best or within 2 % of the best at every 8B shape (scripts/gemm_check.py --gemv).
DEFAULT_CONFIG = (8, 512, 4)
CONFIGS = [(4, 1024, 4), DEFAULT_CONFIG, (8, 1024, 8), (16, 512, 8), (16, 256, 4), (32, 256, 8)]


@triton.jit
def _gemv(x_ptr, w_ptr, b_ptr, y_ptr, N, K, s_wn,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * s_wn
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x = tl.load(x_ptr + cols)
            w = tl.load(w_rows + cols[None, :], mask=r_ok[:, None], other=0.0)
        else:
            c_ok = cols < K
            x = tl.load(x_ptr + cols, mask=c_ok, other=0.0)
            w = tl.load(w_rows + cols[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=r_ok)


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
         config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``x[..., K]`` holding one row, ``w[N, K]`` (last dim contiguous) -> ``[..., N]``."""
    N, K = w.shape
    if x.numel() != K:
        raise ValueError(f"gemv takes one row of {K}, got x of shape {tuple(x.shape)}")
    if w.stride(-1) != 1:
        raise ValueError(f"gemv needs the weight's last dim contiguous, got strides {w.stride()}")
    block_n, block_k, num_warps = config or DEFAULT_CONFIG
    lead = x.shape[:-1]
    x = x.reshape(K).contiguous()
    y = x.new_empty(N)
    _gemv[(triton.cdiv(N, block_n),)](
        x, w, bias if bias is not None else x, y, N, K, w.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=bias is not None, EVEN_K=K % block_k == 0,
        num_warps=num_warps,
    )
    return y.view(*lead, N)
