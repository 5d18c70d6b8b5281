"""Rewrite HF rotary embeddings into ``autodeploy::rope`` (one op for each q/k pair).

Recognized: ``x * cos + rot(x) * sin`` with ``rot`` HF's rotate-half (``cat(-x[h:], x[:h])``) or
the interleaved rotate-every-two (``stack(-x[1::2], x[::2]).flatten(-2)``), in bnsd or bsnd
layout, and partial rotary (``cat(rope(x[..., :R]), x[..., R:])``). The rotary dim, head dim and
slice bounds are read from the graph. Two applications that share cos/sin become one op; the op
is bsnd, so bnsd inputs get ``transpose(1, 2)`` around it (cancelled later by
``eliminate_redundant_transposes``). Anything else (e.g. complex-number RoPE, casts inside the
formula) stays plain graph code.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import fx

import autodeploy.custom_ops.rope  # noqa: F401  registers torch.ops.autodeploy.rope

from ..interface import BaseTransform, BuildContext, TransformConfig, TransformInfo, register
from ..patterns.nodes import (
    is_op,
    SLICE_TO_END,
    GraphEditor,
    arg,
    commutative_operands,
    is_last_dim,
    ndim,
    node_order,
    norm_dim,
    same_shape,
    same_size,
    single_user,
    static_size,
    try_match,
    val,
)

aten = torch.ops.aten


@dataclass
class RopeMatch:
    output: fx.Node  # replaced by the op's result (same layout as x)
    x: fx.Node  # the full head tensor that is rotated (its first R dims)
    cos: fx.Node  # as multiplied in HF: broadcastable over heads
    sin: fx.Node
    interleaved: bool
    head_dim_index: int  # 1: bnsd, 2: bsnd


def _last_dim_slice(node: Any, x: Optional[fx.Node] = None) -> Optional[tuple[fx.Node, int, Any, int]]:
    """``slice(x, last, start, end, step)`` -> (x, start, end, step)."""
    if not is_op(node, aten.slice.Tensor):
        return None
    src = node.args[0]
    if (x is not None and src is not x) or not is_last_dim(arg(node, 1, "dim", 0), ndim(src)):
        return None
    start, end, step = arg(node, 2, "start", None), arg(node, 3, "end", None), arg(node, 4, "step", 1)
    start, end = 0 if start is None else start, SLICE_TO_END if end is None else end
    if not all(isinstance(b, int) for b in (start, end, step)):
        return None  # symbolic bounds: not one of the fixed-size rotary slices
    return src, start, end, step


def _head_size(x: fx.Node) -> Optional[int]:
    v = val(x)
    return static_size(v.shape[-1]) if isinstance(v, torch.Tensor) else None


def rotate_half_source(node: Any) -> Optional[fx.Node]:
    """``cat([-x[..., h:], x[..., :h]], -1)`` -> x."""
    if not is_op(node, aten.cat.default) or len(node.args[0]) != 2:
        return None
    neg, low = node.args[0]
    if not is_op(neg, aten.neg.default) or not is_last_dim(arg(node, 1, "dim", 0), ndim(node)):
        return None
    lo, hi = _last_dim_slice(low), _last_dim_slice(neg.args[0])
    if lo is None or hi is None or lo[0] is not hi[0]:
        return None
    x, size = lo[0], _head_size(lo[0])
    if size is None or size % 2:
        return None
    half = size // 2
    if lo[1:] == (0, half, 1) and hi[1] == half and hi[2] >= size and hi[3] == 1:
        return x
    return None


def rotate_every_two_source(node: Any) -> Optional[fx.Node]:
    """``stack([-x[..., 1::2], x[..., ::2]], -1).flatten(-2)`` -> x."""
    rank = ndim(node)
    if is_op(node, aten.flatten.using_ints):
        if norm_dim(arg(node, 1, "start_dim", 0), rank + 1) != rank - 1 or norm_dim(arg(node, 2, "end_dim", -1), rank + 1) != rank:
            return None
    elif is_op(node, (aten.view.default, aten.reshape.default)):
        pass  # checked through shapes below
    else:
        return None
    stack = node.args[0]
    if not is_op(stack, aten.stack.default) or len(stack.args[0]) != 2:
        return None
    if norm_dim(arg(stack, 1, "dim", 0), ndim(stack)) != ndim(stack) - 1:
        return None
    neg, even = stack.args[0]
    if not is_op(neg, aten.neg.default):
        return None
    odd_s, even_s = _last_dim_slice(neg.args[0]), _last_dim_slice(even)
    if odd_s is None or even_s is None or odd_s[0] is not even_s[0]:
        return None
    x, size = odd_s[0], _head_size(odd_s[0])
    if size is None or size % 2 or odd_s[1] != 1 or even_s[1] != 0 or odd_s[3] != 2 or even_s[3] != 2:
        return None
    if odd_s[2] < size or even_s[2] < size:
        return None
    out_v, x_v = val(node), val(x)
    if not isinstance(out_v, torch.Tensor) or not all(same_size(a, b) for a, b in zip(out_v.shape, x_v.shape)):
        return None
    return x


def _layout(x: fx.Node, cos: fx.Node) -> Optional[int]:
    """Index of the head dim (1: bnsd, 2: bsnd), read from where cos broadcasts."""
    xv, cv = val(x), val(cos)
    if not isinstance(xv, torch.Tensor) or not isinstance(cv, torch.Tensor) or xv.dim() != 4 or cv.dim() != 4:
        return None
    found = []
    for head, seq in ((1, 2), (2, 1)):
        if (
            static_size(cv.shape[head]) == 1
            and static_size(xv.shape[head]) is not None
            and same_size(cv.shape[seq], xv.shape[seq])
            and (same_size(cv.shape[0], xv.shape[0]) or static_size(cv.shape[0]) == 1)
            and same_size(cv.shape[3], xv.shape[3])
        ):
            found.append(head)
    return found[0] if len(found) == 1 else None


def match_rope(add: fx.Node) -> Optional[RopeMatch]:
    if not is_op(add, aten.add.Tensor):
        return None
    for m_cos, m_sin in commutative_operands(add):
        if not is_op(m_cos, aten.mul.Tensor) or not is_op(m_sin, aten.mul.Tensor):
            continue
        for rotated, sin in commutative_operands(m_sin):
            interleaved = False
            x = rotate_half_source(rotated)
            if x is None:
                x, interleaved = rotate_every_two_source(rotated), True
            if x is None or not isinstance(sin, fx.Node):
                continue
            for x2, cos in commutative_operands(m_cos):
                if x2 is not x or not isinstance(cos, fx.Node):
                    continue
                head = _layout(x, cos)
                if head is None or _layout(x, sin) != head or not same_shape(val(cos).shape, val(sin).shape):
                    continue
                return _with_partial_rotary(RopeMatch(add, x, cos, sin, interleaved, head))
    return None


def _with_partial_rotary(m: RopeMatch) -> Optional[RopeMatch]:
    """Widen ``x[..., :R]`` + ``cat([rope, x[..., R:]], -1)`` to the full head; else R must be D."""
    rot = _last_dim_slice(m.x)
    if rot is None:
        return m
    full, start, end, step = rot
    rot_dim, head_dim = _head_size(m.x), _head_size(full)
    cat = single_user(m.output)
    if start != 0 or step != 1 or rot_dim is None or head_dim is None or cat is None:
        return m
    if not is_op(cat, aten.cat.default) or not is_last_dim(arg(cat, 1, "dim", 0), ndim(cat)):
        return m
    parts = cat.args[0]
    if len(parts) != 2 or parts[0] is not m.output:
        return m
    rest = _last_dim_slice(parts[1], full)
    if rest is None or rest[1] != rot_dim or rest[2] < head_dim or rest[3] != 1:
        return m
    return RopeMatch(cat, full, m.cos, m.sin, m.interleaved, m.head_dim_index)


def _table_source(editor: GraphEditor, table: fx.Node, head: int) -> fx.Node:
    """cos/sin as ``[B,S,R]``: the tensor before HF's unsqueeze, or a squeeze of the head dim."""
    if is_op(table, aten.unsqueeze.default) and norm_dim(table.args[1], 4) == head and ndim(table.args[0]) == 3:
        return table.args[0]
    return editor.call(aten.squeeze.dim, table, head)


