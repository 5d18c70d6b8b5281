"""``rope_position_tables`` (stage post_load_fusion): RoPE's cos/sin looked up, not recomputed.

HF computes cos/sin once per forward from ``position_ids`` (inverse frequencies times positions,
then cos and sin), and every layer's ``autodeploy::rope`` reads them. Inductor treats that
computation as cheap pointwise code and fuses a copy of it into each layer's RoPE kernel, so a
prefill evaluates cos and sin once per layer and element (several times the RoPE kernel's own
time: docs/performance-history.md#rope-tables-and-the-two-pass-argmax-h200-2026-11-30).

Here a cos/sin pair that depends on ``position_ids`` alone (and on constants such as
``inv_freq``) is evaluated once, at build time, for positions ``[0, max_seq_len)``; the rope ops
then read ``table[position_ids]`` (the same values: the same code made them). Pairs that depend on
anything else (another input, a data-dependent scaling) are left as they are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import fx

import autodeploy.custom_ops.rope  # noqa: F401  registers torch.ops.autodeploy.rope

from ..graph_utils import get_attr_value
from ..interface import BaseTransform, BuildContext, TransformConfig, TransformInfo, register

log = logging.getLogger(__name__)


@dataclass
class RopeTablesConfig(TransformConfig):
    stage: str = "post_load_fusion"
    max_positions: Optional[int] = None  # None = args.max_seq_len (the cache's), else the model's max_position_embeddings


def evaluate_from(gm: fx.GraphModule, outputs: list[fx.Node], source: fx.Node, value: torch.Tensor):
    """``(values of outputs, nodes they depend on)`` with ``source`` set to ``value``; None if they
    depend on another input (or on something that is not a plain function of it)."""
    needed, stack = set(), list(outputs)
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        if node is not source and node.op not in ("get_attr", "call_function"):
            return None
        if node is not source:
            stack.extend(node.all_input_nodes)
    env = {source: value}
    for node in gm.graph.nodes:  # graph order is a topological order
        if node not in needed or node is source:
            continue
        if node.op == "get_attr":
            env[node] = get_attr_value(gm, node.target)
        else:
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
            env[node] = node.target(*args, **kwargs)
    return [env[o] for o in outputs], needed


def _num_positions(cfg: RopeTablesConfig, ctx: BuildContext) -> Optional[int]:
    if cfg.max_positions:
        return int(cfg.max_positions)
    if ctx.cache is not None and getattr(ctx.cache, "max_seq_len", None):
        return int(ctx.cache.max_seq_len)
    config = getattr(ctx.factory, "config", None)
    return getattr(config, "max_position_embeddings", None)


@register("rope_position_tables")
class RopePositionTables(BaseTransform):
    config_class = RopeTablesConfig
    graph_only = True

    def apply(self, gm, ctx: BuildContext):
        positions = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.target == "position_ids"), None)
        rope = torch.ops.autodeploy.rope.default
        pairs: dict[tuple, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is rope:
                pairs.setdefault((node.args[2], node.args[3]), []).append(node)
        num = _num_positions(self.config, ctx)
        if positions is None or not pairs or not num:
            return gm, TransformInfo(num_matches=0, is_clean=True, note="no RoPE fed by position_ids" if pairs else "")
        val = positions.meta.get("val")
        device = next((b.device for b in gm.buffers()), None) or next((p.device for p in gm.parameters()), ctx.device)
        if device.type == "meta":
            return gm, TransformInfo(num_matches=0, is_clean=True, note="weights on meta: nothing to evaluate")
        arange = torch.arange(num, dtype=getattr(val, "dtype", torch.int64), device=device).view(1, num)
        matches, skipped, made = 0, 0, {}
        for (cos, sin), users in pairs.items():
            try:
                with torch.no_grad():
                    found = evaluate_from(gm, [cos, sin], positions, arange)
            except Exception as e:  # noqa: BLE001 - an op that needs the real shapes: keep the computation
                log.debug("rope_position_tables: cos/sin not evaluated (%s: %s)", type(e).__name__, e)
                found = None
            tables, computed = found if found is not None else (None, ())
            ok = tables is not None and all(
                isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[:2] == (1, num)
                and t.dtype == getattr(n.meta.get("val"), "dtype", t.dtype)
                for t, n in zip(tables, (cos, sin))
            )
            if not ok:
                skipped += 1
                continue
            lookups = []
            with gm.graph.inserting_before(users[0]):
                for name, table in zip(("cos", "sin"), tables):
                    table = table[0].contiguous()  # [positions, rotary dim]
                    # per-layer copies of one table (e.g. a squeeze per layer) share one buffer
                    attr = next((a for a, t in made.items() if t.shape == table.shape and torch.equal(t, table)), None)
                    if attr is None:
                        attr = f"rope_{name}_table_{len(made) // 2}"
                        gm.register_buffer(attr, table)
                        made[attr] = table
                    lookups.append(gm.graph.call_function(
                        torch.ops.aten.index.Tensor, (gm.graph.get_attr(attr), [positions])))
                    lookups[-1].meta["val"] = (cos if name == "cos" else sin).meta.get("val")
            for user in users:
                user.args = (*user.args[:2], *lookups, *user.args[4:])
            for node in reversed(list(gm.graph.nodes)):  # the computation, unless something else reads it
                if node in computed and node is not positions and not node.users:
                    gm.graph.erase_node(node)
            matches += 1
        if matches:
            gm.recompile()
        note = f"{skipped} cos/sin pair(s) depend on more than position_ids: computed as before" if skipped else ""
        return gm, TransformInfo(num_matches=matches, is_clean=False, has_valid_shapes=True, note=note)
