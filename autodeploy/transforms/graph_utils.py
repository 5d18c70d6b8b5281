"""Small helpers shared by graph transforms: cleanup, shape propagation, node queries."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import fx


def is_op(node: fx.Node, ops: "object | Iterable[object]") -> bool:
    """True if ``node`` calls one of ``ops`` (an OpOverload, an OpOverloadPacket or a callable)."""
    if node.op != "call_function":
        return False
    if not isinstance(ops, (list, tuple, set)):
        ops = (ops,)
    target = node.target
    for op in ops:
        if target is op:
            return True
        if isinstance(op, torch._ops.OpOverloadPacket) and getattr(target, "overloadpacket", None) is op:
            return True
    return False


def canonicalize_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """Remove dead code and recompile; cheap and idempotent."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def get_attr_value(gm: fx.GraphModule, target: str) -> object:
    """What a ``get_attr`` node reads: a dotted path (export lifts tensor constants into the
    submodule that made them, e.g. ``model.lifted_tensor_0``)."""
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def placeholder_values(gm: fx.GraphModule) -> list[object]:
    return [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]


def run_shape_prop(gm: fx.GraphModule) -> fx.GraphModule:
    """Recompute ``meta["val"]`` of every node with fake tensors, keeping symbolic input shapes.

    Placeholders keep the fake values that export gave them (symbolic batch/seq dims); params and
    buffers (``get_attr``) are converted to fakes of the same shape, so this works on meta too.
    Composite ops (``linear``, ``matmul``, ...) decompose through the Python dispatcher, as in
    export: torch 2.11's C++ ``matmul`` calls ``numel()`` on a symbolic ``[B, S, H]`` input
    ("Cannot call numel() on tensor with symbolic sizes/strides") or, when the weight requires
    grad, specializes B and S.
    """
    from torch._dispatch.python import enable_python_dispatcher
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    inputs = placeholder_values(gm)
    if any(v is None for v in inputs):
        missing = [n.name for n in gm.graph.nodes if n.op == "placeholder" and "val" not in n.meta]
        raise RuntimeError(f"shape propagation needs meta['val'] on every input; missing: {missing}")
    fake_mode = detect_fake_mode(inputs) or FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode, enable_python_dispatcher():
        FakeTensorProp(gm, mode=fake_mode).propagate_dont_convert_inputs(*inputs)
    return gm
