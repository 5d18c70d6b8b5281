"""Post-export cleanup: drop runtime assertions and ops that do nothing.

Export leaves ``_assert_tensor_metadata``/``_assert_scalar`` checks and value-preserving ops (casts
to the dtype a tensor already has, ``alias``, full slices, same-shape views, inference dropout)
between the ops the matchers look for. Removing them first keeps the matchers short.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ..interface import BaseTransform, BuildContext, TransformConfig, TransformInfo, register
from ..patterns.nodes import SLICE_TO_END, arg, is_op, same_shape, schema_arg, static_size, val

aten = torch.ops.aten

ASSERTION_OPS = (
    aten._assert_tensor_metadata.default,
    aten._assert_scalar.default,
    aten._assert_async.default,
    aten._assert_async.msg,
    aten.sym_constrain_range.default,
    aten.sym_constrain_range_for_size.default,
)


def remove_assertions(gm: fx.GraphModule) -> int:
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and is_op(node, ASSERTION_OPS) and not node.users:
            gm.graph.erase_node(node)
            removed += 1
    return removed


def _is_noop_cast(node: fx.Node) -> bool:
    # `to` without copy=True returns its input itself when nothing changes, so dropping it keeps
    # aliasing (and in-place ops after it) exactly as they were; `_to_copy` always copies: kept
    if not is_op(node, (aten.to.dtype, aten.to.dtype_layout, aten.to.device)) or schema_arg(node, "copy", False):
        return False
    src, out = val(node.args[0]), val(node)
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
        return False
    return src.dtype == out.dtype and src.device == out.device and src.layout == out.layout


def _is_full_slice(node: fx.Node) -> bool:
    if not is_op(node, aten.slice.Tensor):
        return False
    start, end, step = arg(node, 2, "start", None), arg(node, 3, "end", None), arg(node, 4, "step", 1)
    if start not in (None, 0) or step != 1:
        return False
    src = val(node.args[0])
    if not isinstance(src, torch.Tensor):
        return False
    dim = arg(node, 1, "dim", 0)
    size = static_size(src.shape[dim])
    if end is None or (isinstance(end, int) and (end >= SLICE_TO_END or (size is not None and end >= size))):
        return True
    return isinstance(end, fx.Node) and same_shape([val(end)], [src.shape[dim]])


def _is_same_shape_view(node: fx.Node) -> bool:
    if not is_op(node, (aten.view.default, aten.reshape.default, aten._unsafe_view.default)):
        return False
    src, out = val(node.args[0]), val(node)
    return isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and same_shape(src.shape, out.shape)


def _is_inference_dropout(node: fx.Node) -> bool:
    if not is_op(node, aten.dropout.default):
        return False
    return arg(node, 2, "train", True) is False or arg(node, 1, "p", 1.0) == 0.0


def _is_noop(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if is_op(node, (aten.alias.default, aten.detach.default)):
        return True
    return _is_noop_cast(node) or _is_full_slice(node) or _is_same_shape_view(node) or _is_inference_dropout(node)


def remove_noop_ops(gm: fx.GraphModule) -> int:
    """Replace every value-preserving op by its input; returns how many were removed."""
    removed = 0
    for node in list(gm.graph.nodes):
        if _is_noop(node):
            src = node.args[0]
            # keep the output node's own values (a graph output must not become a graph input alias)
            if any(user.op == "output" for user in node.users) and getattr(src, "op", None) == "placeholder":
                continue
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            removed += 1
    return removed


@dataclass
class CleanupAssertionsConfig(TransformConfig):
    stage: str = "post_export"


@register("cleanup_assertions")
class CleanupAssertions(BaseTransform):
    """Drop export's runtime assertions (tensor-metadata, scalar and range checks)."""

    config_class = CleanupAssertionsConfig
    graph_only = True

    def apply(self, model, ctx: BuildContext):
        removed = remove_assertions(model)
        return model, TransformInfo(num_matches=removed, is_clean=False, has_valid_shapes=True)


@dataclass
class CleanupNoopOpsConfig(TransformConfig):
    stage: str = "post_export"


@register("cleanup_noop_ops")
class CleanupNoopOps(BaseTransform):
    """Remove no-op casts, ``alias``/``detach``, full slices, same-shape views and inference dropout."""

    config_class = CleanupNoopOpsConfig
    graph_only = True

    def apply(self, model, ctx: BuildContext):
        removed = remove_noop_ops(model)
        return model, TransformInfo(num_matches=removed, is_clean=False, has_valid_shapes=True)
