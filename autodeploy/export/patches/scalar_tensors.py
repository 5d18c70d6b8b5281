"""Scalar ``torch.tensor(literal)`` exported as a ``full`` op, not as a lifted tensor constant.

HF code sometimes builds a scalar with ``torch.tensor(0.0, device=..., dtype=...)`` (transformers
5.17's eager attention mask: ``torch.where(mask, torch.tensor(0.0, ...), min)``). torch.export
lifts such a tensor into a constant attribute of the GraphModule (``model.lifted_tensor_0``).
Exported on ``meta`` that constant has no value: the mask probe cannot evaluate the mask and
weight loading has nothing to load for it. As ``torch.full((), literal)`` the value stays in the
graph as an op argument (its ``device=meta`` is re-pointed at load like every other literal).
Only Python bool/int/float data on ``meta`` is rewritten (the dtype is what ``torch.tensor``
would pick); elsewhere the constant keeps its value, and code that reads it back (``.item()``)
keeps working as before.
"""

from __future__ import annotations

import contextlib

import torch

from . import register_patch

_original_tensor = torch.tensor


def _target_device(device) -> torch.device:
    try:
        return torch.device(device) if device is not None else torch.get_default_device()
    except (RuntimeError, TypeError):
        return torch.device("cpu")  # let torch.tensor report a bad device itself


def _tensor(data, *args, dtype=None, device=None, requires_grad=False, pin_memory=False, **kwargs):
    if (args or kwargs or requires_grad or pin_memory or not isinstance(data, (bool, int, float))
            or _target_device(device).type != "meta"):
        return _original_tensor(data, *args, dtype=dtype, device=device, requires_grad=requires_grad,
                                pin_memory=pin_memory, **kwargs)
    if dtype is None:  # torch.tensor's inference: bool, int64 or the default float dtype
        dtype = torch.bool if isinstance(data, bool) else torch.int64 if isinstance(data, int) else torch.get_default_dtype()
    return torch.full((), data, dtype=dtype, device=device)


@register_patch("scalar_tensor_literals")
@contextlib.contextmanager
def scalar_tensor_literals(model):
    torch.tensor = _tensor
    try:
        yield
    finally:
        torch.tensor = _original_tensor
