"""Cancel back-to-back transposes/permutes whose composition is the identity.

The attention and RoPE matchers wrap their bsnd ops in ``transpose(1, 2)`` so the surrounding
bnsd HF code stays valid; the wrappers meet HF's own ``transpose(1, 2)`` around q/k/v and the
attention output, and each such pair is removed here. Same-shape views and reshapes between the
two (HF's no-op ``reshape`` after SDPA) are looked through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import fx

from ..interface import BaseTransform, BuildContext, TransformConfig, TransformInfo, register
from ..patterns.nodes import is_op, ndim, norm_dim, same_shape, val

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def permutation(node: fx.Node) -> Optional[list[int]]:
    """The dim permutation a transpose/permute node applies, or None."""
    rank = ndim(node)
    if rank is None:
        return None
    if is_op(node, aten.transpose.int):
        a, b = norm_dim(node.args[1], rank), norm_dim(node.args[2], rank)
        perm = list(range(rank))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    if is_op(node, aten.permute.default):
        return [norm_dim(d, rank) for d in node.args[1]]
    return None


def _through_noop_views(node: fx.Node) -> fx.Node:
    while is_op(node, _VIEWS):
        src, out = val(node.args[0]), val(node)
        if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor) or not same_shape(src.shape, out.shape):
            break
        node = node.args[0]
    return node


def eliminate_transpose_pairs(gm: fx.GraphModule) -> int:
    removed = 0
    for node in list(gm.graph.nodes):
        outer = permutation(node) if node.op == "call_function" else None
        if outer is None:
            continue
        inner_node = _through_noop_views(node.args[0])
        inner = permutation(inner_node) if isinstance(inner_node, fx.Node) else None
        if inner is None or len(inner) != len(outer):
            continue
        # out[i] = in[inner[outer[i]]]
        if [inner[i] for i in outer] == list(range(len(outer))):
            node.replace_all_uses_with(inner_node.args[0])
            removed += 1
    return removed


@dataclass
class EliminateTransposesConfig(TransformConfig):
    stage: str = "pattern_matcher"
    requires_shape_prop: bool = True


@register("eliminate_redundant_transposes")
class EliminateRedundantTransposes(BaseTransform):
    """Remove transpose/permute pairs that cancel (bsnd op wrappers against HF's bnsd transposes)."""

    config_class = EliminateTransposesConfig
    graph_only = True

    def apply(self, model, ctx: BuildContext):
        removed = eliminate_transpose_pairs(model)
        return model, TransformInfo(num_matches=removed, is_clean=False, has_valid_shapes=True)
