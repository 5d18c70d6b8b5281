"""``load_weights`` (stage weight_load): stream checkpoint weights (each rank's slices) onto the device."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..interface import BaseTransform, BuildContext, TransformConfig, TransformInfo, register


@dataclass
class LoadWeightsConfig(TransformConfig):
    stage: str = "weight_load"


@register("load_weights")
class LoadWeights(BaseTransform):
    config_class = LoadWeightsConfig

    def apply(self, model: nn.Module, ctx: BuildContext) -> tuple[nn.Module, TransformInfo]:
        if ctx.factory is None:
            raise RuntimeError("load_weights needs ctx.factory (a ModelFactory)")
        slices = ctx.shared.get("shard_slices")
        # tensors another transform makes at load (quantize_fp8: FP8 weights and their scales)
        model = ctx.factory.load_weights(model, ctx.device, slices=slices, sources=ctx.shared.get("weight_sources"))
        source = "random init" if ctx.factory.skip_loading_weights else "checkpoint"
        note = f"{source} on {ctx.device}" + (f", {len(slices)} sliced" if slices else "")
        # only tensors and device literals changed: still clean, but nodes' fake values name the old device
        return model, TransformInfo(num_matches=1, is_clean=True, has_valid_shapes=False, note=note)
