"""``autodeploy::silu_mul``: SwiGLU's ``silu(gate) * up`` on the fused gate/up GEMM output.

``x[..., 2I] -> silu(x[..., :I]) * x[..., I:]`` (``[..., I]``): the op reads both halves of the
concatenated projection in place, so the split views are never copied. HF math and rounding (the
activation is rounded to the dtype before the product). On CUDA one Triton kernel
(``fused_kernels.py``) where no compiler sees it; inductor gets ``silu_mul_reference``.
"""

import torch
import torch.nn.functional as F


def silu_mul_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def _check(x: torch.Tensor) -> None:
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"autodeploy::silu_mul expects an even last dim (gate and up halves), got {tuple(x.shape)}")


@torch.library.custom_op("autodeploy::silu_mul", mutates_args=())
def silu_mul(x: torch.Tensor) -> torch.Tensor:
    _check(x)
    return silu_mul_reference(x)


@silu_mul.register_kernel("cuda")
def _silu_mul_cuda(x):
    from .fused_kernels import silu_mul_triton

    _check(x)
    return silu_mul_triton(x)


@silu_mul.register_fake
def _silu_mul_fake(x):
    _check(x)
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))
