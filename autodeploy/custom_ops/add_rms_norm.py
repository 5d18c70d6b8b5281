"""``autodeploy::fused_add_rms_norm``: the residual add and the RMSNorm that reads its sum, one op.

``(x, residual, weight, eps) -> (rms_norm(x + residual, weight, eps), x + residual)``. The sum is
rounded to the inputs' dtype before the norm reads it, as HF's ``residual + hidden_states`` then
``norm(...)`` rounds, so the outputs equal the two eager ops exactly on the CPU.

Op boundary for tensor parallelism: ``x`` is the branch output that was just computed (attention
or MLP output), ``residual`` the running residual stream. Under TP, ``x`` is the output of an
``autodeploy::all_reduce``, so a later transform can fold the all-reduce into this op as well
(all-reduce + add + norm in one kernel) by matching ``fused_add_rms_norm(all_reduce(y), ...)``.

On CUDA the op runs one Triton kernel (``fused_kernels.py``) where no compiler sees it (eager,
``torch-cudagraph``); ``torch-compile`` / ``torch-opt`` get the reference math instead
(``compile/inline.py``) so inductor fuses it with its neighbours.
"""

import torch

from .rms_norm import rms_norm_host, rms_norm_reference


def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    total = x + residual
    return rms_norm_reference(total, weight, eps), total


def fused_add_rms_norm_host(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's values with fewer kernels (``rms_norm_host``), for the host's graphs."""
    total = x + residual
    return rms_norm_host(total, weight, eps), total


def _check(x: torch.Tensor, residual: torch.Tensor) -> None:
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(
            "autodeploy::fused_add_rms_norm expects x and residual of one shape and dtype, got "
            f"{tuple(x.shape)} {x.dtype} and {tuple(residual.shape)} {residual.dtype}"
        )


@torch.library.custom_op("autodeploy::fused_add_rms_norm", mutates_args=())
def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, residual)
    return fused_add_rms_norm_reference(x, residual, weight, eps)


@fused_add_rms_norm.register_kernel("cuda")
def _fused_add_rms_norm_cuda(x, residual, weight, eps):
    from .fused_kernels import rms_norm_triton

    _check(x, residual)
    return rms_norm_triton(x, weight, eps, residual=residual)


@fused_add_rms_norm.register_fake
def _fused_add_rms_norm_fake(x, residual, weight, eps):
    _check(x, residual)
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)), torch.empty_like(x)
