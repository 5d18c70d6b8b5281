"""The sharding plan: claims (what each layer becomes), the graph edits they mean on one rank, and
the visible plan rows.

``detect_sharding`` turns the graph into a list of claims; the first claim on a node wins, which
is how source priority (manual > factory > heuristic) works. A claim knows, for any rank, the
edits that shard it (``edits(rank, world)``), so the plan is computed once and can be printed,
sized per rank and saved without a process group (plan-only mode on meta).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..distributed.collectives import group_name
from ..units import human_bytes
from .layout import Layout, Part, local_ranges, local_size

SOURCES = ("manual", "factory", "heuristic")
DIMS = ("tp", "ep", "bmm", "ssm")


# ----- edits: what one rank does to its graph --------------------------------------------------


@dataclass(frozen=True)
class SliceParam:
    """Keep ``ranges`` of parameter ``fqn`` (``(dim, start, stop)``; several on one dim concatenate)."""

    fqn: str
    ranges: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class SetShapeDim:
    """A view/reshape's literal size at ``axis`` becomes ``value`` (the local size)."""

    node: str
    axis: int
    value: int


@dataclass(frozen=True)
class SetSplitSizes:
    node: str
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class DropBias:
    """A row-split linear keeps its bias on one rank of the group only (the sum adds it once)."""

    node: str


@dataclass(frozen=True)
class ShiftIds:
    """Expert ids ``arg`` of an MoE node minus ``offset``: ids of other ranks' experts fall out of
    ``[0, local experts)`` and the op gives them no weight."""

    node: str
    arg: int
    offset: int


@dataclass(frozen=True)
class SliceInput:
    """Argument ``arg`` of ``node`` narrowed to ``[start, stop)`` along ``dim`` (a BMM's activation)."""

    node: str
    arg: int
    dim: int
    start: int
    stop: int


@dataclass(frozen=True)
class Collective:
    """``all_reduce`` (sum) or ``all_gather`` along ``dim`` right after ``node``, over ``group``;
    ``bytes_per_token``: the full (reduced or gathered) result's size per token, for the summary."""

    node: str
    op: str
    group: str
    dim: int = -1
    bytes_per_token: int = 0

    def sent_per_token(self) -> float:
        """Bytes each rank of the group sends per token (ring algorithms)."""
        n = len(self.group.split(","))
        return (2 if self.op == "all_reduce" else 1) * (n - 1) / n * self.bytes_per_token


Edit = SliceParam | SetShapeDim | SetSplitSizes | DropBias | ShiftIds | SliceInput | Collective


# ----- the visible plan --------------------------------------------------------------------------


@dataclass
class PlanRow:
    target: str  # module path (or node name for ops without a module)
    strategy: str
    source: str
    dim: str
    bytes_per_rank: int  # the most any rank holds of this target's parameters
    ranks: str = ""  # MoE layers: which ranks hold which experts ("experts 0-1: ranks 0,1 | ..."); else all ranks

    def to_dict(self) -> dict:
        return {"target": self.target, "strategy": self.strategy, "source": self.source, "dim": self.dim,
                "bytes_per_rank": self.bytes_per_rank, "ranks": self.ranks}


@dataclass(frozen=True)
class Param:
    """A parameter a claim touches: its name, full shape and element size."""

    fqn: str
    shape: tuple[int, ...]
    itemsize: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    @property
    def module(self) -> str:
        return self.fqn.rpartition(".")[0] or self.fqn


def _sliced_bytes(param: Param, ranges: Sequence[tuple[int, int, int]]) -> int:
    shape = list(param.shape)
    by_dim: dict[int, int] = {}
    for dim, start, stop in ranges:
        by_dim[dim % len(shape)] = by_dim.get(dim % len(shape), 0) + stop - start
    for dim, size in by_dim.items():
        shape[dim] = size
    return math.prod(shape) * param.itemsize


