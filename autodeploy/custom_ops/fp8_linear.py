"""FP8 (e4m3) weights: quantize/dequantize numerics and ``autodeploy::fp8_linear``.

A weight ``W[N, K]`` is stored as ``q`` (``torch.float8_e4m3fn``) and a float32 ``scale`` that
multiplies it back, ``W ~ q * scale`` (HF's ``weight_scale_inv`` and ModelOpt's ``weight_scale``
mean the same). Two scale layouts reach the op (``models/quantized.py`` brings every checkpoint's
to one of them at load):
- per channel: ``scale[N]`` (a per-tensor scale is expanded to it);
- blocks: ``scale[ceil(N / bn), ceil(K / bk)]`` with ``block_size = [bn, bk]`` (HF's 128x128).
Leading dims (MoE experts, ``[E, N, K]``) carry through every function here.

``fp8_linear(x, weight, weight_scale, input_scale=None, bias=None, block_size=None)`` means
``F.linear(x, dequantize(weight, weight_scale), bias)``: that is its reference implementation (the
CPU, and any input the kernels do not take), the dequantized weights cast to ``x``'s dtype as an HF
model with dequantized weights holds them. On CUDA the kernels approximate it:
- up to ``SMALL_M`` rows (decode): the Triton kernels of ``fp8_kernels.py`` stream the FP8 weights
  and multiply them with the 16-bit activations (no activation rounding): decode is bound by the
  weight bytes, which FP8 halves;
- more rows (prefill) with per-channel scales: ``torch._scaled_mm`` (cuBLASLt) on FP8 activations,
  quantized per token (dynamic) or with the checkpoint's static ``input_scale``; the activations'
  rounding is the difference to the reference (relative error of a few 1e-2 per element, averaged
  over K in the dot products);
- more rows with block scales: the Triton kernel as well (bf16 tensor-core math on dequantized tiles).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
_MIN_SCALE = 1e-12  # an all-zero row or tensor keeps a finite scale
# at most this many rows take the Triton kernels on CUDA (decode batches); more go to _scaled_mm
SMALL_M = 64


def _to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # torch's cast does not saturate (out of range becomes NaN): clamp first
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _scale_of(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448 in fp32, as an IEEE division on every device (a CUDA tensor divided by a Python number
    is multiplied by its reciprocal instead, one ulp off at times): the Triton quantizer divides the same way."""
    amax = amax.float().clamp(min=_MIN_SCALE)
    return amax / torch.full_like(amax, FP8_MAX)


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w[..., N, K]`` -> (``q``, ``scale[..., N]``): one scale per output row, amax / 448."""
    scale = _scale_of(w.abs().amax(dim=-1))
    return _to_fp8(w, scale.unsqueeze(-1)), scale


def quantize_per_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` -> (``q``, a 0-dim ``scale``)."""
    scale = _scale_of(w.abs().amax())
    return _to_fp8(w, scale), scale


def _pad_to_blocks(w: torch.Tensor, block_size: Sequence[int]) -> torch.Tensor:
    bn, bk = block_size
    n, k = w.shape[-2:]
    return F.pad(w, (0, -k % bk, 0, -n % bn))


