"""Regional compile: the graph cut at its cache ops, every distinct region compiled once.

A decoder repeats one layer: between two cache ops (cached attention, SSM state) the same code
runs on other weights. ``torch.compile`` of the whole graph traces and lowers every layer again
(docs/performance-history.md#regional-compile-h200-2026-11-30). ``cut_regions`` cuts the graph before and
after every op that takes a cache tensor; each run of nodes between two cuts becomes a region,
a GraphModule in a canonical form: its inputs (weights included) are placeholders in order of
first use, its nodes named by position. Regions that compute the same thing then have the same
code, and one ``CompiledRegion`` serves all of them (the 8B model: 33 regions, 3 distinct). The cache ops stay in the outer graph, which runs as plain FX: inductor calls them as
opaque kernels anyway, so no fusion is lost at a cut.

A region's inputs are tensors only: a size it reads from outside (``sym_size`` of the graph's
inputs, at the top of the exported graph) is read again inside the region from a tensor input
that has it (``meta["val"]``). Its batch dims are marked like ``CompiledGraph``'s (``compiles=two``:
tokens backed, sequences unbacked): the graph's batch inputs by name, other tensors at every dim
whose symbolic size is the token count of ``input_ids``. A graph without that shape information,
or one with no region that repeats, is left whole (``cut_regions`` returns None).
"""

from __future__ import annotations

import logging
import operator
from typing import Callable, Iterator, Optional

import torch
from torch import fx, nn

from .cudagraph import BATCHED_INPUTS, TOKEN_INPUTS

log = logging.getLogger(__name__)

# (region input, dim, source): source is the graph input's name for a batch input of the graph,
# "tokens" for another tensor (its dim has the token count of input_ids)
Mark = tuple[int, int, str]


class CompiledRegion(nn.Module):
    """``torch.compile`` of a region's template, its batch dims marked on every call (compiling
    is lazy, and a recompile must see the marks too). ``mark(source, tensor, dim)`` marks one dim."""

    def __init__(self, template: fx.GraphModule, marks: list[Mark], mark: Callable[[str, torch.Tensor, int], None]):
        super().__init__()
        self.template = template
        self.marks = marks
        self._mark = mark
        self.compiled = torch.compile(template)
        self.num_uses = 0  # call sites in the outer graph

    def forward(self, *args):
        for index, dim, source in self.marks:
            self._mark(source, args[index], dim)
        return self.compiled(*args)


def _is_cache_op(node: fx.Node) -> bool:
    """A call that reads a graph input other than the batch inputs: a cache (or state) tensor."""
    return node.op == "call_function" and any(
        a.op == "placeholder" and a.target not in BATCHED_INPUTS for a in node.all_input_nodes
    )


def _stays_outside(node: fx.Node) -> bool:
    if node.op in ("placeholder", "get_attr", "output") or _is_cache_op(node):
        return True
    # the parts of a cache op's tuple result
    return node.target is operator.getitem and isinstance(node.args[0], fx.Node) and _is_cache_op(node.args[0])


