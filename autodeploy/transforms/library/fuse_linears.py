"""``fuse_parallel_linears`` (stage post_load_fusion): linears that read one input become one GEMM.

``linear(x, W1[, b1]), linear(x, W2[, b2]), ...`` (q/k/v projections, gate/up, a router beside a
shared expert) -> ``split(linear(x, cat(W1, W2, ...)[, cat(b1, ...)]), [n1, n2, ...], -1)``: one
launch with a larger N instead of several thin ones, and ``x`` is read once. Applies to linears
whose weights (and biases) are tensors of one dtype and device that no other node uses (a tied
weight is left alone). Split sizes are read from the weights as they are now, so after sharding
each rank fuses its own local shards.

FP8 linears (``autodeploy::fp8_linear``) fuse the same way among themselves: weights and scales
concatenated along the rows (per-channel scales; block scales when every member's rows fill whole
blocks), a static input scale the largest of the group's (no activation is clipped), one op.

Memory: groups are fused one at a time and a group's old weights are deleted right after their
concatenation, so the build never holds more than one group's weights twice.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import fx, nn

from ..interface import BaseTransform, BuildContext, TransformConfig, TransformInfo, register
from ..patterns.nodes import GraphEditor, arg, is_op, node_order

aten = torch.ops.aten


def _lookup(module: nn.Module, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _tensor(gm: fx.GraphModule, node: Any) -> Optional[torch.Tensor]:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        value = _lookup(gm, node.target)
    except AttributeError:
        return None
    return value if isinstance(value, torch.Tensor) else None


@dataclass
class _Linear:
    """A candidate linear; holds no tensor, so deleting a fused weight really frees it."""

    node: fx.Node
    w_node: fx.Node
    b_node: Optional[fx.Node]
    out_features: int
    key: tuple  # what must agree within a group
    scale_node: Optional[fx.Node] = None  # fp8_linear: the weight scale
    input_node: Optional[fx.Node] = None  # fp8_linear: the static input scale


_FP8_LINEAR = "autodeploy.fp8_linear.default"


def _is_fp8_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and str(node.target) == _FP8_LINEAR


def _candidate(gm: fx.GraphModule, node: fx.Node, tied: set[str]) -> Optional[_Linear]:
    fp8 = _is_fp8_linear(node)
    w_node = node.args[1]
    b_node = node.args[4] if fp8 else arg(node, 2, "bias", None)
    scale_node, input_node, block = (node.args[2], node.args[3], node.args[5]) if fp8 else (None, None, None)
    w, b = _tensor(gm, w_node), _tensor(gm, b_node)
    if w is None or w.dim() != 2 or (b_node is not None and (b is None or b.dim() != 1)):
        return None
    attrs = [n for n in (w_node, b_node, scale_node, input_node) if n is not None]
    if any(_tensor(gm, n) is None or len(n.users) != 1 or n.target in tied for n in attrs):
        return None
    if block is not None and w.shape[0] % block[0]:
        return None  # its last block of scales would straddle the next member's rows
    bias_key = None if b is None else (b.dtype, b.device, isinstance(b, nn.Parameter))
    key = (w.dtype, w.device, w.shape[1], isinstance(w, nn.Parameter), bias_key)
    if fp8:
        key += (tuple(block) if block else None, input_node is not None)
    return _Linear(node, w_node, b_node, w.shape[0], key, scale_node, input_node)


def _tied_targets(gm: fx.GraphModule) -> set[str]:
    """get_attr targets whose tensor is also reachable under another target (tied weights)."""
    names: dict[int, set[str]] = defaultdict(set)
    for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        names[id(t)].add(name)
    return {n for group in names.values() if len(group) > 1 for n in group}


def parallel_linear_groups(gm: fx.GraphModule) -> list[list[_Linear]]:
    """Linears that read the same node with compatible weights, two or more, in graph order."""
    tied = _tied_targets(gm)
    groups = []
    for node in gm.graph.nodes:
        by_key: dict[tuple, list[_Linear]] = defaultdict(list)
        for user in node.users:
            if (is_op(user, aten.linear.default) or _is_fp8_linear(user)) and user.args[0] is node:
                lin = _candidate(gm, user, tied)
                if lin is not None:
                    by_key[lin.key].append(lin)
        groups += [g for g in by_key.values() if len(g) > 1]
    return groups


def _owner_path(targets: list[str]) -> str:
    """The deepest module holding all of ``targets``' modules: ``model.layers.0.self_attn``."""
    parts = [t.split(".")[:-2] for t in targets]  # drop "<module>.<attr>"
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