@dataclass
class Claim(ABC):
    """One layer or op claimed by a source. Subclasses say how it is sharded on a rank."""

    source: str
    dim: str
    nodes: frozenset[str]  # the compute nodes it claims (linears, MoE/SSM/BMM ops)

    @abstractmethod
    def edits(self, rank: int, world: int) -> list[Edit]:
        """What ``rank`` does to its graph."""

    @abstractmethod
    def targets(self) -> list[tuple[str, str, list[Param]]]:
        """(target, strategy, params) rows of the plan."""

    def groups(self, world: int) -> set[str]:
        return {e.group for r in range(world) for e in self.edits(r, world) if isinstance(e, Collective)}

    def rows(self, world: int) -> list[PlanRow]:
        per_rank = [{e.fqn: e.ranges for e in self.edits(r, world) if isinstance(e, SliceParam)} for r in range(world)]
        rows = []
        for target, strategy, params in self.targets():
            worst = max(sum(_sliced_bytes(p, ranks[p.fqn]) if p.fqn in ranks else p.nbytes for p in params)
                        for ranks in per_rank)
            rows.append(PlanRow(target, strategy, self.source, self.dim, worst, self.ranks_text(world)))
        return rows

    def ranks_text(self, world: int) -> str:
        return ""


@dataclass
class Linear:
    node: str
    weight: Param
    bias: Optional[Param] = None


@dataclass
class RegionParam:
    """A parameter used inside a sharded region, sliced along ``dim`` like the tensor it meets."""

    param: Param
    dim: int
    layout: Layout


@dataclass
class TPLayer(Claim):
    """Column-split openings, one row-split closing linear, one all-reduce after it.

    ``views`` and ``splits`` are the region's literal sizes that depend on the split (head counts,
    group counts, split sizes); ``params`` are per-head/per-channel tensors used in the region.
    """

    group: tuple[int, ...] = ()
    colwise: list[tuple[Linear, Layout]] = field(default_factory=list)
    rowwise: Optional[tuple[Linear, Layout]] = None
    params: list[RegionParam] = field(default_factory=list)
    views: list[tuple[str, int, Layout]] = field(default_factory=list)  # (node, axis, layout of that axis)
    splits: list[tuple[str, tuple[Layout, ...]]] = field(default_factory=list)  # (node, layout of each piece)
    opening_strategy: str = "colwise"  # "mamba" for a Mamba mixer's in_proj

    def edits(self, rank: int, world: int) -> list[Edit]:
        size = len(self.group)
        r = self.group.index(rank)
        out: list[Edit] = []
        for lin, layout in self.colwise:
            rows = tuple((0, a, b) for a, b in local_ranges(layout, r, size))
            out.append(SliceParam(lin.weight.fqn, rows))
            if lin.bias is not None:
                out.append(SliceParam(lin.bias.fqn, rows))
        for rp in self.params:
            out.append(SliceParam(rp.param.fqn, tuple((rp.dim, a, b) for a, b in local_ranges(rp.layout, r, size))))
        for node, axis, layout in self.views:
            out.append(SetShapeDim(node, axis, local_size(layout, r, size)))
        for node, pieces in self.splits:
            out.append(SetSplitSizes(node, tuple(local_size(p, r, size) for p in pieces)))
        if self.rowwise is not None:
            lin, layout = self.rowwise
            out.append(SliceParam(lin.weight.fqn, tuple((1, a, b) for a, b in local_ranges(layout, r, size))))
            if lin.bias is not None and r != 0:
                out.append(DropBias(lin.node))
            out.append(Collective(lin.node, "all_reduce", group_name(self.group), bytes_per_token=_out_bytes(lin)))
        return out

    def targets(self):
        rows = [(lin.weight.module, self.opening_strategy, _params(lin)) for lin, _ in self.colwise]
        rows += [(rp.param.module, self.opening_strategy, [rp.param]) for rp in self.params]
        if self.rowwise is not None:
            rows.append((self.rowwise[0].weight.module, "rowwise", _params(self.rowwise[0])))
        return _merge_rows(rows)


