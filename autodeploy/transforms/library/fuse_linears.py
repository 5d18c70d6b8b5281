"""``fuse_parallel_linears`` (stage post_load_fusion): linears that read one input become one GEMM.

``linear(x, W1[, b1]), linear(x, W2[, b2]), ...`` (q/k/v projections, gate/up, a router beside a
shared expert) -> ``split(linear(x, cat(W1, W2, ...)[, cat(b1, ...)]), [n1, n2, ...], -1)``: one
launch with a larger N instead of several thin ones, and ``x`` is read once. Applies to linears
whose weights (and biases) are tensors of one dtype and device that no other node uses (a tied
weight is left alone). Split sizes are read from the weights as they are now, so after sharding
each rank fuses its own local shards.

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


def _candidate(gm: fx.GraphModule, node: fx.Node, tied: set[str]) -> Optional[_Linear]:
    w_node, b_node = node.args[1], arg(node, 2, "bias", None)
    w, b = _tensor(gm, w_node), _tensor(gm, b_node)
    if w is None or w.dim() != 2 or (b_node is not None and (b is None or b.dim() != 1)):
        return None
    attrs = [n for n in (w_node, b_node) if n is not None]
    if any(len(n.users) != 1 or n.target in tied for n in attrs):
        return None
    bias_key = None if b is None else (b.dtype, b.device, isinstance(b, nn.Parameter))
    key = (w.dtype, w.device, w.shape[1], isinstance(w, nn.Parameter), bias_key)
    return _Linear(node, w_node, b_node, w.shape[0], key)


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
            if is_op(user, aten.linear.default) and user.args[0] is node:
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
                  before: fx.Node) -> fx.Node:
    """One new attribute holding the tensors of ``nodes`` stacked along dim 0 (the old ones are
    deleted); returns its get_attr node."""
    targets = [n.target for n in nodes]
    owner_path = _owner_path(targets)
    owner = gm.get_submodule(owner_path)
    leaves = [t.split(".")[-2] if t.count(".") else t for t in targets]
    name = "fused_" + "_".join(leaves) + "_" + kind
    while hasattr(owner, name):
        name += "_"
    is_param = isinstance(_lookup(gm, targets[0]), nn.Parameter)
    with torch.no_grad():
        fused = torch.cat([_lookup(gm, t).detach() for t in targets], dim=0)
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
    with gm.graph.inserting_before(first):
        fused = editor.call(aten.linear.default, first.args[0], weight, bias)
        parts = editor.call(aten.split_with_sizes.default, fused, [lin.out_features for lin in group], -1)
        outs = [editor.call(operator.getitem, parts, i) for i in range(len(group))]
    for lin, out in zip(group, outs):
        editor.replace(lin.node, out)
    editor.erase_unused([lin.node for lin in group])
    for lin in group:
        for attr in (lin.w_node, lin.b_node):
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
