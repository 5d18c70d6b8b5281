"""``build_model`` (stage factory): the HF model from ``ctx.factory``, on meta by default, checked
against the checkpoint's tensor headers (``ModelFactory.check_checkpoint_fits``)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..interface import BaseTransform, BuildContext, TransformConfig, TransformInfo, register


@dataclass
class BuildModelConfig(TransformConfig):
    stage: str = "factory"
    # meta: no weight memory until weight_load; a real device builds with HF's own random init
    device: str = "meta"


@register("build_model")
class BuildModel(BaseTransform):
    config_class = BuildModelConfig

    def apply(self, model: nn.Module, ctx: BuildContext) -> tuple[nn.Module, TransformInfo]:
        if ctx.factory is None:
            raise RuntimeError("build_model needs ctx.factory (a ModelFactory)")
        built = ctx.factory.build_model(device=self.config.device)
        ctx.factory.check_checkpoint_fits(built)  # a misfit fails here, before export, naming the model_kwargs
        return built, TransformInfo(num_matches=1, note=f"{type(built).__name__} on {self.config.device}")
