"""``fuse_add_rms_norm`` (stage post_load_fusion): residual add + RMSNorm -> one op.

Matches ``rms_norm(add(a, b), w, eps)`` where ``a`` and ``b`` have one shape and dtype (no
broadcast, no alpha) and rewrites it to ``autodeploy::fused_add_rms_norm(x, residual, w, eps)``:
output 0 replaces the norm, output 1 (the sum) every other user of the add (the next residual).
``x`` is the operand computed later in the graph (the attention/MLP output, or under TP the
all-reduce of it), ``residual`` the earlier one (the residual stream): the op boundary where a
later transform can fold the all-reduce in (see ``custom_ops/add_rms_norm.py``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

import autodeploy.custom_ops.add_rms_norm  # noqa: F401  registers torch.ops.autodeploy.fused_add_rms_norm

from ..interface import BaseTransform, BuildContext, TransformConfig, TransformInfo, register
from ..patterns.nodes import GraphEditor, is_op, node_order, same_shape, val

aten = torch.ops.aten


def _fusable_add(node) -> bool:
    if not is_op(node, aten.add.Tensor) or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return False
    a, b, out = val(node.args[0]), val(node.args[1]), val(node)
    tensors = [a, b, out]
    return (all(isinstance(t, torch.Tensor) for t in tensors) and a.dtype == b.dtype == out.dtype
            and same_shape(a.shape, b.shape) and same_shape(a.shape, out.shape))


@dataclass
class FuseAddRmsNormConfig(TransformConfig):
    stage: str = "post_load_fusion"
    requires_shape_prop: bool = True


@register("fuse_add_rms_norm")
class FuseAddRmsNorm(BaseTransform):
    config_class = FuseAddRmsNormConfig
    graph_only = True

    def apply(self, gm, ctx: BuildContext):
        rms_norm, fused_op = torch.ops.autodeploy.rms_norm.default, torch.ops.autodeploy.fused_add_rms_norm.default
        editor = GraphEditor(gm)
        matches = 0
        for norm in [n for n in gm.graph.nodes if is_op(n, rms_norm)]:
            add, weight = norm.args[0], norm.args[1]
            if not _fusable_add(add):
                continue
            order = node_order(gm.graph)  # earlier rewrites added nodes
            # the fused op goes after the add and the weight (Gemma computes 1 + w late), and
            # every other user of the sum must still come after it
            anchor = max(add, weight, key=lambda n: order.get(n, -1))
            if any(order[u] < order[anchor] for u in add.users if u is not norm):
                continue
            residual, x = sorted(add.args[:2], key=lambda n: order[n])  # x: the later, freshly computed one
            with gm.graph.inserting_after(anchor):
                fused = editor.call(fused_op, x, residual, weight, norm.args[2])
            with gm.graph.inserting_after(fused):
                total = editor.call(operator.getitem, fused, 1)
            with gm.graph.inserting_after(fused):
                normed = editor.call(operator.getitem, fused, 0)
            editor.replace(norm, normed)
            add.replace_all_uses_with(total)
            editor.erase_unused([norm, add])
            matches += 1
        return gm, TransformInfo(num_matches=matches, is_clean=False, has_valid_shapes=editor.shapes_valid)