def quantize_blocks(w: torch.Tensor, block_size: Sequence[int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """``w[..., N, K]`` -> (``q``, ``scale[..., ceil(N/bn), ceil(K/bk)]``): one scale per block."""
    bn, bk = block_size
    n, k = w.shape[-2:]
    padded = _pad_to_blocks(w.float(), block_size)
    blocks = padded.unflatten(-1, (-1, bk)).unflatten(-3, (-1, bn))  # [..., N/bn, bn, K/bk, bk]
    scale = _scale_of(blocks.abs().amax(dim=(-3, -1)))
    q = _to_fp8(blocks, scale[..., :, None, :, None]).flatten(-2).flatten(-3, -2)
    return q[..., :n, :k].contiguous(), scale


def expand_block_scale(scale: torch.Tensor, shape: Sequence[int], block_size: Sequence[int]) -> torch.Tensor:
    """Block scales repeated to the weight's ``[..., N, K]``."""
    bn, bk = block_size
    n, k = shape[-2:]
    return scale.repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]


def dequantize(q: torch.Tensor, scale: torch.Tensor, block_size: Optional[Sequence[int]] = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale`` in float32, then cast to ``dtype``. ``scale``: one value, per channel
    ``[..., N]``, or blocks ``[..., N/bn, K/bk]`` with ``block_size``."""
    w = q.float()
    scale = scale.float()
    if block_size is not None:
        w = w * expand_block_scale(scale, w.shape, block_size)
    elif scale.numel() == 1:
        w = w * scale.reshape(())
    else:
        w = w * scale.reshape(*w.shape[:-1], 1)
    return w.to(dtype)


def quantize_rows(x: torch.Tensor, input_scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations ``x[M, K]`` -> (``q[M, K]``, ``scale[M, 1]``): per row (token), amax / 448, or
    the one static ``input_scale`` for every row."""
    if input_scale is not None:
        scale = input_scale.float().reshape(1, 1).expand(x.shape[0], 1).contiguous()
    else:
        scale = _scale_of(x.abs().amax(dim=-1, keepdim=True))
    return _to_fp8(x, scale), scale


def check_scale(weight: torch.Tensor, weight_scale: torch.Tensor, block_size: Optional[Sequence[int]]) -> None:
    """The op's contract on shapes (a clear error at build or trace time, not a kernel fault)."""
    if weight.dtype != FP8:
        raise ValueError(f"fp8 weights must be {FP8}, got {weight.dtype}")
    n, k = weight.shape[-2:]
    lead = list(weight.shape[:-2])
    if block_size is not None:
        bn, bk = block_size
        want = lead + [-(-n // bn), -(-k // bk)]
    else:
        want = lead + [n]
    if list(weight_scale.shape) != want:
        kind = f"blocks of {list(block_size)}" if block_size is not None else "per channel"
        raise ValueError(f"fp8 weight {list(weight.shape)} with scales {kind} needs weight_scale {want}, "
                         f"got {list(weight_scale.shape)}")


def scaled_mm_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     input_scale: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-channel weights through ``torch._scaled_mm`` with row-wise scales: activations rounded
    to FP8 per token (or with ``input_scale``), bf16 out. cuBLASLt on CUDA; torch runs it on the
    CPU too (the tests compare it with the reference there)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.is_cuda and input_scale is None:
        from .fp8_kernels import quantize_rows as quantize_rows_triton

        xq, xs = quantize_rows_triton(x2)
    else:
        xq, xs = quantize_rows(x2, input_scale)
    out = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=weight_scale.float().reshape(1, -1),
                           out_dtype=torch.bfloat16)
    if bias is not None:
        out = out + bias
    return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


def takes_scaled_mm(x: torch.Tensor, weight: torch.Tensor, block_size) -> bool:
    # cuBLASLt's FP8 GEMM: K and N multiples of 16, bf16 out for row-wise scales
    n, k = weight.shape
    return block_size is None and x.dtype == torch.bfloat16 and k % 16 == 0 and n % 16 == 0


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               input_scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
               block_size: Optional[Sequence[int]] = None) -> torch.Tensor:
    """The op's math, choosing the kernel (module docstring); also the MoE op's expert GEMMs."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.numel() > 0:
        rows = x.numel() // x.shape[-1]
        if rows > SMALL_M and takes_scaled_mm(x, weight, block_size):
            return scaled_mm_linear(x, weight, weight_scale, input_scale, bias)
        from .fp8_kernels import fp8_mm

        return fp8_mm(x, weight, weight_scale, bias, block_size)
    return F.linear(x, dequantize(weight, weight_scale, block_size, dtype=x.dtype), bias)


@torch.library.custom_op("autodeploy::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               input_scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
               block_size: Optional[List[int]] = None) -> torch.Tensor:
    return F.linear(x, dequantize(weight, weight_scale, block_size, dtype=x.dtype), bias)


@fp8_linear.register_kernel("cuda")
def _fp8_linear_cuda(x, weight, weight_scale, input_scale=None, bias=None, block_size=None):
    return fp8_matmul(x, weight, weight_scale, input_scale, bias, block_size)


@fp8_linear.register_fake
def _fp8_linear_fake(x, weight, weight_scale, input_scale=None, bias=None, block_size=None):
    check_scale(weight, weight_scale, block_size)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