def _segments(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Runs of nodes between the cache ops (placeholders and weights in between do not cut)."""
    segments, current = [], []
    for node in gm.graph.nodes:
        if not _stays_outside(node):
            current.append(node)
        elif _is_cache_op(node) and current:
            segments.append(current)
            current = []
    if current:
        segments.append(current)
    return segments


def _sym_expr(size) -> object:
    return size.node.expr if isinstance(size, torch.SymInt) else size


class _Cut:
    """One segment as a canonical region: ``template``, ``inputs`` (outer tensor nodes),
    ``outputs`` (its nodes used outside), ``marks`` and a ``key`` equal for equal regions."""

    def __init__(self, nodes: list[fx.Node], token_expr: object, in_regions: set[fx.Node]):
        inside = set(nodes)
        outside_inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside))
        self.inputs = [a for a in outside_inputs if isinstance(a.meta.get("val"), torch.Tensor)]
        sizes = [a for a in outside_inputs if a not in self.inputs]
        self.outputs = []
        for n in nodes:
            users = [u for u in n.users if u not in inside]
            if isinstance(n.meta.get("val"), torch.Tensor):
                if users:
                    self.outputs.append(n)
            elif any(u not in in_regions for u in users):  # a size other regions read again themselves
                raise _Uncut(f"{n.name} ({type(n.meta.get('val')).__name__}) leaves a region for the outer graph")
        if any(n.op == "call_module" for n in nodes):
            raise _Uncut("a call_module node")
        self.marks = self._marks(token_expr)
        graph = fx.Graph()
        env: dict[fx.Node, object] = {a: graph.placeholder(f"x{i}") for i, a in enumerate(self.inputs)}
        for a in sizes:
            env[a] = self._size_from_inputs(graph, env, a)
        for n in nodes:  # auto names (from the target and position): equal regions, equal code
            env[n] = graph.create_node(n.op, n.target, fx.node.map_arg(n.args, env.__getitem__),
                                       fx.node.map_arg(n.kwargs, env.__getitem__))
        graph.output(tuple(env[n] for n in self.outputs))
        self.template = fx.GraphModule(nn.Module(), graph)
        marked = {(i, d): source for i, d, source in self.marks}
        shapes = tuple(
            (str(a.meta["val"].dtype),
             tuple(marked.get((i, d), s if isinstance(s, int) else "?") for d, s in enumerate(a.meta["val"].shape)))
            for i, a in enumerate(self.inputs)
        )
        self.key = (self.template.code, shapes)

    def _marks(self, token_expr) -> list[Mark]:
        marks = []
        for i, a in enumerate(self.inputs):
            if a.op == "placeholder" and a.target in BATCHED_INPUTS:
                marks.append((i, 1 if a.target in TOKEN_INPUTS else 0, a.target))
                continue
            marks += [(i, d, "tokens") for d, s in enumerate(a.meta["val"].shape) if _sym_expr(s) == token_expr]
        return marks

    def _size_from_inputs(self, graph: fx.Graph, env: dict, node: fx.Node):
        """A size the region reads from outside, read again from a tensor input that has it."""
        val = node.meta.get("val")
        if isinstance(val, int):
            return val
        if not isinstance(val, torch.SymInt):
            raise _Uncut(f"{node.name} ({type(val).__name__}) enters a region")
        expr = _sym_expr(val)
        if getattr(expr, "is_number", False):
            return int(expr)
        for a in self.inputs:
            for d, s in enumerate(a.meta["val"].shape):
                if _sym_expr(s) == expr:
                    return graph.call_function(torch.ops.aten.sym_size.int, (env[a], d))
        raise _Uncut(f"no input of the region has the size {node.name} = {expr}")


class _Uncut(Exception):
    pass


def cut_regions(gm: fx.GraphModule, make_region: Callable[[fx.GraphModule, list[Mark]], nn.Module]) -> Optional[str]:
    """Rewrites ``gm`` in place: every region becomes a ``call_module`` of the ``make_region(template,
    marks)`` made for its kind (one per distinct region). Returns a one-line summary, or None (and
    ``gm`` untouched) when the graph has no shape information or no region repeats."""
    placeholders = {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}
    ids = placeholders.get("input_ids")
    val = ids.meta.get("val") if ids is not None else None
    if not isinstance(val, torch.Tensor) or val.dim() != 2 or not isinstance(val.shape[1], torch.SymInt):
        log.info("regional compile: no symbolic input_ids shape in the graph; compiling it whole")
        return None
    segments = _segments(gm)
    try:
        in_regions = {n for nodes in segments for n in nodes}
        cuts = [_Cut(nodes, _sym_expr(val.shape[1]), in_regions) for nodes in segments]
    except _Uncut as e:
        log.info("regional compile: %s; compiling the graph whole", e)
        return None
    kinds: dict[object, int] = {}
    for cut in cuts:
        kinds.setdefault(cut.key, len(kinds))
    if len(kinds) == len(cuts):
        log.info("regional compile: no region repeats (%d regions); compiling the graph whole", len(cuts))
        return None
    regions: dict[int, nn.Module] = {}
    sizes: dict[int, int] = {}  # region kind -> its number of nodes
    replaced: dict[fx.Node, fx.Node] = {}  # a region's output -> the getitem of its call
    for nodes, cut in zip(segments, cuts):
        index = kinds[cut.key]
        if index not in regions:
            regions[index], sizes[index] = make_region(cut.template, cut.marks), len(nodes)
            gm.add_submodule(f"region_{index}", regions[index])
        regions[index].num_uses += 1
        inside = set(nodes)
        with gm.graph.inserting_after(nodes[-1]):  # after every input of the region
            prev = call = gm.graph.call_module(f"region_{index}", tuple(replaced.get(a, a) for a in cut.inputs))
        for j, out in enumerate(cut.outputs):
            with gm.graph.inserting_after(prev):
                prev = replaced[out] = gm.graph.call_function(operator.getitem, (call, j))
            out.replace_all_uses_with(prev, delete_user_cb=lambda user: user not in inside)
    for nodes in reversed(segments):
        for node in reversed(nodes):
            gm.graph.erase_node(node)
    _flatten_weights(gm)
    gm.graph.lint()
    gm.recompile()
    uses = ", ".join(f"{sizes[i]} nodes x{r.num_uses}" for i, r in regions.items())
    return f"{len(cuts)} regions, {len(regions)} distinct ({uses})"


def _flatten_weights(gm: fx.GraphModule) -> None:
    """Every ``get_attr`` of the outer graph reads a plain attribute of ``gm`` itself. The outer
    graph runs as Python on every step and fetches each weight for the regions: through the
    module tree (``model.layers.3.mlp.down_proj.weight``) that held a prefill's first kernel back
    (the GPU idle meanwhile), as an instance attribute it costs next to nothing. The module tree keeps its parameters (state dict,
    ``parameters()``); the attributes are references to the same tensors, outside it."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and "." in node.target:
            name = f"_flat_{node.name}"
            object.__setattr__(gm, name, operator.attrgetter(node.target)(gm))  # not nn.Module.__setattr__: no second registration
            node.target = name


def nodes_through_regions(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, Callable[[object], object]]]:
    """Every node of ``gm``'s graph, a region call replaced by the nodes of its template, each
    with ``outer(arg)``: the node of ``gm`` an argument stands for (a template input: the call's
    argument; anything else: itself)."""
    for node in gm.graph.nodes:
        template = getattr(gm.get_submodule(node.target), "template", None) if node.op == "call_module" else None
        if not isinstance(template, fx.GraphModule):
            yield node, _same
            continue
        inputs = dict(zip((n for n in template.graph.nodes if n.op == "placeholder"), node.args))
        for inner in template.graph.nodes:
            if inner.op not in ("placeholder", "output"):
                yield inner, lambda arg, inputs=inputs: inputs.get(arg, arg)


def _same(arg: object) -> object:
    return arg


__all__ = ["CompiledRegion", "Mark", "cut_regions", "nodes_through_regions"]
