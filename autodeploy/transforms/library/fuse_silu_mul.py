"""``fuse_silu_mul`` (stage post_load_fusion): SwiGLU's ``silu(gate) * up`` -> ``autodeploy::silu_mul``.

Runs after ``fuse_parallel_linears``: matches ``mul(silu(part_i), part_{i+1})`` where both parts
are equal-sized neighbours of one last-dim ``split_with_sizes`` of the fused gate/up GEMM (or of a
checkpoint's own ``gate_up_proj`` output cut with ``chunk`` or ``split``), so the op reads the
contiguous ``[gate | up]`` columns in place (a ``slice`` of them when the split has other parts).
Models whose gate and up were not fused are left as they are. It reads the split input's fake
value (rank, width), so it asks for shape propagation when the last transform left stale values
(a graph moved to another device: ``fuse_parallel_linears`` then cannot give its GEMM one).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

import autodeploy.custom_ops.silu_mul  # noqa: F401  registers torch.ops.autodeploy.silu_mul

from ..interface import BaseTransform, BuildContext, TransformConfig, TransformInfo, register
from ..patterns.nodes import GraphEditor, commutative_operands, is_op, static_size

aten = torch.ops.aten
_SPLITS = (aten.split_with_sizes.default, aten.split.Tensor, aten.chunk.default)


def _split_part(node):
    """(source, sizes, index) if ``node`` is part ``index`` of a last-dim ``split_with_sizes``,
    ``split`` or ``chunk`` of ``source`` (``chunk`` decomposes to ``split``, e.g. in core ATen)."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is operator.getitem):
        return None
    split, index = node.args
    if not is_op(split, _SPLITS):
        return None
    source = split.args[0]
    x = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if not isinstance(x, torch.Tensor) or dim not in (-1, x.dim() - 1):
        return None
    if is_op(split, aten.split_with_sizes.default):
        return source, list(split.args[1]), index
    width, n = static_size(x.shape[-1]), split.args[1]
    if width is None or not isinstance(n, int) or n <= 0:
        return None
    size = n if is_op(split, aten.split.Tensor) else -(-width // n)  # chunk(n) is split(ceil(width / n))
    return source, [size] * (width // size) + ([width % size] if width % size else []), index


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
    requires_shape_prop: bool = True  # the matcher reads the split input's fake value


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


def describe_silu_sites(gm) -> str:
    """One line per ``aten.silu`` node: its input and its users' ops, then the splits they read
    (op, input op, whether that input has the fake value ``match_silu_mul`` reads, split args)."""
    def op(n):
        return str(n.target).removeprefix("aten.") if isinstance(n, torch.fx.Node) else repr(n)

    lines = []
    for node in gm.graph.nodes:
        if not is_op(node, (aten.silu.default, aten.silu_.default)):
            continue
        splits = {}

        def desc(n):
            if not (isinstance(n, torch.fx.Node) and n.target is operator.getitem and isinstance(n.args[0], torch.fx.Node)):
                return op(n)
            split, i = n.args
            src = split.args[0] if split.args else None
            val = "" if isinstance(getattr(src, "meta", {}).get("val"), torch.Tensor) else " (no val)"
            splits[split.name] = f"{op(split)}({op(src)}{val}, {', '.join(map(repr, split.args[1:]))})"
            return f"{split.name}[{i}]"

        users = "; ".join(f"{op(u)}({', '.join('silu' if a is node else desc(a) for a in u.args)})" for u in node.users)
        line = f"{node.name}: {op(node)}({desc(node.args[0])}) -> {users or 'no users'}"
        lines.append("; ".join([line] + [f"{k} = {v}" for k, v in splits.items()]))
    return "\n".join(lines) or "no aten.silu nodes"