def _concat_attrs(gm: fx.GraphModule, nodes: list[fx.Node], kind: str, editor: GraphEditor,
                  before: fx.Node, combine=lambda ts: torch.cat(ts, dim=0)) -> fx.Node:
    """One new attribute holding the tensors of ``nodes`` stacked along dim 0 (or ``combine``d; the
    old ones are deleted); returns its get_attr node."""
    targets = [n.target for n in nodes]
    owner_path = _owner_path(targets)
    owner = gm.get_submodule(owner_path)
    leaves = [t.split(".")[-2] if t.count(".") else t for t in targets]
    name = "fused_" + "_".join(leaves) + "_" + kind
    while hasattr(owner, name):
        name += "_"
    is_param = isinstance(_lookup(gm, targets[0]), nn.Parameter)
    with torch.no_grad():
        fused = combine([_lookup(gm, t).detach() for t in targets])
    for t in targets:
        module_path, _, attr = t.rpartition(".")
        delattr(gm.get_submodule(module_path), attr)
    if is_param:
        owner.register_parameter(name, nn.Parameter(fused, requires_grad=False))
    else:
        owner.register_buffer(name, fused)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(f"{owner_path}.{name}" if owner_path else name)
    if editor.fake_mode is not None:
        node.meta["val"] = editor.fake_mode.from_tensor(fused, static_shapes=True)
    return node


def fuse_group(gm: fx.GraphModule, group: list[_Linear], editor: GraphEditor) -> None:
    order = node_order(gm.graph)
    group = sorted(group, key=lambda lin: order[lin.node])
    first = group[0].node
    weight = _concat_attrs(gm, [lin.w_node for lin in group], "weight", editor, first)
    bias = _concat_attrs(gm, [lin.b_node for lin in group], "bias", editor, first) if group[0].b_node else None
    if group[0].scale_node is not None:  # fp8_linear: its scales too
        scale = _concat_attrs(gm, [lin.scale_node for lin in group], "weight_scale", editor, first)
        inputs = None
        if group[0].input_node is not None:  # the largest: no activation of any member is clipped
            inputs = _concat_attrs(gm, [lin.input_node for lin in group], "input_scale", editor, first,
                                   combine=lambda ts: torch.stack(ts).amax(dim=0))
    with gm.graph.inserting_before(first):
        if group[0].scale_node is not None:
            fused = editor.call(first.target, first.args[0], weight, scale, inputs, bias, first.args[5])
        else:
            fused = editor.call(aten.linear.default, first.args[0], weight, bias)
        parts = editor.call(aten.split_with_sizes.default, fused, [lin.out_features for lin in group], -1)
        outs = [editor.call(operator.getitem, parts, i) for i in range(len(group))]
    for lin, out in zip(group, outs):
        editor.replace(lin.node, out)
    editor.erase_unused([lin.node for lin in group])
    for lin in group:
        for attr in (lin.w_node, lin.b_node, lin.scale_node, lin.input_node):
            if attr is not None and not attr.users:
                gm.graph.erase_node(attr)


@dataclass
class FuseParallelLinearsConfig(TransformConfig):
    stage: str = "post_load_fusion"


@register("fuse_parallel_linears")
class FuseParallelLinears(BaseTransform):
    config_class = FuseParallelLinearsConfig
    graph_only = True

    def apply(self, gm, ctx: BuildContext):
        editor = GraphEditor(gm)
        groups = parallel_linear_groups(gm)
        for group in groups:
            fuse_group(gm, group, editor)
        sizes = sorted({len(g) for g in groups})
        note = f"{len(groups)} groups of {'/'.join(map(str, sizes))} linears" if groups else ""
        return gm, TransformInfo(num_matches=len(groups), is_clean=False, has_valid_shapes=editor.shapes_valid,
                                 note=note)
