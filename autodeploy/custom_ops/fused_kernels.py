"""Triton kernels for the row-wise canonical ops on CUDA (imported lazily: needs triton).

Used where no compiler sees the graph (eager runs and the ``torch-cudagraph`` backend); under
``torch-compile`` / ``torch-opt`` inductor generates its own kernels from the reference math.
- ``_rms_norm``: one program per row: optional residual add (the sum is rounded to the dtype and
  written out), fp32 variance, normalize, round, times weight. One read of x (and residual),
  one write of each output: the eager op is six kernels (pow, mean, add, rsqrt, mul, copy).
- ``_silu_mul``: ``silu(gate) * up`` from the two halves of each row of the gate/up output.
Rounding follows HF's eager ops (see the ops' docstrings), so results differ from them only by
the fp32 summation order of the variance.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm(
    x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, N, eps, s_x, s_r, s_o, s_s,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * s_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * s_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)  # rounded like the eager add
        tl.store(sum_ptr + row * s_s + offs, x, mask=mask)
    x32 = x.to(tl.float32)
    variance = tl.sum(x32 * x32, axis=0) / N
    normed = (x32 * (1.0 / tl.sqrt(variance + eps))).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    out = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * s_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul(x_ptr, out_ptr, I, s_x, s_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = col < I
    gate = tl.load(x_ptr + row * s_x + col, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * s_x + I + col, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty)  # HF rounds the activation
    tl.store(out_ptr + row * s_o + col, (act.to(tl.float32) * up).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, N] with a unit stride in N (a view when the layout allows it)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _num_warps(block: int) -> int:
    return max(1, min(16, block // 256))


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """(normed, x + residual) with a residual, else (normed, None); shapes of x."""
    N = x.shape[-1]
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    total = torch.empty_like(x) if residual is not None else None
    x2 = _rows(x)
    rows = x2.shape[0]
    if rows == 0:
        return out, total
    r2 = _rows(residual) if residual is not None else x2
    o2, s2 = out.view(-1, N), (total.view(-1, N) if total is not None else out.view(-1, N))
    block = triton.next_power_of_2(N)
    _rms_norm[(rows,)](
        x2, r2, weight.contiguous(), o2, s2, N, float(eps),
        x2.stride(0), r2.stride(0), o2.stride(0), s2.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_num_warps(block),
    )
    return out, total


def silu_mul_triton(x: torch.Tensor) -> torch.Tensor:
    I = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], I), dtype=x.dtype, device=x.device)
    x2 = _rows(x)
    rows = x2.shape[0]
    if rows == 0 or I == 0:
        return out
    o2 = out.view(-1, I)
    block = min(triton.next_power_of_2(I), 1024)
    _silu_mul[(rows, triton.cdiv(I, block))](x2, o2, I, x2.stride(0), o2.stride(0), BLOCK=block,
                                             num_warps=_num_warps(block))
    return out
