"""List indices (``x[..., [-2]]``) keep their values when the export runs on ``meta``.

Indexing with a Python list makes torch build an index tensor on the indexed tensor's device, and
torch.export lifts it into a tensor constant of the GraphModule (``lifted_tensor_0``; Falcon's
multi-query K/V split ``qkv[..., [-2], :]``). Exported on meta that constant has no value, so
nothing can load it. During export, a list of ints/bools that indexes a meta tensor becomes a CPU
tensor first: the lifted constant keeps its value (CPU indices work for tensors on any device)
and weight loading moves it to the model's device like any other constant.
"""

from __future__ import annotations

import contextlib

import torch

from . import register_patch


def _is_literal_list(index) -> bool:
    if not isinstance(index, list) or not index:
        return False
    return all(_is_literal_list(v) if isinstance(v, list) else type(v) in (int, bool) for v in index)


def _with_cpu_lists(index):
    if _is_literal_list(index):
        return torch.tensor(index, device="cpu")
    if isinstance(index, tuple):
        return tuple(torch.tensor(i, device="cpu") if _is_literal_list(i) else i for i in index)
    return index


@register_patch("list_index_literals")
@contextlib.contextmanager
def list_index_literals(model):
    had_own = "__getitem__" in torch.Tensor.__dict__
    original = torch.Tensor.__getitem__

    def getitem(self, index):
        if self.device.type == "meta":
            index = _with_cpu_lists(index)
        return original(self, index)

    torch.Tensor.__getitem__ = getitem
    try:
        yield
    finally:
        if had_own:
            torch.Tensor.__getitem__ = original
        else:
            del torch.Tensor.__getitem__
