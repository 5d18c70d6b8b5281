"""Node queries and graph edits used by the matchers.

Matchers walk the graph by hand (no pattern tracing), so they read literal constants (eps, scale,
slice bounds, head counts) from the graph instead of baking them into patterns. New nodes get a
``meta["val"]`` computed with the graph's fake mode, so a matcher can leave the graph with valid
shapes and the next transform needs no full shape propagation.
"""

from __future__ import annotations

import logging
import operator
from typing import Any, Callable, Iterable, Optional, Sequence, TypeVar

import torch
from torch import fx
from torch.fx.node import map_arg

from ..graph_utils import is_op as _is_op

log = logging.getLogger(__name__)
aten = torch.ops.aten
T = TypeVar("T")

# a slice end at or above this is "to the end" (export writes sys.maxsize)
SLICE_TO_END = 2**62

CAST_OPS = (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default)


def is_op(node: Any, ops: Any) -> bool:
    """``graph_utils.is_op`` that also accepts literals and None (matchers probe arbitrary args)."""
    return isinstance(node, fx.Node) and _is_op(node, ops)


def try_match(matcher: Callable[..., Optional[T]], node: fx.Node, *args: Any) -> Optional[T]:
    """Run a matcher on one node; an unexpected argument form (a node where a literal was
    expected, a missing value) means "no match", never a failed build."""
    try:
        return matcher(node, *args)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
        log.debug("%s gave up on %s: %s: %s", getattr(matcher, "__name__", matcher), node.name, type(e).__name__, e)
        return None


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """The argument of ``node`` given positionally at ``index`` or by keyword ``name``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def schema_arg(node: fx.Node, name: str, default: Any = None) -> Any:
    """An argument of an OpOverload call by its schema name, positional or keyword."""
    if name in node.kwargs:
        return node.kwargs[name]
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        for i, a in enumerate(schema.arguments):
            if a.name == name:
                return node.args[i] if i < len(node.args) and not a.kwarg_only else default
    return default


def val(node: Any) -> Any:
    """The fake value recorded on a node (``None`` for literals and nodes without one)."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def ndim(node: Any) -> Optional[int]:
    v = val(node)
    return v.dim() if isinstance(v, torch.Tensor) else None


def dtype(node: Any) -> Optional[torch.dtype]:
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def same_size(a: Any, b: Any) -> bool:
    """Equal sizes without adding shape guards: ints compare by value, SymInts by expression."""
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
            return a.node.expr == b.node.expr
        return False
    return a == b


def same_shape(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def static_size(size: Any) -> Optional[int]:
    """The size as a plain int, or None when it is symbolic."""
    if isinstance(size, int):
        return size
    if isinstance(size, torch.SymInt):
        try:
            return int(size.node.expr)
        except TypeError:
            return None
    return None


def norm_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def is_last_dim(dim: Any, rank: Optional[int]) -> bool:
    return isinstance(dim, int) and rank is not None and norm_dim(dim, rank) == rank - 1


def literal_float(x: Any) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def single_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def getitem_source(node: Any, index: int, op: Any) -> Optional[fx.Node]:
    """If ``node`` is ``getitem(op(...), index)`` return the op node."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem:
        src, i = node.args
        if i == index and isinstance(src, fx.Node) and is_op(src, op):
            return src
    return None


def commutative_operands(node: fx.Node) -> list[tuple[Any, Any]]:
    a, b = node.args[0], node.args[1]
    return [(a, b), (b, a)]


def node_order(graph: fx.Graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def fake_mode_of(gm: fx.GraphModule):
    """The fake mode of the graph inputs' values (the one shape propagation uses), if any."""
    from torch._guards import detect_fake_mode

    for kinds in (("placeholder",), ("get_attr",)):
        vals = [n.meta.get("val") for n in gm.graph.nodes if n.op in kinds]
        vals = [v for v in vals if isinstance(v, torch.Tensor)]
        if vals:
            return detect_fake_mode(vals)
    return None


def set_fake_val(node: fx.Node, fake_mode) -> None:
    """Compute ``node.meta["val"]`` from its inputs' values with the graph's fake mode."""
    if fake_mode is None:
        raise RuntimeError("the graph has no fake values to compute new ones from")
    from torch._dispatch.python import enable_python_dispatcher

    args = map_arg(node.args, lambda n: n.meta["val"])
    kwargs = map_arg(node.kwargs, lambda n: n.meta["val"])
    with fake_mode, enable_python_dispatcher():  # symbolic-shape-safe decompositions (see run_shape_prop)
        node.meta["val"] = node.target(*args, **kwargs)


class GraphEditor:
    """Inserts call_function nodes (with fake values) and replaces matched subgraphs."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.graph = gm.graph
        self.fake_mode = fake_mode_of(gm)
        # False once a new node could not get a value: the transform then reports stale shapes
        self.shapes_valid = self.fake_mode is not None

    def call(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        """Insert at the graph's current insertion point (use ``graph.inserting_before``)."""
        node = self.graph.call_function(target, args, kwargs)
        try:
            set_fake_val(node, self.fake_mode)
        except Exception:  # noqa: BLE001 - an input without a value, or values of another fake mode
            self.shapes_valid = False  # the next transform that needs shapes re-propagates them
        return node

    def replace(self, old: fx.Node, new: fx.Node) -> None:
        old.replace_all_uses_with(new)
        if "nn_module_stack" in old.meta and "nn_module_stack" not in new.meta:
            new.meta["nn_module_stack"] = old.meta["nn_module_stack"]

    def erase_unused(self, nodes: Iterable[fx.Node]) -> None:
        """Erase the given nodes that no longer have users (also in-place ops that DCE keeps)."""
        order = node_order(self.graph)
        for node in sorted(set(nodes), key=lambda n: order.get(n, -1), reverse=True):
            if node.graph is self.graph and not node.users and node.op == "call_function":
                self.graph.erase_node(node)
