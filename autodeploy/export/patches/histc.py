"""``torch.histc`` on float input, whatever device the export runs on.

transformers' grouped_mm MoE counts tokens per expert with ``histc``, on float ids on CPU and on
int ids elsewhere (CPU has no int kernel). Exported on ``meta``, the graph would take the int
branch and fail once the weights are loaded on CPU. Float ids (exact below 2**24) run on every
device, so during export integer inputs are cast to float32 first.
"""

from __future__ import annotations

import contextlib

import torch

from . import register_patch

_original_histc = torch.histc


def _histc_float(input: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if not input.is_floating_point():
        input = input.to(torch.float32)
    return _original_histc(input, *args, **kwargs)


@register_patch("histc_float_input")
@contextlib.contextmanager
def histc_float_input(model):
    torch.histc = _histc_float
    try:
        yield
    finally:
        torch.histc = _original_histc
