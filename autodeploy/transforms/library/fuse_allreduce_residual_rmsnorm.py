"""``fuse_allreduce_residual_rmsnorm`` (stage post_load_fusion, after ``fuse_add_rms_norm``):
all-reduce -> residual add + RMSNorm -> one op.

Matches ``fused_add_rms_norm(all_reduce(y, group), residual, w, eps)`` (the all-reduce in either
operand: the add is commutative, bit for bit; reshapes between it and the add, as after an MoE, go
before it) and rewrites it to ``autodeploy::all_reduce_add_rms_norm(y, residual, w, eps, group)``
(``distributed/all_reduce_norm.py``), only where that is exact: the all-reduce (and each reshape)
has no other user, ``y`` and ``residual`` have one dtype, and the group has more than one rank. On GPUs it then sets up the op's one kernel over
symmetric memory for messages up to ``max_bytes`` (collective: every rank runs this transform alike).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...distributed.all_reduce_norm import enable_one_kernel
from ...distributed.collectives import group_ranks
from ..interface import BaseTransform, BuildContext, TransformConfig, TransformInfo, register
from ..patterns.nodes import GraphEditor, is_op, val

aten = torch.ops.aten


@dataclass
class FuseAllReduceResidualRmsNormConfig(TransformConfig):
    stage: str = "post_load_fusion"
    requires_shape_prop: bool = True
    # GPUs: all-reduces of up to this many bytes (decode steps) run as one kernel over symmetric
    # memory, larger ones (prefill) as the all-reduce then the add+norm; 0: never the one kernel
    max_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if self.max_bytes < 0:
            raise ValueError(f"args.transforms.fuse_allreduce_residual_rmsnorm.max_bytes={self.max_bytes} must be >= 0")


VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _lone_all_reduce(node, user):
    """``(all_reduce, views)`` when ``node`` is an all-reduce, or a chain of reshapes of one (an MoE's
    flat output), that only ``user`` reads; else None. The views go before the all-reduce: it sums
    element by element, so reshaping first changes nothing."""
    views = []
    while is_op(node, VIEWS) and list(node.users) == [user]:
        views.append(node)
        user, node = node, node.args[0]
    if is_op(node, torch.ops.autodeploy.all_reduce.default) and list(node.users) == [user]:
        return node, views[::-1]
    return None


@register("fuse_allreduce_residual_rmsnorm")
class FuseAllReduceResidualRmsNorm(BaseTransform):
    config_class = FuseAllReduceResidualRmsNormConfig
    graph_only = True

    def apply(self, gm, ctx: BuildContext):
        ops = torch.ops.autodeploy
        editor = GraphEditor(gm)
        groups, hidden, dtype, matches = set(), None, None, 0
        for norm in [n for n in gm.graph.nodes if is_op(n, ops.fused_add_rms_norm.default)]:
            x, residual, weight, eps = norm.args
            if x is residual:
                continue
            found, other = _lone_all_reduce(x, norm), residual
            if found is None:
                found, other = _lone_all_reduce(residual, norm), x
            if found is None:
                continue
            reduced, views = found
            y, group = reduced.args
            vy, vo = val(y), val(other)
            if (len(group_ranks(group)) < 2 or not isinstance(vy, torch.Tensor) or not isinstance(vo, torch.Tensor)
                    or vy.dtype != vo.dtype or vy.numel() != vo.numel()):
                continue
            with gm.graph.inserting_before(norm):
                for view in views:
                    y = editor.call(view.target, y, *view.args[1:])
                fused = editor.call(ops.all_reduce_add_rms_norm.default, y, other, weight, eps, group)
            editor.replace(norm, fused)  # its getitem users read (normed, sum) as before
            editor.erase_unused([norm, *views, reduced])
            groups.add(group)
            hidden, dtype = vo.shape[-1], vo.dtype  # the residual stream's rows
            matches += 1
        note = ""
        if groups:
            one_kernel = enable_one_kernel(groups, torch.device(ctx.device), self.config.max_bytes, int(hidden), dtype)
            note = (f"one kernel over symmetric memory up to {self.config.max_bytes} bytes, ranks {', '.join(one_kernel)}"
                    if one_kernel else "the all-reduce, then the add+norm (one kernel: CUDA, see the log)")
        return gm, TransformInfo(num_matches=matches, is_clean=False, has_valid_shapes=editor.shapes_valid, note=note)
