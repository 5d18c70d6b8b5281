"""Build the sharding plan from the sources, in priority order; the first claim on a node wins.

- ``manual``: ``manual_config.tp_plan`` (module-path patterns -> strategy, see ``pattern_matches``);
- ``factory``: the HF config's ``base_model_tp_plan`` (HF's strategy names mapped to ours);
- ``heuristic``: from the graph, along ``sharding_dims`` (tp, ep, bmm, ssm).
A config plan claims whole layers: the openings of a residual branch ``colwise`` (``mamba`` for a
Mamba in_proj) with its closing linear ``rowwise``, or single linears ``gather``/``replicate``.
Entries that would not shard a layer exactly are rejected with a warning and left to the next
source. Whatever no source claims stays whole, except that the heuristic (with ``tp``) simple-shards
the leftover linears (column split + all-gather). Why a layer ended up as it did is collected in
``Plan.notes``, a message that repeats per layer once with its count.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import fx

from .graph import (Branch, descendants, is_linear, linear_of, module_path, param_of, residual_branches,
                    tensor_name_counts)
from .layers import bmm_shard, moe_shard, replicate_linear, simple_shard, tp_layer
from .layout import LayoutError
from .plan import Claim, Plan, Replicate, expert_rank_groups
from .region import Unsupported

aten = torch.ops.aten
ad = torch.ops.autodeploy

PLAN_STRATEGIES = ("colwise", "rowwise", "mamba", "gather", "replicate")
# HF tp_plan values (transformers' base_model_tp_plan) -> ours; others (experts, norms, embeddings) are not linears
HF_STRATEGIES = {"colwise": "colwise", "rowwise": "rowwise", "colwise_rep": "gather", "packed_colwise": "colwise",
                 "replicate": "replicate", "local": "replicate"}


@dataclass
class ShardingOptions:
    """The fields of ``detect_sharding`` the plan depends on (their defaults: the transform's ShardingConfig)."""

    world_size: int
    simple_shard_only: bool
    sharding_source: list[str]
    support_partial_config: bool
    sharding_dims: list[str]
    process_grid: Optional[Mapping[str, int]]
    manual_config: Optional[Mapping[str, Any]]
    factory_config: Optional[Mapping[str, Any]]  # {"head_dim": int, "tp_plan": {...}} from the model


class Notes:
    """Messages about the plan; one that repeats per layer (it differs only in layer indices and the
    numbered node names of each layer) is kept once, with a count."""

    def __init__(self) -> None:
        self._counts: dict[tuple[int, str], int] = {}

    def add(self, level: int, message: str) -> None:
        key = (level, _per_layer(message))
        self._counts[key] = self._counts.get(key, 0) + 1

    def lines(self) -> list[tuple[int, str]]:
        counts = dict(self._counts)
        # the first layer's nodes are unnumbered ("view", then "view_5", ...): fold it into the rest
        for level, msg in list(counts):
            for word in set(re.findall(r"\b[a-z][a-z0-9_]*\b", msg)):
                other = (level, re.sub(rf"\b{word}\b(?!_\*)", f"{word}_*", msg))
                if other != (level, msg) and other in counts and (level, msg) in counts:
                    counts[other] += counts.pop((level, msg))
        return [(level, msg + (f" ({n} times)" if n > 1 else "")) for (level, msg), n in counts.items()]


def _per_layer(message: str) -> str:
    message = re.sub(r"(?<=\.)\d+(?=\.|\b)", "*", message)  # model.layers.7.mlp -> model.layers.*.mlp
    return re.sub(r"\b([a-z][a-z0-9_]*?)_\d+\b", r"\1_*", message)  # view_5 -> view_*


def detect(gm: fx.GraphModule, opts: ShardingOptions) -> Plan:
    world = opts.world_size
    missing = next((n for n in gm.graph.nodes if n.op == "call_function" and "val" not in n.meta), None)
    if missing is not None:  # the plan reads every tensor's shape
        raise ValueError(f"detect_sharding needs every node's shape, and {missing.name} has none: an earlier "
                         f"transform left the shapes stale and requires_shape_prop is false")
    branches = residual_branches(gm)
    counts = tensor_name_counts(gm)
    notes = Notes()
    claims: list[Claim] = []
    claimed: set[str] = set()

    def take(claim: Claim) -> bool:
        if claim.nodes & claimed:
            return False
        claims.append(claim)
        claimed.update(claim.nodes)
        return True

    linears = [n for n in gm.graph.nodes if is_linear(n)]
    if opts.simple_shard_only:
        for n in linears:
            take(simple_shard(gm, n, world, "heuristic", counts))
    else:
        for source in opts.sharding_source:
            if source == "heuristic":
                for claim in _heuristic(gm, branches, opts, counts, claimed, notes):
                    take(claim)
                continue
            config = opts.manual_config if source == "manual" else opts.factory_config
            for claim in _from_config(gm, branches, linears, config, source, opts, counts, notes):
                take(claim)
    # everything else stays whole; listed so the plan shows every weight
    for n in gm.graph.nodes:
        if n.name in claimed:
            continue
        if is_linear(n):
            take(replicate_linear(linear_of(gm, n), n, "heuristic", "tp"))
        elif n.op == "call_function" and n.target is ad.moe.default:
            params = [p for p in (param_of(gm, n.args[3]), param_of(gm, n.args[4])) if p is not None]
            take(Replicate(source="heuristic", dim="ep", nodes=frozenset([n.name]), params=params,
                           target=params[0].module if params else n.name))
    param_bytes = {name: t.numel() * t.element_size() for name, t in gm.named_parameters(remove_duplicate=True)}
    # replicas asked for: the manual plan keeps every linear whole itself (sharding=replicate)
    manual = (opts.manual_config or {}).get("tp_plan") or {}
    linear_names = {n.name for n in linears}
    on_purpose = ("manual" in opts.sharding_source and not opts.simple_shard_only and "replicate" in manual.values()
                  and all(isinstance(c, Replicate) and c.source == "manual" for c in claims if c.nodes & linear_names))
    return Plan(world, claims, param_bytes, notes.lines(), on_purpose)


def branch_name(gm: fx.GraphModule, branch: Branch) -> str:
    """The module path its linears share (``model.layers.3.self_attn``), for messages."""
    paths = [module_path(linear_of(gm, n).weight.fqn).split(".") for n in branch.linears]
    common = []
    for parts in zip(*paths):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return ".".join(common) or f"block {branch.index}"


# ----- heuristic ---------------------------------------------------------------------------------


def _heuristic(gm, branches: list[Branch], opts: ShardingOptions, counts, claimed: set[str],
               notes: Notes) -> Iterable[Claim]:
    world, dims = opts.world_size, set(opts.sharding_dims)
    for branch in branches:
        if {n.name for n in branch.linears} & claimed:
            continue
        moes = branch.has_op(ad.moe.default)
        if moes:
            yield from _moe_claims(gm, branch, moes, opts, notes)
            continue
        ssm = branch.has_op(ad.ssm_scan.default)
        if (ssm and "ssm" not in dims) or (not ssm and "tp" not in dims) or not branch.linears:
            continue
        try:
            yield tp_layer(gm, branch, world, "heuristic", counts)
        except (Unsupported, LayoutError) as e:
            notes.add(logging.INFO, f"{branch_name(gm, branch)}: not split column/row ({e}); its linears are "
                                    f"gathered where their outputs divide by {world}, else kept whole")
    if "bmm" in dims:
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is aten.bmm.default:
                claim = bmm_shard(gm, n, world, "heuristic")
                if claim is not None:
                    yield claim
    if "tp" in dims:  # leftovers (lm_head, shared experts, layers that could not be split exactly)
        for n in gm.graph.nodes:
            if is_linear(n) and n.name not in claimed:
                yield simple_shard(gm, n, world, "heuristic", counts)


def _moe_claims(gm, branch: Branch, moes: list[fx.Node], opts: ShardingOptions, notes: Notes) -> Iterable[Claim]:
    world, dims = opts.world_size, set(opts.sharding_dims)
    if "ep" in dims:
        ep, tp, ep_major = process_grid(opts.process_grid, world, notes)
    elif "tp" in dims:
        ep, tp, ep_major = 1, world, True
    else:
        return
    for node in moes:
        try:
            yield moe_shard(gm, node, world, "heuristic", ep, tp, ep_major)
        except Unsupported as e:
            if ep == 1:
                notes.add(logging.WARNING, f"{e}; its experts stay whole on every rank")
                continue
            notes.add(logging.WARNING, f"{e}; splitting each expert over all ranks instead")
            try:
                yield moe_shard(gm, node, world, "heuristic", 1, world, True)
            except Unsupported as e2:
                notes.add(logging.WARNING, f"{e2}; its experts stay whole on every rank")
    # the router is small and every rank needs all of its scores
    for lin in branch.linears:
        if any(lin in n.all_input_nodes or _feeds(lin, n) for n in moes):
            yield replicate_linear(linear_of(gm, lin), lin, "heuristic", "ep")


def _feeds(node: fx.Node, target: fx.Node) -> bool:
    return target in descendants([node])


def grid_problem(grid: Optional[Mapping[str, int]], world: int) -> Optional[str]:
    """Why ``process_grid`` cannot be used at ``world`` ranks (the seed's rule: then 1-D EP), or None."""
    if not grid:
        return None
    ep, tp = int(grid.get("ep", 1)), int(grid.get("tp", 1))
    if set(grid) - {"ep", "tp"} or ep * tp != world:
        return (f"process_grid {dict(grid)}: ep ({ep}) x tp ({tp}) != world_size ({world}); MoE layers use "
                f"1-D expert parallelism over {world} ranks instead")
    return None


def process_grid(grid: Optional[Mapping[str, int]], world: int, notes: Optional[Notes] = None) -> tuple[int, int, bool]:
    """(ep, tp, ep_major) for MoE layers; an invalid grid is noted and gives 1-D EP over all ranks."""
    if not grid:
        return world, 1, True
    problem = grid_problem(grid, world)
    if problem:
        if notes is not None:
            notes.add(logging.WARNING, problem)
        return world, 1, True
    keys = list(grid)
    # the last key has stride one: {ep: 2, tp: 2} puts ranks [0,1] (one EP group) in one TP group
    return int(grid.get("ep", 1)), int(grid.get("tp", 1)), keys[-1] == "tp" or "ep" not in keys


def describe_grid(grid: Optional[Mapping[str, int]], world: int, dims: Iterable[str]) -> str:
    """How MoE layers will be laid out over the ranks, from the options alone (for --dry-run)."""
    dims = set(dims)
    if "ep" not in dims:
        return f"MoE layers: each expert split over all {world} ranks (tensor parallel; no ep in sharding_dims)" \
            if "tp" in dims else "MoE layers: kept whole (neither ep nor tp in sharding_dims)"
    problem = grid_problem(grid, world)
    ep, tp, ep_major = process_grid(grid, world)
    groups = " | ".join(",".join(map(str, ranks)) for ranks in expert_rank_groups(ep, tp, ep_major))
    text = (f"MoE layers: ep {ep} x tp {tp}, experts divided among {ep} rank groups ({groups})"
            + (f", each expert split over the {tp} ranks of its group" if tp > 1 else ""))
    return f"{problem}. {text}" if problem else text


# ----- manual / factory tp_plan ------------------------------------------------------------------


def _component(glob: str) -> re.Pattern:
    return re.compile("[^.]*".join(re.escape(part) for part in glob.split("*")))


def pattern_matches(pattern: str, module: str) -> bool:
    """A tp_plan key names the last components of a module path: its dot-separated components match
    the path's last ones, one to one, where ``*`` stands for any characters within one component
    (never a dot). So HF's ``layers.*.self_attn.q_proj`` (keys relative to the base model) matches
    ``model.layers.0.self_attn.q_proj``, and ``up_proj`` matches ``mlp.up_proj`` but not
    ``mlp.gate_up_proj`` (``*up_proj`` matches both)."""
    want, path = pattern.split("."), module.split(".")
    return len(want) <= len(path) and all(
        _component(w).fullmatch(p) for w, p in zip(want, path[len(path) - len(want):]))


def match_plan(tp_plan: Mapping[str, str], module: str) -> Optional[tuple[str, str]]:
    """(key, strategy) of the first tp_plan key whose pattern matches ``module``."""
    for key, strategy in tp_plan.items():
        if pattern_matches(key, module):
            return key, strategy
    return None


def linear_kinds(gm, branches: list[Branch]) -> dict[fx.Node, str]:
    """Each linear's role, which decides the strategy it can take: a layer's opening (reads the
    residual stream), a Mamba in_proj, its closing linear (writes it back), a linear in between,
    or one outside the layers (lm_head)."""
    kinds = {n: "outside the layers" for n in gm.graph.nodes if is_linear(n)}
    for b in branches:
        openings, closings = set(b.openings()), set(b.closings())
        for n in b.linears:
            if n in openings and n in closings:
                kinds[n] = "a layer's only linear"
            elif n in openings:
                kinds[n] = "Mamba in_proj" if b.has_op(ad.ssm_scan.default) else "opening"
            else:
                kinds[n] = "closing" if n in closings else "inside a layer"
    return kinds


def _from_config(gm, branches: list[Branch], linears: list[fx.Node], config: Optional[Mapping[str, Any]],
                 source: str, opts: ShardingOptions, counts, notes: Notes) -> list[Claim]:
    if not config or not config.get("tp_plan"):
        return []
    plan = dict(config["tp_plan"])
    if source == "factory":
        plan = {k: HF_STRATEGIES[v] for k, v in plan.items() if v in HF_STRATEGIES}
    head_dim = config.get("head_dim")
    world = opts.world_size
    assigned: dict[fx.Node, str] = {}
    hits: dict[str, list[fx.Node]] = {key: [] for key in plan}
    for n in linears:
        hit = match_plan(plan, module_path(linear_of(gm, n).weight.fqn))
        if hit is not None:
            assigned[n] = hit[1]
            hits[hit[0]].append(n)
    if source == "manual":
        kinds = linear_kinds(gm, branches)
        for key, nodes in hits.items():
            if not nodes:
                notes.add(logging.WARNING, f"sharding manual_config.tp_plan: pattern {key!r} matches no linear layer")
            by_kind: dict[str, str] = {}
            for n in nodes:
                by_kind.setdefault(kinds[n], module_path(linear_of(gm, n).weight.fqn))
            if len(by_kind) > 1 and plan[key] in ("colwise", "rowwise", "mamba"):  # gather/replicate suit any linear
                found = ", ".join(f"{kind} ({example}, ...)" for kind, example in by_kind.items())
                notes.add(logging.WARNING, f"sharding manual_config.tp_plan: pattern {key!r} ({plan[key]}) matches "
                                           f"linears of different kinds: {found}; one strategy rarely suits both")
    if not opts.support_partial_config:
        uncovered = [n for b in branches for n in b.linears if n not in assigned]
        if uncovered:
            notes.add(logging.WARNING, f"sharding {source} config does not cover every layer (e.g. "
                                       f"{module_path(linear_of(gm, uncovered[0]).weight.fqn)}) and "
                                       f"support_partial_config is false: it is not used")
            return []
    claims: list[Claim] = []
    in_layer: set[fx.Node] = set()
    for branch in branches:
        mine = {n: assigned[n] for n in branch.linears if n in assigned and assigned[n] in ("colwise", "rowwise", "mamba")}
        if not mine:
            continue
        in_layer.update(mine)
        try:
            claims.append(_config_layer(gm, branch, mine, world, source, counts, head_dim))
        except (Unsupported, LayoutError) as e:
            names = ", ".join(module_path(linear_of(gm, n).weight.fqn).rpartition(".")[2] for n in mine)
            notes.add(logging.WARNING, f"sharding {source} config rejected for {branch_name(gm, branch)} ({names}): {e}")
    for n, strategy in assigned.items():
        if n in in_layer:
            continue
        if strategy == "gather":
            claims.append(simple_shard(gm, n, world, source, counts))
        elif strategy == "replicate":
            claims.append(replicate_linear(linear_of(gm, n), n, source, "tp"))
        else:
            notes.add(logging.WARNING, f"sharding {source} config: {module_path(linear_of(gm, n).weight.fqn)} "
                                       f"{strategy} is not part of a layer it can split (it stays whole)")
    return claims


def _config_layer(gm, branch: Branch, mine: dict[fx.Node, str], world: int, source: str, counts, head_dim):
    openings, closings = branch.openings(), branch.closings()
    want_open = "mamba" if branch.has_op(ad.ssm_scan.default) else "colwise"
    allowed_open = ("mamba", "colwise") if want_open == "mamba" else ("colwise",)
    if set(mine) != set(openings) | set(closings) or any(mine[c] != "rowwise" for c in closings) \
            or any(mine[o] not in allowed_open for o in openings):
        describe = ", ".join(f"{module_path(linear_of(gm, n).weight.fqn)}={s}" for n, s in mine.items())
        raise Unsupported(f"it must split every opening {want_open} and the closing linear rowwise (got {describe})")
    attention = branch.has_op(ad.attention.default)
    if head_dim is not None and attention:
        graph_dim = int(attention[0].args[0].meta["val"].shape[-1])
        if head_dim != graph_dim:
            what = "manual_config.head_dim" if source == "manual" else "the model config's head_dim"
            raise Unsupported(f"{what} is {head_dim} but the graph's attention heads are {graph_dim} wide; "
                              f"set it to {graph_dim} or leave it out")
    return tp_layer(gm, branch, world, source, counts)
