"""``F.scaled_dot_product_attention`` traced as one opaque op (``autodeploy::sdpa``) during export.

With a CUDA build of torch (seen with torch 2.11 on an H100), tracing SDPA runs the fused
kernels' meta functions, whose stride checks add guards on ``seq`` (``min(16*seq, 32*seq) ==
16*seq``) that break the dynamic sequence dimension: export fails. Behind an op with a plain fake
kernel there are no such guards. The op computes exactly what SDPA computes, so an attention the
matcher leaves alone still runs correctly; the matcher treats it as SDPA.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

from . import register_patch


@torch.library.custom_op("autodeploy::sdpa", mutates_args=())
def sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False,
) -> torch.Tensor:
    kwargs = {"enable_gqa": True} if enable_gqa else {}
    return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)


@sdpa.register_fake
def _(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def _sdpa_call(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return torch.ops.autodeploy.sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


@register_patch("sdpa_as_op")
@contextlib.contextmanager
def sdpa_as_op(model):
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _sdpa_call
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
