"""``autodeploy::rms_norm``: RMSNorm over the last dim, HF (Llama) math.

Normalizes in fp32, casts back to the input dtype, then multiplies by the weight, so bf16 results
round exactly where HF's ``LlamaRMSNorm`` rounds. On CUDA the op runs one Triton kernel
(``fused_kernels.py``) where no compiler sees it; ``torch-compile`` / ``torch-opt`` get
``rms_norm_reference`` instead (``compile/inline.py``), so inductor fuses it with its neighbours.
"""

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    normed = (x32 * torch.rsqrt(variance + eps)).to(x.dtype)
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
