"""Apply one rank's sharding edits to the graph (still on meta: nothing is loaded yet).

Parameters are replaced by meta tensors of their per-rank shape and the slices are recorded for
the loader (``load_weights`` reads only those ranges from the checkpoint); literal sizes are
rewritten; collectives are inserted after their nodes.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import fx

from ..distributed.collectives import ensure_groups
from ..models.checkpoint import SliceRange
from ..models.materialize import set_tensor, slice_tensor
from .graph import get_attr_tensor
from .plan import Collective, DropBias, Edit, SetShapeDim, SetSplitSizes, ShiftIds, SliceInput, SliceParam

ad = torch.ops.autodeploy


def apply_edits(gm: fx.GraphModule, edits: Iterable[Edit], groups: Iterable[str]) -> dict[str, tuple[SliceRange, ...]]:
    """Edit ``gm`` in place; returns the loader's slices (parameter fqn -> ranges)."""
    edits = list(edits)
    nodes = {n.name: n for n in gm.graph.nodes}
    attrs = {n.target: n for n in gm.graph.nodes if n.op == "get_attr"}
    slices: dict[str, tuple[SliceRange, ...]] = {}
    for e in edits:
        if isinstance(e, SliceParam):
            _slice_param(gm, attrs[e.fqn], e, slices)
        elif isinstance(e, SetShapeDim):
            node = nodes[e.node]
            shape = list(node.args[1])
            shape[e.axis] = e.value
            node.args = (node.args[0], shape, *node.args[2:])
        elif isinstance(e, SetSplitSizes):
            node = nodes[e.node]
            node.args = (node.args[0], list(e.sizes), *node.args[2:])
        elif isinstance(e, DropBias):
            node = nodes[e.node]
            node.args = node.args[:2]
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "bias"}
        elif isinstance(e, ShiftIds):
            node = nodes[e.node]
            with gm.graph.inserting_before(node):
                shifted = gm.graph.call_function(torch.ops.aten.sub.Tensor, (node.args[e.arg], e.offset))
            node.update_arg(e.arg, shifted)
        elif isinstance(e, SliceInput):
            node = nodes[e.node]
            with gm.graph.inserting_before(node):
                part = gm.graph.call_function(torch.ops.aten.slice.Tensor, (node.args[e.arg], e.dim, e.start, e.stop))
            node.update_arg(e.arg, part)
    ensure_groups(groups)
    for e in edits:
        if isinstance(e, Collective):
            _insert_collective(gm, nodes[e.node], e)
    gm.graph.eliminate_dead_code()
    _drop_unused_params(gm)
    gm.recompile()
    return slices


def _slice_param(gm: fx.GraphModule, node: fx.Node, e: SliceParam, slices: dict) -> None:
    tensor = get_attr_tensor(gm, node)
    shape = list(tensor.shape)
    sizes: dict[int, int] = {}
    for dim, start, stop in e.ranges:
        d = dim % len(shape)
        sizes[d] = sizes.get(d, 0) + stop - start
    for d, size in sizes.items():
        shape[d] = size
    ranges = tuple((dim % len(tensor.shape), start, stop) for dim, start, stop in e.ranges)
    if tensor.device.type == "meta":
        local = torch.empty(shape, dtype=tensor.dtype, device="meta")
    else:  # a graph that already holds its weights keeps only this rank's part of them
        local = slice_tensor(tensor.detach(), ranges).contiguous()
    set_tensor(gm, e.fqn, local, isinstance(tensor, torch.nn.Parameter))
    slices[e.fqn] = ranges


def _insert_collective(gm: fx.GraphModule, node: fx.Node, e: Collective) -> None:
    users = list(node.users)
    with gm.graph.inserting_after(node):
        if e.op == "all_reduce":
            new = gm.graph.call_function(ad.all_reduce.default, (node, e.group))
        else:
            new = gm.graph.call_function(ad.all_gather.default, (node, e.dim % node.meta["val"].dim(), e.group))
    for u in users:
        u.replace_input_with(node, new)


def _drop_unused_params(gm: fx.GraphModule) -> None:
    """Parameters no node reads any more (a dropped bias) are removed, so nothing loads them."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters(remove_duplicate=False)):
        if name not in used:
            mod_name, _, attr = name.rpartition(".")
            module = gm.get_submodule(mod_name) if mod_name else gm
            del module._parameters[attr]
