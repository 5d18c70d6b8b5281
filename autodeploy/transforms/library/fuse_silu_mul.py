"""``fuse_silu_mul`` (stage post_load_fusion): SwiGLU's ``silu(gate) * up`` -> ``autodeploy::silu_mul``.

Runs after ``fuse_parallel_linears``: matches ``mul(silu(part_i), part_{i+1})`` where both parts
are equal-sized neighbours of one last-dim ``split_with_sizes`` of the fused gate/up GEMM (or of a
checkpoint's own ``gate_up_proj`` output cut with ``chunk(2)``), so the op reads the contiguous
``[gate | up]`` columns in place (a ``slice`` of them when the split has other parts). Models
whose gate and up were not fused are left as they are.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

import autodeploy.custom_ops.silu_mul  # noqa: F401  registers torch.ops.autodeploy.silu_mul

from ..interface import BaseTransform, BuildContext, TransformConfig, TransformInfo, register
from ..patterns.nodes import GraphEditor, commutative_operands, is_op, static_size

aten = torch.ops.aten


def _split_part(node):
    """(source, sizes, index) if ``node`` is part ``index`` of a last-dim ``split_with_sizes`` or
    two-way ``chunk`` of ``source``."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is operator.getitem):
        return None
    split, index = node.args
    if not is_op(split, (aten.split_with_sizes.default, aten.chunk.default)):
        return None
    source = split.args[0]
    x = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if not isinstance(x, torch.Tensor) or dim not in (-1, x.dim() - 1):
        return None
    if is_op(split, aten.split_with_sizes.default):
        return source, list(split.args[1]), index
    width = static_size(x.shape[-1])
    if split.args[1] != 2 or width is None or width % 2:
        return None
    return source, [width // 2] * 2, index


def match_silu_mul(mul):
    """(fused output, first column, width, whether that is all of it) of the ``[gate | up]`` columns
    that ``mul`` reads, or None."""
    if not is_op(mul, aten.mul.Tensor):
        return None
    for act, up in commutative_operands(mul):
        if not is_op(act, aten.silu.default) or len(act.users) != 1:
            continue
        gate_part, up_part = _split_part(act.args[0]), _split_part(up)
        if gate_part is None or up_part is None or gate_part[0] is not up_part[0]:
            continue
        source, sizes, i = gate_part
        if up_part[2] != i + 1 or sizes[i] != sizes[i + 1]:
            continue
        return source, sum(sizes[:i]), 2 * sizes[i], len(sizes) == 2
    return None


@dataclass
class FuseSiluMulConfig(TransformConfig):
    stage: str = "post_load_fusion"


@register("fuse_silu_mul")
class FuseSiluMul(BaseTransform):
    config_class = FuseSiluMulConfig
    graph_only = True

    def apply(self, gm, ctx: BuildContext):
        editor = GraphEditor(gm)
        matches = 0
        for mul in list(gm.graph.nodes):
            found = match_silu_mul(mul)
            if found is None:
                continue
            source, start, width, whole = found
            with gm.graph.inserting_before(mul):
                gate_up = source if whole else editor.call(aten.slice.Tensor, source, -1, start, start + width)
                out = editor.call(torch.ops.autodeploy.silu_mul.default, gate_up)
            silu = next(a for a in mul.args if is_op(a, aten.silu.default))
            editor.replace(mul, out)
            editor.erase_unused([mul, silu])
            matches += 1
        return gm, TransformInfo(num_matches=matches, is_clean=False, has_valid_shapes=editor.shapes_valid)
