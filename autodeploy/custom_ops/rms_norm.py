"""``autodeploy::rms_norm``: RMSNorm over the last dim, HF (Llama) math.

Normalizes in fp32, casts back to the input dtype, then multiplies by the weight, so bf16 results
round exactly where HF's ``LlamaRMSNorm`` rounds.
"""

import torch


@torch.library.custom_op("autodeploy::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    normed = (x32 * torch.rsqrt(variance + eps)).to(x.dtype)
    return weight * normed


@rms_norm.register_fake
def _rms_norm_fake(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
