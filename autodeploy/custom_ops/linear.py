"""``autodeploy::linear``: ``F.linear`` that takes the Triton GEMV for a single 16-bit token on CUDA.

A decode step of batch 1 multiplies one row by every weight of the model; cuBLAS reads the small
projections of an 8B model well below the copy bandwidth there, the GEMV of ``gemv.py`` closer
to it (scripts/gemm_check.py --gemv; docs/performance-history.md). Any other input (more rows, fp32,
the CPU) runs ``F.linear``. The ``one_token_gemv`` transform puts this op in place of the graph's
linears; the choice is made per call, so one graph serves prefill and decode (each CUDA graph
keeps the kernel its batch size chose at capture).
"""

from typing import Optional

import torch
import torch.nn.functional as F

GEMV_DTYPES = (torch.bfloat16, torch.float16)


def takes_gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    return (x.is_cuda and x.numel() == x.shape[-1] and x.dtype in GEMV_DTYPES and weight.dtype == x.dtype
            and weight.dim() == 2 and weight.stride(-1) == 1 and (bias is None or bias.dtype == x.dtype))


def linear_for_inductor(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The op as the compiler should see it (``compile/inline.py``): ``F.linear`` where the
    traced step is known to bring more than one token (``compiles=two``: every graph but the
    one-token one), the op otherwise, which chooses per call. Inductor then calls its GEMM
    directly instead of the op's Python dispatch (129 calls per 8B forward: a prefill's launches
    barely kept ahead of the GPU)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if statically_known_true(x.numel() != x.shape[-1]):
        return F.linear(x, weight, bias)
    return torch.ops.autodeploy.linear.default(x, weight, bias)


@torch.library.custom_op("autodeploy::linear", mutates_args=())
def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


@linear.register_kernel("cuda")
def _linear_cuda(x, weight, bias=None):
    if takes_gemv(x, weight, bias):
        from .gemv import gemv

        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)


@linear.register_fake
def _linear_fake(x, weight, bias=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
