"""``autodeploy::rms_norm``: RMSNorm over the last dim, HF (Llama) math.

Normalizes in fp32, casts back to the input dtype, then multiplies by the weight, so bf16 results
round exactly where HF's ``LlamaRMSNorm`` rounds. On CUDA the op runs one Triton kernel
(``fused_kernels.py``) where no compiler sees it; ``torch-compile`` / ``torch-opt`` get
``rms_norm_reference`` instead (``compile/inline.py``), so inductor fuses it with its neighbours.
"""

import torch
import torch.nn.functional as F


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    normed = (x32 * torch.rsqrt(variance + eps)).to(x.dtype)
    return weight * normed


def rms_norm_host(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``rms_norm_reference``'s values with fewer kernels, for the host's torch-simple graphs
    (``compile/inline.py``). In float32 one call: ATen's CPU ``rms_norm`` runs the same ops in C++,
    bitwise equal (tests/compile/test_inline_for_inductor.py checks it); it would round a half
    type's product with the weight differently, so those keep the ops, the variance's in place."""
    if x.dtype == weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    x32 = x.to(torch.float32)
    normed = (x32 * x32.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()).to(x.dtype)
    return weight * normed


@torch.library.custom_op("autodeploy::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_reference(x, weight, eps)


@rms_norm.register_kernel("cuda")
def _rms_norm_cuda(x, weight, eps):
    from .fused_kernels import rms_norm_triton

    return rms_norm_triton(x, weight, eps)[0]


@rms_norm.register_fake
def _rms_norm_fake(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
