"""Walk the region between a layer's column-split openings and its row-split closing linear.

Starting from the openings' outputs (their last axis laid out as ``layout.Part`` components), the
walk follows every node up to the closing linear's input and tracks, for each tensor, which axis
carries the split and how it is laid out. On the way it collects what the split changes: literal
sizes in views (head or group counts), split sizes, and per-head/per-channel parameters used in
the region (norm weights, conv weights, A/D/dt_bias, attention sinks), which must be sliced the
same way. Anything it does not understand exactly raises ``Unsupported`` naming the node, and the
caller falls back to a simple shard: a layer is sharded this way only when the result is exact.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import fx

from .graph import ancestors, descendants, param_of
from .layout import Layout, Part, check, full_size, local_ranges, split_layout
from .plan import RegionParam

aten = torch.ops.aten
ad = torch.ops.autodeploy


class Unsupported(ValueError):
    """The region holds something a column/row split cannot represent exactly."""


@dataclass(frozen=True)
class Sharded:
    axis: int  # non-negative index of the split axis
    layout: Layout


@dataclass
class Region:
    views: list[tuple[str, int, Layout]] = field(default_factory=list)
    splits: list[tuple[str, tuple[Layout, ...]]] = field(default_factory=list)
    params: list[RegionParam] = field(default_factory=list)
    closing_layout: Layout = ()


CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.contiguous.default,
         aten.clone.default, aten.alias.default, aten.detach.default}
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
# unary ops a parameter may pass through before it meets the region (casts, A = -exp(A_log), ...)
PARAM_CHAIN = CASTS | VIEWS | {aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
                                aten.exp.default, aten.neg.default}


def walk(gm: fx.GraphModule, openings: dict[fx.Node, Layout], closing: fx.Node, world: int) -> Region:
    """Validate the region and collect its edits; ``openings`` maps each opening linear to its
    output layout. Raises ``Unsupported`` (or ``LayoutError``) when the split would not be exact."""
    for layout in openings.values():
        check(layout, world)
    region = (descendants(openings) & ancestors([closing])) | set(openings)
    inside = region | {closing}
    for n in region:
        for u in n.users:
            if u not in inside and not _harmless_use(u, n):
                raise Unsupported(f"{n.name} is also read outside the layer (by {u.name})")
    state: dict[fx.Node, object] = {n: Sharded(_ndim(n) - 1, layout) for n, layout in openings.items()}
    out = Region()
    for n in gm.graph.nodes:  # topological order
        if n in openings or n not in region:
            continue
        state[n] = _transfer(gm, n, state, out, world)
    src = closing.args[0]
    sh = state.get(src)
    if not isinstance(sh, Sharded) or sh.axis != _ndim(src) - 1:
        raise Unsupported(f"the closing linear {closing.name} does not read the split features on its last axis")
    for part in sh.layout:
        if part.pieces(world) != world:
            raise Unsupported(f"the closing linear {closing.name} would sum replicated pieces: {part.size // part.unit} "
                              f"units of {part.unit} (heads) on {world} ranks")
    out.closing_layout = sh.layout
    return out


def _harmless_use(user: fx.Node, node: fx.Node) -> bool:
    # reading the batch/seq sizes of a split tensor is fine (sizes of the split axis are not)
    return user.op == "call_function" and user.target is aten.sym_size.int and user.args[1] != _ndim(node) - 1


def _ndim(node) -> int:
    return node.meta["val"].dim()


def _shape(node) -> tuple:
    return tuple(node.meta["val"].shape)


def _transfer(gm, n: fx.Node, state, out: Region, world: int):
    t = n.target
    if t is operator.getitem:
        return state[n.args[0]][n.args[1]]
    if t is aten.sym_size.int:
        if n.args[1] % _ndim(n.args[0]) == state[n.args[0]].axis:
            raise Unsupported(f"{n.name} reads the size of the split axis")
        return None
    x = state.get(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
    if t in CASTS:
        return x
    if t in VIEWS:
        return _view(n, x, out)
    if t in (aten.transpose.int,):
        d0, d1 = (d % _ndim(n) for d in n.args[1:3])
        return Sharded({d0: d1, d1: d0}.get(x.axis, x.axis), x.layout)
    if t is aten.permute.default:
        dims = [d % _ndim(n) for d in n.args[1]]
        return Sharded(dims.index(x.axis), x.layout)
    if t is aten.unsqueeze.default:
        d = n.args[1] % _ndim(n)
        return Sharded(x.axis + (d <= x.axis), x.layout)
    if t in (aten.split_with_sizes.default, aten.split.Tensor, aten.chunk.default):
        return _split(n, x, out)
    if t is aten.slice.Tensor or t is aten.select.int:
        if n.args[1] % _ndim(n.args[0]) == x.axis:
            raise Unsupported(f"{n.name} slices the split axis")
        return Sharded(x.axis - (t is aten.select.int and n.args[1] % _ndim(n.args[0]) < x.axis), x.layout)
    if t in (aten.mean.dim, aten.sum.dim_IntList, aten.amax.default):
        dims = [d % _ndim(n.args[0]) for d in n.args[1]]
        keep = len(n.args) > 2 and n.args[2]
        if x.axis in dims:
            raise Unsupported(f"{n.name} reduces over the split axis")
        return Sharded(x.axis if keep else x.axis - sum(d < x.axis for d in dims), x.layout)
    if t is ad.rope.default:
        return (state[n.args[0]], state[n.args[1]])
    if t is ad.rms_norm.default:
        if x.axis == _ndim(n) - 1:
            raise Unsupported(f"{n.name} normalizes over the split axis (a norm over all heads)")
        return x
    if t is ad.attention.default:
        return _attention(gm, n, state, out, world)
    if t is ad.causal_conv1d.default:
        for i in (1, 2):
            if len(n.args) > i and n.args[i] is not None:
                _region_param(gm, n.args[i], n.name, 0, x.layout, out)
        return x
    if t is ad.ssm_scan.default:
        return _ssm(gm, n, state, out, world)
    if isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags:
        return _pointwise(gm, n, state, out)
    raise Unsupported(f"{n.name} ({t}) is not understood inside a split layer")


def _view(n: fx.Node, x: Sharded, out: Region) -> Sharded:
    """Find the split axis in the view's output: the axis where the trailing block sizes agree."""
    shape_in, shape_out = _shape(n.args[0]), _shape(n)
    try:
        inner_in = math.prod(int(s) for s in shape_in[x.axis + 1:])
        block = int(shape_in[x.axis]) * inner_in
        for b in range(len(shape_out)):
            tail = shape_out[b:]
            if any(not isinstance(s, int) and not str(s).isdigit() for s in tail):
                continue
            if math.prod(int(s) for s in tail) != block:
                continue
            inner_out = math.prod(int(s) for s in shape_out[b + 1:])
            if inner_out >= inner_in:
                factor = inner_out // inner_in
                if inner_out % inner_in or any(p.unit % factor for p in x.layout):
                    continue
                layout = tuple(Part(p.size // factor, p.unit // factor) for p in x.layout)
            else:
                if inner_in % inner_out:
                    continue
                layout = tuple(p.scaled(inner_in // inner_out) for p in x.layout)
            if int(shape_out[b]) != full_size(layout):
                continue
            sizes = n.args[1]
            if isinstance(sizes[b], int) and sizes[b] != -1:
                out.views.append((n.name, b, layout))
            return Sharded(b, layout)
    except (TypeError, ValueError):
        pass
    raise Unsupported(f"{n.name} reshapes the split axis in a way that cannot be split per rank")


def _split(n: fx.Node, x: Sharded, out: Region):
    dim = (n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)) % _ndim(n.args[0])
    full = _shape(n.args[0])[dim]
    if n.target is aten.split_with_sizes.default:
        sizes = list(n.args[1])
    elif n.target is aten.chunk.default:
        k = n.args[1]
        sizes = [full // k] * k if full % k == 0 else None
    else:
        step = n.args[1]
        sizes = [step] * (full // step) + ([full % step] if full % step else [])
    if dim != x.axis:
        return [x] * len(sizes)
    if sizes is None:
        raise Unsupported(f"{n.name} splits the split axis unevenly")
    pieces = split_layout(x.layout, sizes)
    if n.target is aten.split_with_sizes.default:
        out.splits.append((n.name, tuple(pieces)))
    elif n.target is aten.split.Tensor:
        raise Unsupported(f"{n.name}: split by a fixed size along the split axis")
    # chunk(k) stays valid only if every piece is split alike (then each local piece is equal)
    return [Sharded(x.axis, p) for p in pieces]


def _pointwise(gm, n: fx.Node, state, out: Region) -> Sharded:
    ndim = _ndim(n)
    region_args = [a for a in n.args if isinstance(a, fx.Node) and a in state]
    shs = [state[a] for a in region_args]
    from_right = {(_ndim(a) - s.axis) for a, s in zip(region_args, shs)}
    layouts = {s.layout for s in shs}
    if len(from_right) != 1 or len(layouts) != 1:
        raise Unsupported(f"{n.name} combines tensors split along different axes or layouts")
    k = from_right.pop()
    sh = Sharded(ndim - k, layouts.pop())
    for a in n.args:
        if not isinstance(a, fx.Node) or a in state:
            continue
        v = a.meta.get("val")
        if not isinstance(v, torch.Tensor) or v.numel() == 1 or v.dim() < k or v.shape[v.dim() - k] == 1:
            continue  # a scalar, or broadcast along the split axis
        _region_param(gm, a, n.name, None, sh.layout, out, want=int(v.shape[v.dim() - k]))
    return sh


def _region_param(gm, node: fx.Node, user: str, dim: Optional[int], layout: Layout, out: Region,
                  want: Optional[int] = None) -> None:
    """``node`` (outside the region) is read along the split axis: it must come from one parameter,
    which is then sliced like the axis."""
    src = node
    while src.op == "call_function" and src.target in PARAM_CHAIN and len(src.all_input_nodes) == 1:
        src = src.all_input_nodes[0]
    param = param_of(gm, src)
    size = full_size(layout)
    if param is None:
        raise Unsupported(f"{user} reads a tensor along the split axis that is not a parameter ({node.name})")
    if dim is None:
        matches = [d for d, s in enumerate(param.shape) if s == size]
        if len(matches) != 1 or (want is not None and want != size):
            raise Unsupported(f"{user}: cannot tell which axis of {param.fqn} {list(param.shape)} follows the split")
        dim = matches[0]
    elif param.shape[dim] != size:
        raise Unsupported(f"{user}: {param.fqn} {list(param.shape)} does not match the split axis ({size})")
    if not any(rp.param.fqn == param.fqn for rp in out.params):
        out.params.append(RegionParam(param, dim, layout))


def _attention(gm, n: fx.Node, state, out: Region, world: int) -> Sharded:
    q, k, v = (state.get(a) for a in n.args[:3])
    if not all(isinstance(s, Sharded) and s.axis == 2 for s in (q, k, v)):
        raise Unsupported(f"{n.name}: q, k and v must all be split by heads")
    if k.layout != v.layout:
        raise Unsupported(f"{n.name}: k and v heads are split differently")
    heads, kv_heads = full_size(q.layout), full_size(k.layout)
    group = heads // kv_heads
    for r in range(world):
        (qa, qb), = _one_range(q.layout, r, world)
        (ka, kb), = _one_range(k.layout, r, world)
        if (ka, kb) != (qa // group, (qb - 1) // group + 1):
            raise Unsupported(f"{n.name}: rank {r}'s query heads {qa}..{qb - 1} do not line up with its KV heads")
    for a in list(n.args[3:]) + list(n.kwargs.values()):
        if isinstance(a, fx.Node):
            if a in state:
                raise Unsupported(f"{n.name}: an extra attention input depends on the split")
            v_ = a.meta.get("val")
            if isinstance(v_, torch.Tensor) and v_.dim() >= 1 and v_.shape[0] == heads:
                _region_param(gm, a, n.name, 0, q.layout, out)  # per-head (sinks, ALiBi slopes)
            elif isinstance(v_, torch.Tensor) and v_.numel() > 1:
                raise Unsupported(f"{n.name}: extra attention input {a.name} is neither per head nor a scalar")
    return Sharded(2, q.layout)


def _one_range(layout: Layout, rank: int, world: int):
    if len(layout) != 1:
        raise Unsupported("heads must form one component")
    return local_ranges(layout, rank, world)


def _ssm(gm, n: fx.Node, state, out: Region, world: int) -> Sharded:
    x, dt, b, c = (state.get(n.args[i]) for i in (0, 1, 3, 4))
    if not all(isinstance(s, Sharded) and s.axis == 2 for s in (x, dt, b, c)):
        raise Unsupported(f"{n.name}: x, dt, B and C must all be split by heads / groups")
    for s in (x, dt, b, c):
        if any(p.pieces(world) != world for p in s.layout):
            raise Unsupported(f"{n.name}: heads/groups cannot be replicated across ranks")
    if x.layout != dt.layout or b.layout != c.layout:
        raise Unsupported(f"{n.name}: x/dt or B/C are split differently")
    for i in (2, 5, 6):  # A, D, dt_bias: one value per head
        if len(n.args) > i and isinstance(n.args[i], fx.Node):
            _region_param(gm, n.args[i], n.name, 0, x.layout, out)
    return Sharded(2, x.layout)
