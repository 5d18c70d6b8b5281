"""``detect_sharding``: the seed's sharding configuration (fields and defaults).

Only the single-rank case runs today: with ``world_size == 1`` there is nothing to shard and the
transform records itself as skipped. Multi-rank sharding is not built yet, so ``world_size > 1``
fails here with a clear message instead of producing a wrong graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..interface import BaseTransform, BuildContext, TransformConfig, TransformInfo, register


@dataclass
class ShardingConfig(TransformConfig):
    stage: str = "sharding"
    simple_shard_only: bool = False
    sharding_source: List[str] = field(default_factory=lambda: ["manual", "factory", "heuristic"])
    support_partial_config: bool = True
    sharding_dims: List[str] = field(default_factory=lambda: ["tp", "ep", "bmm"])
    process_grid: Optional[Dict[str, int]] = None
    requires_shape_prop: bool = True
    # {head_dim: int, tp_plan: {module-path pattern with * wildcards: colwise|rowwise|mamba|gather}}
    manual_config: Optional[Dict[str, Any]] = None


@register("detect_sharding")
class DetectSharding(BaseTransform):
    config_class = ShardingConfig

    def apply(self, model, ctx: BuildContext):
        if ctx.world_size < 2:
            return model, TransformInfo(skipped=True, note="world_size 1: nothing to shard")
        raise NotImplementedError(
            f"multi-rank sharding (world_size={ctx.world_size}) is not implemented yet; run with args.world_size=1"
        )
