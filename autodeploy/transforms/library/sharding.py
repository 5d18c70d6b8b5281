"""``detect_sharding`` (plan) and ``sharding_transform_executor`` (apply), stage ``sharding``.

The fields of ``detect_sharding`` are the seed's, with its defaults (``conf/transforms/default.yaml``,
presets in ``conf/sharding/``). Both run on meta, before ``load_weights``: the executor gives each
parameter its per-rank shape and records the slices the loader reads from the checkpoint. With
``world_size == 1`` both are skipped. ``plan_only=true`` stops the pipeline after this stage.
A plan that splits nothing is refused unless every linear is kept whole on purpose (``sharding=replicate``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from torch import fx

from ...config.errors import UserError
from ...sharding import ShardingOptions, apply_edits, detect, format_table
from ...sharding.detect import PLAN_STRATEGIES
from ...sharding.plan import DIMS, SOURCES
from ..interface import BaseTransform, BuildContext, TransformConfig, TransformInfo, register

log = logging.getLogger("autodeploy.sharding")


def _check_choices(field_name: str, values, valid) -> None:
    bad = [v for v in values if v not in valid]
    if bad:
        raise ValueError(f"args.transforms.detect_sharding.{field_name}: unknown value(s) {bad} (valid: {', '.join(valid)})")


@dataclass
class ShardingConfig(TransformConfig):
    stage: str = "sharding"
    # every linear column-split with an all-gather after it, nothing else (always correct; debugging)
    simple_shard_only: bool = False
    # priority order; the first source to claim a layer wins
    sharding_source: List[str] = field(default_factory=lambda: ["manual", "factory", "heuristic"])
    # false: a manual/factory config that does not cover every layer is not used at all
    support_partial_config: bool = True
    # what the heuristic may do: tp (column/row), ep (experts), bmm (batched matmuls), ssm (Mamba mixers)
    sharding_dims: List[str] = field(default_factory=lambda: ["tp", "ep", "bmm"])
    # {ep: E, tp: T} for MoE layers only; key order = rank layout (the last key has stride one)
    process_grid: Optional[Dict[str, int]] = None
    # the optimizer's flag (every transform has one): propagate shapes first when an earlier transform left them
    # stale; the plan reads every node's shape and stops, naming a node without one, if they are missing
    requires_shape_prop: bool = True
    # {head_dim: int (must equal the graph's attention heads), tp_plan: {pattern: colwise|rowwise|mamba|gather|
    # replicate}}; a pattern names a module path's last components, "*" within one (sharding.detect.pattern_matches)
    manual_config: Optional[Dict[str, Any]] = None

    def __post_init__(self) -> None:
        _check_choices("sharding_source", self.sharding_source, SOURCES)
        _check_choices("sharding_dims", self.sharding_dims, DIMS)
        if self.process_grid is not None:
            _check_choices("process_grid", list(self.process_grid), ("ep", "tp"))
            if any(not isinstance(v, int) or v < 1 for v in self.process_grid.values()):
                raise ValueError(f"args.transforms.detect_sharding.process_grid: sizes must be positive integers, "
                                 f"got {dict(self.process_grid)}")
        if self.manual_config is not None:
            _check_choices("manual_config", list(self.manual_config), ("head_dim", "tp_plan"))
            plan = self.manual_config.get("tp_plan") or {}
            if not isinstance(plan, dict):
                raise ValueError("args.transforms.detect_sharding.manual_config.tp_plan must map module patterns to strategies")
            bad = {k: v for k, v in plan.items() if v not in PLAN_STRATEGIES}
            if bad:
                raise ValueError(f"args.transforms.detect_sharding.manual_config.tp_plan: unknown strategy in {bad} "
                                 f"(valid: {', '.join(PLAN_STRATEGIES)})")
            head_dim = self.manual_config.get("head_dim")
            if head_dim is not None and (not isinstance(head_dim, int) or head_dim < 1):
                raise ValueError(f"args.transforms.detect_sharding.manual_config.head_dim must be a positive integer, got {head_dim!r}")


@register("detect_sharding")
class DetectSharding(BaseTransform):
    config_class = ShardingConfig
    graph_only = True

    def apply(self, model: fx.GraphModule, ctx: BuildContext):
        if ctx.world_size < 2:
            return model, TransformInfo(skipped=True, note="world_size 1: nothing to shard")
        cfg = self.config
        factory_config = ctx.factory.sharding_config() if hasattr(ctx.factory, "sharding_config") else None
        opts = ShardingOptions(
            world_size=ctx.world_size, simple_shard_only=cfg.simple_shard_only,
            sharding_source=list(cfg.sharding_source), support_partial_config=cfg.support_partial_config,
            sharding_dims=list(cfg.sharding_dims), process_grid=dict(cfg.process_grid) if cfg.process_grid else None,
            manual_config=cfg.manual_config, factory_config=factory_config,
        )
        plan = detect(model, opts)
        ctx.shared["sharding_plan"] = plan
        rows = plan.rows()
        if ctx.rank == 0:
            for level, message in plan.notes:
                log.log(level, "%s", message)
            log.info("sharding plan for world_size %d:\n%s\n%s", ctx.world_size, format_table(rows), plan.summary_line())
        if plan.splits_nothing() and not plan.replicated_on_purpose:
            reasons = [m for level, m in plan.notes if level >= logging.WARNING] or [m for _, m in plan.notes]
            why = f" ({reasons[0]})" if reasons else ""
            raise UserError(
                f"sharding: the plan for world_size {ctx.world_size} splits nothing, so every rank would hold and run "
                f"the whole model{why}; choose a world_size the model's heads and sizes divide by, or ask for whole "
                f"replicas on purpose with sharding=replicate")
        sharded = sum(r.strategy != "replicate" for r in rows)
        return model, TransformInfo(num_matches=sharded, is_clean=True, has_valid_shapes=True,
                                    note=f"{sharded} of {len(rows)} targets sharded")


@dataclass
class ShardingExecutorConfig(TransformConfig):
    stage: str = "sharding"
    run_shape_prop: bool = True  # the per-rank shapes are checked right away
    # auto: one-shot all-reduces over symmetric memory for decode-sized messages on GPUs, NCCL for the
    # rest (and wherever symmetric memory is unavailable); nccl: always NCCL (gloo on CPU)
    allreduce_strategy: str = "auto"

    def __post_init__(self) -> None:
        if self.allreduce_strategy not in ("auto", "nccl"):
            raise ValueError(f"args.transforms.sharding_transform_executor.allreduce_strategy: "
                             f"{self.allreduce_strategy!r} is not one of auto, nccl")


@register("sharding_transform_executor")
class ShardingExecutor(BaseTransform):
    config_class = ShardingExecutorConfig
    graph_only = True

    def apply(self, model: fx.GraphModule, ctx: BuildContext):
        plan = ctx.shared.get("sharding_plan")
        if plan is None:
            return model, TransformInfo(skipped=True, note="no sharding plan (world_size 1 or detect_sharding disabled)")
        edits = plan.edits(ctx.rank)
        groups = plan.groups()
        slices = apply_edits(model, edits, groups)
        ctx.shared["shard_slices"] = slices
        if self.config.allreduce_strategy == "auto":
            from ...distributed.collectives import enable_low_latency_all_reduce

            fast = enable_low_latency_all_reduce(groups, ctx.device)
            if fast and ctx.rank == 0:
                log.info("one-shot all-reduce (symmetric memory) for messages up to 1 MiB over ranks %s", ", ".join(fast))
        collectives = sum(1 for n in model.graph.nodes if "all_reduce" in str(n.target) or "all_gather" in str(n.target))
        return model, TransformInfo(num_matches=len(edits), note=f"rank {ctx.rank}: {len(slices)} parameters sliced, "
                                                                 f"{collectives} collectives")
