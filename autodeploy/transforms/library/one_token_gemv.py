"""``one_token_gemv`` (stage post_load_fusion, CUDA only): the graph's linears -> ``autodeploy::linear``.

The op runs the Triton GEMV when a call brings one 16-bit token (a batch-1 decode step) and
``F.linear`` otherwise (``custom_ops/linear.py``), so prefill and larger batches keep cuBLAS.
Applies to ``aten.linear`` nodes whose weight is a 2-D 16-bit tensor of the graph. Runs last among
the fusions: the others match ``aten.linear`` (fused q/k/v and gate/up, the LM head's gather).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autodeploy.custom_ops.linear import GEMV_DTYPES  # also registers torch.ops.autodeploy.linear

from ..graph_utils import get_attr_value
from ..interface import BaseTransform, BuildContext, TransformConfig, TransformInfo, register
from ..patterns.nodes import is_op

aten = torch.ops.aten


@dataclass
class OneTokenGemvConfig(TransformConfig):
    stage: str = "post_load_fusion"


@register("one_token_gemv")
class OneTokenGemv(BaseTransform):
    config_class = OneTokenGemvConfig
    graph_only = True

    def apply(self, gm, ctx: BuildContext):
        if ctx.device is None or torch.device(ctx.device).type != "cuda":
            return gm, TransformInfo(num_matches=0, is_clean=True, note="the GEMV is a CUDA kernel")
        op = torch.ops.autodeploy.linear.default
        matches = 0
        for node in gm.graph.nodes:
            if not is_op(node, aten.linear.default):
                continue
            weight = node.args[1]
            w = get_attr_value(gm, weight.target) if getattr(weight, "op", None) == "get_attr" else None
            if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype not in GEMV_DTYPES:
                continue
            node.target = op
            node.args = (node.args[0], weight, node.args[2] if len(node.args) > 2 else node.kwargs.get("bias"))
            node.kwargs = {}
            matches += 1
        if matches:
            gm.recompile()
        return gm, TransformInfo(num_matches=matches, is_clean=True, has_valid_shapes=True)
