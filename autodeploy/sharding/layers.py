"""Claims for one layer or op: the graph analysis behind each sharding strategy.

- ``tp_layer``: a residual branch whose openings are column-split and whose single closing linear
  is row-split (attention, MLP, and with ``dim="ssm"`` a Mamba2 mixer); the region in between is
  checked by ``region.walk`` so the split is exact, else ``Unsupported`` is raised.
- ``moe_shard``: an ``autodeploy::moe`` op, expert parallel and/or tensor parallel.
- ``bmm_shard``: a batched matmul with a parameter operand, split along the batch.
- ``simple_shard`` / ``replicate``: the always-correct fallbacks.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import fx

from .graph import Branch, linear_of, param_of, shared_weight, static_shape
from .layout import LayoutError, Part
from .plan import BMMShard, Linear, MoEShard, Replicate, SimpleShard, TPLayer
from .region import Unsupported, walk

aten = torch.ops.aten
ad = torch.ops.autodeploy
CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.contiguous.default}


def world_group(world: int) -> tuple[int, ...]:
    return tuple(range(world))


def tp_layer(gm: fx.GraphModule, branch: Branch, world: int, source: str, name_counts: dict[int, int]) -> TPLayer:
    """Column/row split of one branch; raises ``Unsupported`` / ``LayoutError`` when not exact."""
    openings, closings = branch.openings(), branch.closings()
    linears = branch.linears
    if len(closings) != 1 or closings[0] in openings:
        raise Unsupported(f"layer {branch.index} has {len(closings)} closing linears (needs exactly one after the openings)")
    closing = closings[0]
    if set(linears) - set(openings) - {closing}:
        raise Unsupported(f"layer {branch.index} has linears between its openings and its closing linear")
    for lin in linears:
        if shared_weight(gm, lin, name_counts):
            raise Unsupported(f"{lin.name}'s weight is shared with another op (tied)")
    if branch.has_op(ad.moe.default):
        raise Unsupported(f"layer {branch.index} is a mixture of experts")
    ssm = branch.has_op(ad.ssm_scan.default)
    attention = branch.has_op(ad.attention.default)
    if ssm and attention:
        raise Unsupported(f"layer {branch.index} mixes attention and a Mamba mixer in one branch")
    if ssm:
        if len(ssm) != 1 or len(openings) != 1:
            raise Unsupported(f"layer {branch.index}: a Mamba mixer needs one in_proj feeding one scan")
        layouts = {openings[0]: _mamba_layout(openings[0], ssm[0])}
    else:
        unit = 1
        if attention:
            if len(attention) != 1:
                raise Unsupported(f"layer {branch.index} has {len(attention)} attention ops")
            unit = int(attention[0].args[0].meta["val"].shape[-1])  # heads stay whole
        layouts = {o: _opening_layout(o, unit) for o in openings}
    region = walk(gm, layouts, closing, world)
    colwise = [(linear_of(gm, o), layouts[o]) for o in openings]
    return TPLayer(
        source=source, dim="ssm" if ssm else "tp",
        nodes=frozenset([n.name for n in linears] + [n.name for n in ssm]),
        group=world_group(world), colwise=colwise, rowwise=(linear_of(gm, closing), region.closing_layout),
        params=region.params, views=region.views, splits=region.splits,
        opening_strategy="mamba" if ssm else "colwise",
    )


def _through_casts(node: fx.Node) -> list[fx.Node]:
    users = []
    for u in node.users:
        users.extend(_through_casts(u) if u.op == "call_function" and u.target in CASTS else [u])
    return users


def _opening_layout(node: fx.Node, unit: int) -> tuple[Part, ...]:
    """Components of an opening's output: the pieces of a split/chunk on its last axis (a fused
    QKV or gate|up projection), else one component; whole units of ``unit`` (head_dim) where the
    size allows."""
    full = int(node.meta["val"].shape[-1])
    ndim = node.meta["val"].dim()
    sizes = [full]
    for u in _through_casts(node):
        if u.op != "call_function":
            continue
        if u.target is aten.split_with_sizes.default and u.args[2 if len(u.args) > 2 else 0] % ndim == ndim - 1:
            sizes = list(u.args[1])
        elif u.target is aten.chunk.default and (u.args[2] if len(u.args) > 2 else 0) % ndim == ndim - 1:
            sizes = [full // u.args[1]] * u.args[1]
    return tuple(Part(s, unit if s % unit == 0 else 1) for s in sizes)


def _mamba_layout(in_proj: fx.Node, scan: fx.Node) -> tuple[Part, ...]:
    """``[z | x | B | C | dt]`` of a Mamba2 in_proj, split by groups (heads of a group stay together,
    so the gated norm's groups and the scan's B/C groups stay on one rank)."""
    x, b = scan.args[0].meta["val"], scan.args[3].meta["val"]
    heads, head_dim, groups, state = (int(s) for s in (x.shape[2], x.shape[3], b.shape[2], b.shape[3]))
    inner = heads * head_dim
    splits = [u for u in _through_casts(in_proj) if u.op == "call_function" and u.target is aten.split_with_sizes.default]
    if len(splits) != 1 or list(splits[0].args[1]) != [inner, inner + 2 * groups * state, heads]:
        raise Unsupported(f"{in_proj.name}: in_proj is not split as [z, xBC, dt] of a Mamba2 mixer")
    per_group = inner // groups
    return (Part(inner, per_group), Part(inner, per_group), Part(groups * state, state), Part(groups * state, state),
            Part(heads, heads // groups))


def moe_shard(gm: fx.GraphModule, node: fx.Node, world: int, source: str, ep: int, tp: int, ep_major: bool) -> MoEShard:
    w_gate_up, w_down = param_of(gm, node.args[3]), param_of(gm, node.args[4])
    if w_gate_up is None or w_down is None:
        raise Unsupported(f"{node.name}: expert weights are not parameters")
    experts, inter = w_gate_up.shape[0], w_down.shape[2]
    if ep > experts:
        raise Unsupported(f"{node.name}: {experts} experts cannot be spread over {ep} expert-parallel ranks")
    if inter % tp:
        raise Unsupported(f"{node.name}: expert intermediate size {inter} does not split over {tp} ranks")
    return MoEShard(source=source, dim="ep" if ep > 1 else "tp", nodes=frozenset([node.name]), node=node.name,
                    w_gate_up=w_gate_up, w_down=w_down, ep=ep, tp=tp, ep_major=ep_major,
                    module=w_gate_up.module)


def bmm_shard(gm: fx.GraphModule, node: fx.Node, world: int, source: str) -> Optional[BMMShard]:
    for i in (0, 1):
        param = param_of(gm, node.args[i])
        other = static_shape(node.args[1 - i])
        if param is not None and len(param.shape) == 3 and param.shape[0] % world == 0 and other is not None \
                and other[0] == param.shape[0]:
            return BMMShard(source=source, dim="bmm", nodes=frozenset([node.name]), node=node.name, param=param,
                            param_arg=i, group=world_group(world))
    return None


def simple_shard(gm: fx.GraphModule, node: fx.Node, world: int, source: str, name_counts: dict[int, int]):
    """Column split + all-gather when the output splits evenly and the weight is the linear's own,
    else replicated."""
    lin = linear_of(gm, node)
    if lin.weight.shape[0] % world or shared_weight(gm, node, name_counts):
        return replicate_linear(lin, node, source, "tp")
    return SimpleShard(source=source, dim="tp", nodes=frozenset([node.name]), group=world_group(world), linear=lin)


def replicate_linear(lin: Linear, node: fx.Node, source: str, dim: str) -> Replicate:
    params = [lin.weight] + ([lin.bias] if lin.bias is not None else [])
    return Replicate(source=source, dim=dim, nodes=frozenset([node.name]), params=params, target=lin.weight.module)


__all__ = ["LayoutError", "Unsupported", "bmm_shard", "moe_shard", "replicate_linear", "simple_shard", "tp_layer"]
