"""Build the sharding plan from the sources, in priority order; the first claim on a node wins.

- ``manual``: ``manual_config.tp_plan`` (module-path patterns with ``*`` -> strategy);
- ``factory``: the HF config's ``base_model_tp_plan`` (HF's strategy names mapped to ours);
- ``heuristic``: from the graph, along ``sharding_dims`` (tp, ep, bmm, ssm).
A config plan claims whole layers: the openings of a residual branch ``colwise`` (``mamba`` for a
Mamba in_proj) with its closing linear ``rowwise``, or single linears ``gather``/``replicate``.
Entries that would not shard a layer exactly are rejected with a warning and left to the next
source. Whatever no source claims stays whole, except that the heuristic (with ``tp``) simple-shards
the leftover linears (column split + all-gather).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import fx

from .graph import (Branch, descendants, is_linear, linear_of, module_path, param_of, residual_branches,
                    tensor_name_counts)
from .layers import bmm_shard, moe_shard, replicate_linear, simple_shard, tp_layer
from .layout import LayoutError
from .plan import Claim, Plan, Replicate
from .region import Unsupported

log = logging.getLogger("autodeploy.sharding")
aten = torch.ops.aten
ad = torch.ops.autodeploy

PLAN_STRATEGIES = ("colwise", "rowwise", "mamba", "gather", "replicate")
# HF tp_plan values (transformers' base_model_tp_plan) -> ours; others (experts, norms, embeddings) are not linears
HF_STRATEGIES = {"colwise": "colwise", "rowwise": "rowwise", "colwise_rep": "gather", "packed_colwise": "colwise",
                 "replicate": "replicate", "local": "replicate"}


@dataclass
class ShardingOptions:
    """The fields of ``detect_sharding`` the plan depends on (see the transform's config)."""

    world_size: int
    simple_shard_only: bool = False
    sharding_source: list[str] = field(default_factory=lambda: ["manual", "factory", "heuristic"])
    support_partial_config: bool = True
    sharding_dims: list[str] = field(default_factory=lambda: ["tp", "ep", "bmm"])
    process_grid: Optional[Mapping[str, int]] = None
    manual_config: Optional[Mapping[str, Any]] = None
    factory_config: Optional[Mapping[str, Any]] = None  # {"head_dim": int, "tp_plan": {...}} from the model


def detect(gm: fx.GraphModule, opts: ShardingOptions) -> Plan:
    world = opts.world_size
    branches = residual_branches(gm)
    counts = tensor_name_counts(gm)
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
                for claim in _heuristic(gm, branches, opts, counts, claimed):
                    take(claim)
                continue
            config = opts.manual_config if source == "manual" else opts.factory_config
            for claim in _from_config(gm, branches, linears, config, source, opts, counts):
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
    return Plan(world, claims, param_bytes)


# ----- heuristic ---------------------------------------------------------------------------------


def _heuristic(gm, branches: list[Branch], opts: ShardingOptions, counts, claimed: set[str]) -> Iterable[Claim]:
    world, dims = opts.world_size, set(opts.sharding_dims)
    for branch in branches:
        if {n.name for n in branch.linears} & claimed:
            continue
        moes = branch.has_op(ad.moe.default)
        if moes:
            yield from _moe_claims(gm, branch, moes, opts)
            continue
        ssm = branch.has_op(ad.ssm_scan.default)
        if (ssm and "ssm" not in dims) or (not ssm and "tp" not in dims) or not branch.linears:
            continue
        try:
            yield tp_layer(gm, branch, world, "heuristic", counts)
        except (Unsupported, LayoutError) as e:
            log.info("layer %d: not split column/row (%s); its linears are simple-sharded", branch.index, e)
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


def _moe_claims(gm, branch: Branch, moes: list[fx.Node], opts: ShardingOptions) -> Iterable[Claim]:
    world, dims = opts.world_size, set(opts.sharding_dims)
    if "ep" in dims:
        ep, tp, ep_major = process_grid(opts.process_grid, world)
    elif "tp" in dims:
        ep, tp, ep_major = 1, world, True
    else:
        return
    for node in moes:
        try:
            yield moe_shard(gm, node, world, "heuristic", ep, tp, ep_major)
        except Unsupported as e:
            if ep == 1:
                log.warning("%s; its experts stay whole on every rank", e)
                continue
            log.warning("%s; splitting each expert over all ranks instead", e)
            try:
                yield moe_shard(gm, node, world, "heuristic", 1, world, True)
            except Unsupported as e2:
                log.warning("%s; its experts stay whole on every rank", e2)
    # the router is small and every rank needs all of its scores
    for lin in branch.linears:
        if any(lin in n.all_input_nodes or _feeds(lin, n) for n in moes):
            yield replicate_linear(linear_of(gm, lin), lin, "heuristic", "ep")


def _feeds(node: fx.Node, target: fx.Node) -> bool:
    return target in descendants([node])


def process_grid(grid: Optional[Mapping[str, int]], world: int) -> tuple[int, int, bool]:
    """(ep, tp, ep_major) for MoE layers; an invalid grid warns and gives 1-D EP over all ranks."""
    if not grid:
        return world, 1, True
    keys = list(grid)
    ep, tp = int(grid.get("ep", 1)), int(grid.get("tp", 1))
    if set(keys) - {"ep", "tp"} or ep * tp != world:
        log.warning("process_grid %s: ep (%d) x tp (%d) != world_size (%d); using 1-D expert parallelism over %d ranks",
                    dict(grid), ep, tp, world, world)
        return world, 1, True
    # the last key has stride one: {ep: 2, tp: 2} puts ranks [0,1] (one EP group) in one TP group
    return ep, tp, keys[-1] == "tp" or "ep" not in keys


# ----- manual / factory tp_plan ------------------------------------------------------------------


def _pattern(key: str) -> re.Pattern:
    return re.compile(".*" + ".*".join(re.escape(p) for p in key.split("*")) + ".*")


def match_plan(tp_plan: Mapping[str, str], module: str) -> Optional[tuple[str, str]]:
    """(key, strategy) of the first tp_plan key whose pattern matches ``module``."""
    for key, strategy in tp_plan.items():
        if _pattern(key).fullmatch(module):
            return key, strategy
    return None


def _from_config(gm, branches: list[Branch], linears: list[fx.Node], config: Optional[Mapping[str, Any]],
                 source: str, opts: ShardingOptions, counts) -> list[Claim]:
    if not config or not config.get("tp_plan"):
        return []
    plan = dict(config["tp_plan"])
    if source == "factory":
        plan = {k: HF_STRATEGIES[v] for k, v in plan.items() if v in HF_STRATEGIES}
    head_dim = config.get("head_dim")
    world = opts.world_size
    assigned: dict[fx.Node, str] = {}
    used_keys: set[str] = set()
    for n in linears:
        hit = match_plan(plan, module_path(linear_of(gm, n).weight.fqn))
        if hit is not None:
            assigned[n] = hit[1]
            used_keys.add(hit[0])
    if source == "manual":
        for key in plan:
            if key not in used_keys:
                log.warning("sharding manual_config.tp_plan: pattern %r matches no linear layer", key)
    if not opts.support_partial_config:
        uncovered = [n for b in branches for n in b.linears if n not in assigned]
        if uncovered:
            log.warning("sharding %s config does not cover every layer (e.g. %s) and support_partial_config is "
                        "false: it is not used", source, module_path(linear_of(gm, uncovered[0]).weight.fqn))
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
            names = ", ".join(sorted(module_path(linear_of(gm, n).weight.fqn) for n in mine))
            log.warning("sharding %s config rejected for %s: %s", source, names, e)
    for n, strategy in assigned.items():
        if n in in_layer:
            continue
        if strategy == "gather":
            claims.append(simple_shard(gm, n, world, source, counts))
        elif strategy == "replicate":
            claims.append(replicate_linear(linear_of(gm, n), n, source, "tp"))
        else:
            log.warning("sharding %s config: %s %s is not part of a layer it can split (it stays whole)",
                        source, module_path(linear_of(gm, n).weight.fqn), strategy)
    return claims


def _config_layer(gm, branch: Branch, mine: dict[fx.Node, str], world: int, source: str, counts, head_dim):
    openings, closings = branch.openings(), branch.closings()
    want_open = "mamba" if branch.has_op(ad.ssm_scan.default) else "colwise"
    allowed_open = ("mamba", "colwise") if want_open == "mamba" else ("colwise",)
    if set(mine) != set(openings) | set(closings) or any(mine[c] != "rowwise" for c in closings) \
            or any(mine[o] not in allowed_open for o in openings):
        describe = ", ".join(f"{module_path(linear_of(gm, n).weight.fqn)}={s}" for n, s in mine.items())
        raise Unsupported(f"it must split every opening {want_open} and the closing linear rowwise (got {describe})")
    return tp_layer(gm, branch, world, source, counts, head_dim=head_dim if want_open == "colwise" else None)
