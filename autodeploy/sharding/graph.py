"""Graph queries for sharding: linears and their parameters, and the residual branches (layers).

A transformer graph is a residual stream (the embedding, then one ``add`` per block) with a
branch hanging off it for each block: everything computed from the stream value entering the
block that feeds the ``add`` closing it. Sharding decisions are made per branch: its linears that
read the stream are the *openings* (q/k/v, gate/up, in_proj), the one whose output goes back to
the stream is the *closing* linear (o_proj, down_proj, out_proj).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import fx

from .. import custom_ops  # noqa: F401  (the canonical ops the sharder reads)
from ..custom_ops import attention, moe, rms_norm, rope, ssm  # noqa: F401
from .plan import Linear, Param

aten = torch.ops.aten


def val(node) -> Optional[torch.Tensor]:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def static_shape(node) -> Optional[tuple[int, ...]]:
    v = val(node)
    if v is None:
        return None
    try:
        return tuple(int(s) for s in v.shape)
    except (TypeError, ValueError):
        return None


def get_attr_tensor(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def param_of(gm: fx.GraphModule, node) -> Optional[Param]:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    t = get_attr_tensor(gm, node)
    if not isinstance(t, torch.Tensor):
        return None
    return Param(node.target, tuple(t.shape), t.element_size())


def is_linear(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is aten.linear.default
            and isinstance(node.args[1], fx.Node) and node.args[1].op == "get_attr")


def linear_of(gm: fx.GraphModule, node: fx.Node) -> Linear:
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return Linear(node.name, param_of(gm, node.args[1]), param_of(gm, bias))


def tensor_name_counts(gm: fx.GraphModule) -> dict[int, int]:
    """How many get_attr targets name each tensor (tied weights are named more than once)."""
    first: dict[str, fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            first.setdefault(n.target, n)
    counts: dict[int, int] = {}
    for node in first.values():
        key = id(get_attr_tensor(gm, node))
        counts[key] = counts.get(key, 0) + 1
    return counts


def shared_weight(gm: fx.GraphModule, node: fx.Node, name_counts: dict[int, int]) -> bool:
    """The weight is read elsewhere too (a tied embedding, a reused projection): not shardable alone."""
    weight = node.args[1]
    return len(weight.users) > 1 or name_counts.get(id(get_attr_tensor(gm, weight)), 1) > 1


def _reach(nodes: Iterable[fx.Node], step) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = deque(nodes)
    while todo:
        for m in step(todo.popleft()):
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def descendants(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    return _reach(nodes, lambda n: n.users)


def ancestors(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    return _reach(nodes, lambda n: n.all_input_nodes)


@dataclass
class Branch:
    """One residual block: the nodes between the stream value ``start`` and the ``add`` closing it."""

    index: int
    start: fx.Node
    end: fx.Node
    nodes: list[fx.Node] = field(default_factory=list)  # in graph order, so plans and messages are stable

    @property
    def linears(self) -> list[fx.Node]:
        return [n for n in self.nodes if is_linear(n)]

    def openings(self) -> list[fx.Node]:
        lins = set(self.linears)
        return [n for n in self.linears if not (ancestors([n]) & lins)]

    def closings(self) -> list[fx.Node]:
        lins = set(self.linears)
        return [n for n in self.linears if not (descendants([n]) & lins)]

    def has_op(self, op) -> list[fx.Node]:
        return [n for n in self.nodes if n.op == "call_function" and n.target is op]


def embedding(gm: fx.GraphModule) -> Optional[fx.Node]:
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is aten.embedding.default:
            return n
    return None


def _next_residual_add(start: fx.Node) -> Optional[fx.Node]:
    """The nearest ``add`` (breadth first) of two tensors shaped like the stream, both computed
    from ``start``: the add that closes the block hanging off ``start``."""
    shape = static_shape_or_sym(start)
    seen = {start}
    todo = deque([start])
    while todo:
        n = todo.popleft()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            if (u.op == "call_function" and u.target is aten.add.Tensor and static_shape_or_sym(u) == shape
                    and all(isinstance(a, fx.Node) for a in u.args[:2])
                    and all(a is start or start in ancestors([a]) for a in u.args[:2])):
                return u
            todo.append(u)
    return None


def static_shape_or_sym(node) -> Optional[tuple]:
    v = val(node)
    return None if v is None else tuple(str(s) for s in v.shape)


def residual_branches(gm: fx.GraphModule) -> list[Branch]:
    """The graph's residual blocks in order (empty if there is no embedding to start from)."""
    start = embedding(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    branches: list[Branch] = []
    while start is not None:
        end = _next_residual_add(start)
        if end is None:
            break
        nodes = (ancestors([end]) & descendants([start])) - {start, end}
        branches.append(Branch(len(branches), start, end, sorted(nodes, key=order.__getitem__)))
        start = end
    return branches


def module_path(param_fqn: str) -> str:
    return param_fqn.rpartition(".")[0]