@dataclass
class MatchRopeConfig(TransformConfig):
    stage: str = "pattern_matcher"
    requires_shape_prop: bool = True


@register("match_rope_pattern")
class MatchRopePattern(BaseTransform):
    """HF rotate-half / interleaved RoPE (full or partial) on q and k -> autodeploy::rope (bsnd)."""

    config_class = MatchRopeConfig
    graph_only = True

    def apply(self, model, ctx: BuildContext):
        graph = model.graph
        groups: dict[tuple, list[RopeMatch]] = defaultdict(list)
        for node in graph.nodes:
            m = try_match(match_rope, node)
            if m is not None:
                groups[(m.cos, m.sin, m.interleaved, m.head_dim_index)].append(m)

        order = node_order(graph)
        editor = GraphEditor(model)
        num, unpaired = 0, 0
        for group in groups.values():
            group.sort(key=lambda m: order[m.output])
            unpaired += len(group) % 2
            for a, b in zip(group[0::2], group[1::2]):
                users = [u for m in (a, b) for u in m.output.users]
                insert_at = min(users, key=order.__getitem__) if users else b.output.next
                inputs = (a.x, b.x, a.cos, a.sin)
                if users and any(order[i] >= order[insert_at] for i in inputs):
                    unpaired += 2  # a user of the first sits between the two: leave both
                    continue
                self._rewrite(editor, a, b, insert_at)
                num += 1
        note = f"{unpaired} RoPE application(s) without a partner left as is" if unpaired else ""
        return model, TransformInfo(num_matches=num, is_clean=False, has_valid_shapes=editor.shapes_valid, note=note)

    @staticmethod
    def _rewrite(editor: GraphEditor, a: RopeMatch, b: RopeMatch, insert_at: fx.Node) -> None:
        head = a.head_dim_index
        with editor.graph.inserting_before(insert_at):
            xs = [editor.call(aten.transpose.int, m.x, 1, 2) if head == 1 else m.x for m in (a, b)]
            cos, sin = _table_source(editor, a.cos, head), _table_source(editor, a.sin, head)
            rope = editor.call(torch.ops.autodeploy.rope.default, xs[0], xs[1], cos, sin, a.interleaved)
            for i, m in enumerate((a, b)):
                out = editor.call(operator.getitem, rope, i)
                if head == 1:
                    out = editor.call(aten.transpose.int, out, 1, 2)
                editor.replace(m.output, out)
