"""``export_to_gm`` (stage export): torch.export the HF model into the pipeline's GraphModule."""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

from ...export.export import export_to_gm
from ..interface import BaseTransform, BuildContext, TransformConfig, TransformInfo, register


@dataclass
class ExportToGMConfig(TransformConfig):
    stage: str = "export"
    strict: bool = False  # torch.export strict mode (traces with dynamo); non-strict is faster


@register("export_to_gm")
class ExportToGM(BaseTransform):
    config_class = ExportToGMConfig

    def apply(self, model: nn.Module, ctx: BuildContext) -> tuple[nn.Module, TransformInfo]:
        if isinstance(model, fx.GraphModule):
            return model, TransformInfo(num_matches=0, skipped=True, note="already a GraphModule")
        gm = export_to_gm(
            model,
            max_batch_size=ctx.args.max_batch_size,
            max_seq_len=ctx.args.max_seq_len,
            strict=self.config.strict,
        )
        info = gm.meta.get("autodeploy_export", {})
        note = f"{info.get('time_s', 0.0):.2f}s, {len(gm.graph.nodes)} nodes"
        if info.get("patches"):
            note += f", patches: {', '.join(info['patches'])}"
        return gm, TransformInfo(num_matches=1, is_clean=False, has_valid_shapes=True, note=note)