@dataclass
class SimpleShard(Claim):
    """Split the output features evenly and all-gather them right after the linear."""

    group: tuple[int, ...] = ()
    linear: Optional[Linear] = None

    def edits(self, rank: int, world: int) -> list[Edit]:
        size, r, lin = len(self.group), self.group.index(rank), self.linear
        layout = (Part(lin.weight.shape[0]),)
        rows = tuple((0, a, b) for a, b in local_ranges(layout, r, size))
        out: list[Edit] = [SliceParam(lin.weight.fqn, rows)]
        if lin.bias is not None:
            out.append(SliceParam(lin.bias.fqn, rows))
        out.append(Collective(lin.node, "all_gather", group_name(self.group), dim=-1, bytes_per_token=_out_bytes(lin)))
        return out

    def targets(self):
        return [(self.linear.weight.module, "gather", _params(self.linear))]


def grid_coords(rank: int, ep: int, tp: int, ep_major: bool) -> tuple[int, int]:
    """(EP index, TP index) of ``rank`` in an ep x tp grid; the grid's last key has stride one."""
    return (rank // tp, rank % tp) if ep_major else (rank % ep, rank // ep)


def expert_rank_groups(ep: int, tp: int, ep_major: bool) -> list[list[int]]:
    """For each EP index, the ranks that hold its experts (each with its TP slice of them)."""
    return [[r for r in range(ep * tp) if grid_coords(r, ep, tp, ep_major)[0] == e] for e in range(ep)]


@dataclass
class MoEShard(Claim):
    """Experts split over EP groups (contiguous; the last group takes the remainder), each expert's
    intermediate dim split over the TP ranks inside a group; one all-reduce over all of them."""

    node: str = ""
    ids_arg: int = 1
    w_gate_up: Optional[Param] = None  # [E, 2I, H]
    w_down: Optional[Param] = None  # [E, H, I]
    ep: int = 1
    tp: int = 1
    ep_major: bool = True  # process_grid key order: ep first means tp has stride one
    module: str = ""

    def coords(self, rank: int) -> tuple[int, int]:
        return grid_coords(rank, self.ep, self.tp, self.ep_major)

    def expert_range(self, ep_rank: int) -> tuple[int, int]:
        experts = self.w_gate_up.shape[0]
        per = experts // self.ep
        lo = ep_rank * per
        return lo, experts if ep_rank == self.ep - 1 else lo + per

    def expert_groups(self, world: int) -> list[tuple[tuple[int, int], list[int]]]:
        """((first expert, stop), ranks) for each EP index: the ranks that hold those experts, each
        with its TP slice of every one of them (the seed's "EP group" of a ``process_grid``)."""
        return [(self.expert_range(e), ranks) for e, ranks in enumerate(expert_rank_groups(self.ep, self.tp, self.ep_major))]

    def ranks_text(self, world: int) -> str:
        def span(lo, hi):
            return f"{lo}" if hi - lo == 1 else f"{lo}-{hi - 1}"
        groups = [f"{span(*experts)}: {'rank' if len(ranks) == 1 else 'ranks'} {','.join(map(str, ranks))}"
                  for experts, ranks in self.expert_groups(world)]
        return f"ep {self.ep} x tp {self.tp}, experts " + " | ".join(groups)

    def layout(self, world: int) -> dict:
        """The summary's view of this layer: the grid and who holds which experts."""
        (lo, hi), _ = max(self.expert_groups(world), key=lambda g: g[0][1] - g[0][0])
        return {"ep": self.ep, "tp": self.tp, "experts": self.w_gate_up.shape[0], "experts_per_rank": hi - lo,
                "expert_groups": [{"experts": list(experts), "ranks": ranks} for experts, ranks in self.expert_groups(world)]}

    def edits(self, rank: int, world: int) -> list[Edit]:
        e, t = self.coords(rank)
        lo, hi = self.expert_range(e)
        inter = self.w_down.shape[2]
        out: list[Edit] = []
        tp_rows = local_ranges((Part(inter), Part(inter)), t, self.tp)  # gate rows, then up rows
        (a, b) = local_ranges((Part(inter),), t, self.tp)[0]
        experts = ((0, lo, hi),) if self.ep > 1 else ()
        out.append(SliceParam(self.w_gate_up.fqn, experts + (tuple((1, x, y) for x, y in tp_rows) if self.tp > 1 else ())))
        out.append(SliceParam(self.w_down.fqn, experts + (((2, a, b),) if self.tp > 1 else ())))
        if lo:
            out.append(ShiftIds(self.node, self.ids_arg, lo))
        hidden = self.w_down.shape[1] * self.w_down.itemsize
        out.append(Collective(self.node, "all_reduce", group_name(range(world)), bytes_per_token=hidden))
        return out

    def targets(self):
        return [(self.module, "ep" if self.ep > 1 else "colwise", [self.w_gate_up, self.w_down])]


@dataclass
class BMMShard(Claim):
    """A BMM with a parameter operand: split the batch dim, all-gather it after."""

    node: str = ""
    param: Optional[Param] = None
    param_arg: int = 1
    group: tuple[int, ...] = ()

    def edits(self, rank: int, world: int) -> list[Edit]:
        size, r = len(self.group), self.group.index(rank)
        (a, b) = local_ranges((Part(self.param.shape[0]),), r, size)[0]
        # [E, T, out] = bmm([E, T, in], [E, in, out]) (or [E, out, T] with the parameter first)
        per_token = self.param.shape[0] * self.param.shape[2 if self.param_arg == 1 else 1] * self.param.itemsize
        return [SliceParam(self.param.fqn, ((0, a, b),)), SliceInput(self.node, 1 - self.param_arg, 0, a, b),
                Collective(self.node, "all_gather", group_name(self.group), dim=0, bytes_per_token=per_token)]

    def targets(self):
        return [(self.param.fqn, "bmm", [self.param])]  # the parameter: an experts module may hold several


@dataclass
class Replicate(Claim):
    """Kept whole on every rank (listed so the plan shows every weight)."""

    params: list[Param] = field(default_factory=list)
    target: str = ""

    def edits(self, rank: int, world: int) -> list[Edit]:
        return []

    def targets(self):
        return [(self.target, "replicate", self.params)]


def _params(lin: Linear) -> list[Param]:
    return [lin.weight] + ([lin.bias] if lin.bias is not None else [])


def _out_bytes(lin: Linear) -> int:
    return lin.weight.shape[0] * lin.weight.itemsize


def _merge_rows(rows):
    merged: dict[tuple[str, str], list[Param]] = {}
    for target, strategy, params in rows:
        merged.setdefault((target, strategy), []).extend(params)
    return [(t, s, p) for (t, s), p in merged.items()]


# ----- the plan ------------------------------------------------------------------------------------


@dataclass
class Plan:
    world_size: int
    claims: list[Claim]
    param_bytes: dict[str, int]  # every parameter of the graph: full bytes (for the summary)
    # why the plan is what it is: (logging level, message), repeated per-layer messages counted once
    notes: list[tuple[int, str]] = field(default_factory=list)
    # every linear is kept whole by a manual ``replicate`` entry: a plan that splits nothing was asked for
    replicated_on_purpose: bool = False

    def claimed(self, node: str) -> bool:
        return any(node in c.nodes for c in self.claims)

    def edits(self, rank: int) -> list[Edit]:
        return [e for c in self.claims for e in c.edits(rank, self.world_size)]

    def groups(self) -> set[str]:
        return {g for c in self.claims for g in c.groups(self.world_size)}

    def rows(self) -> list[PlanRow]:
        return [row for c in self.claims for row in c.rows(self.world_size)]

    def counts(self) -> dict[str, int]:
        """Claims by what they do: split (a layer column/row, an MoE layer, a batched matmul),
        gathered (one linear, column split + all-gather), replicated (kept whole on every rank)."""
        kinds = {TPLayer: "split", MoEShard: "split", BMMShard: "split", SimpleShard: "gathered", Replicate: "replicated"}
        out = {"split": 0, "gathered": 0, "replicated": 0}
        for c in self.claims:
            out[kinds[type(c)]] += 1
        return out

    def splits_nothing(self) -> bool:
        return not any(isinstance(e, SliceParam) for r in range(self.world_size) for e in self.edits(r))

    def summary(self) -> dict:
        params = {}
        for c in self.claims:
            for _, _, ps in c.targets():
                params.update({p.fqn: p for p in ps})
        per_rank = []
        for r in range(self.world_size):
            sliced = {e.fqn: e.ranges for e in self.edits(r) if isinstance(e, SliceParam)}
            per_rank.append(sum(_sliced_bytes(params[f], sliced[f]) if f in sliced and f in params else nbytes
                                for f, nbytes in self.param_bytes.items()))
        collectives = [e for e in self.edits(0) if isinstance(e, Collective)]
        counts: dict[str, int] = {}
        for row in self.rows():
            counts[row.strategy] = counts.get(row.strategy, 0) + 1
        moe: dict[str, dict] = {}  # MoE layers with one layout share an entry
        for c in self.claims:
            if isinstance(c, MoEShard):
                layout = c.layout(self.world_size)
                entry = moe.setdefault(repr(layout), {"layers": 0, **layout})
                entry["layers"] += 1
        return {
            "world_size": self.world_size,
            "bytes_total": sum(self.param_bytes.values()),
            "bytes_per_rank_max": max(per_rank) if per_rank else 0,
            "collectives_per_forward": len(collectives),
            "all_reduce_per_forward": sum(e.op == "all_reduce" for e in collectives),
            "all_gather_per_forward": sum(e.op == "all_gather" for e in collectives),
            # what rank 0 sends per token of a forward (ring all-reduce 2(n-1)/n, all-gather (n-1)/n of the result)
            "comm_bytes_per_token": round(sum(e.sent_per_token() for e in collectives)),
            "strategies": counts,
            **self.counts(),
            "experts_per_rank_max": max((m["experts_per_rank"] for m in moe.values()), default=None),  # None: no MoE
            "moe": list(moe.values()),
        }

    def summary_line(self) -> str:
        """The plan in one line: what is split, gathered and kept whole; what it costs."""
        s = self.summary()
        split = [f"{n} {what}" for what, n in (
            ("column/row", sum(isinstance(c, TPLayer) for c in self.claims)),
            ("MoE", sum(isinstance(c, MoEShard) for c in self.claims)),
            ("batched matmul", sum(isinstance(c, BMMShard) for c in self.claims))) if n]
        line = (f"{_count(s['split'], 'layer')} split"
                + (f" ({', '.join(split)})" if split else "")
                + f", {_count(s['gathered'], 'linear')} gathered, {s['replicated']} kept whole on every rank; "
                f"{s['collectives_per_forward']} collectives per forward ({human_bytes(s['comm_bytes_per_token'])} sent "
                f"per token per rank), at most {human_bytes(s['bytes_per_rank_max'])} of {human_bytes(s['bytes_total'])} "
                f"weights per rank")
        for m in s["moe"]:
            line += f"; {m['layers']} MoE layers: {m['experts_per_rank']} of {m['experts']} experts per rank"
        return line


def format_table(rows: Sequence[PlanRow]) -> str:
    """The plan as a text table; layers that differ only in their index share one line (``*``).
    With MoE layers, a last column says which ranks hold which experts (other rows: all ranks)."""
    import re

    grouped: dict[tuple, list[PlanRow]] = {}
    for row in rows:
        key = (re.sub(r"\.\d+\.", ".*.", row.target), row.strategy, row.source, row.dim, row.bytes_per_rank, row.ranks)
        grouped.setdefault(key, []).append(row)
    moe = any(row.ranks for row in rows)
    lines = [f"{'target':<52} {'strategy':<9} {'source':<9} {'dim':<4} {'per rank':>10} {'count':>5}"
             + ("  ranks" if moe else "")]
    for (target, strategy, source, dim, nbytes, ranks), members in grouped.items():
        lines.append(f"{target:<52} {strategy:<9} {source:<9} {dim:<4} {human_bytes(nbytes):>10} {len(members):>5}"
                     + (f"  {ranks or 'all'}" if moe else ""))
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
