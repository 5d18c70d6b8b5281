"""Rewrite HF RMSNorm (Llama style) into ``autodeploy::rms_norm``.

Recognized: ``weight * (x32 * rsqrt(mean(x32^2, -1, keepdim) + eps)).to(x.dtype)`` with
``x32 = x.to(float32)`` (the casts are absent in fp32 graphs after cleanup; ``x*x`` works for the
square). eps comes from the graph. Variants with other math stay as they are, e.g. Gemma's
``(1 + weight)`` applied in fp32, norms without a weight, or LayerNorm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import fx

import autodeploy.custom_ops.rms_norm  # noqa: F401  registers torch.ops.autodeploy.rms_norm

from ..interface import BaseTransform, BuildContext, TransformConfig, TransformInfo, register
from ..patterns.nodes import (
    is_op,
    CAST_OPS,
    GraphEditor,
    arg,
    commutative_operands,
    dtype,
    is_last_dim,
    literal_float,
    ndim,
    same_size,
    single_user,
    try_match,
    val,
)

aten = torch.ops.aten


@dataclass
class RmsNormMatch:
    output: fx.Node
    x: fx.Node
    weight: fx.Node
    eps: float


def _square_of(node: Any) -> Optional[fx.Node]:
    if is_op(node, aten.pow.Tensor_Scalar) and node.args[1] == 2:
        return node.args[0]
    if is_op(node, aten.mul.Tensor) and node.args[0] is node.args[1]:
        return node.args[0]
    return None


def match_rmsnorm(rsqrt: fx.Node) -> Optional[RmsNormMatch]:
    if not is_op(rsqrt, aten.rsqrt.default) or not is_op(rsqrt.args[0], aten.add.Tensor):
        return None
    # rsqrt(mean(x32^2, -1, keepdim=True) + eps)
    for mean, eps in commutative_operands(rsqrt.args[0]):
        eps = literal_float(eps)
        if eps is not None and is_op(mean, aten.mean.dim):
            break
    else:
        return None
    dims = mean.args[1]
    if len(dims) != 1 or not is_last_dim(dims[0], ndim(mean)) or not arg(mean, 2, "keepdim", False):
        return None
    x32 = _square_of(mean.args[0])
    if x32 is None or dtype(x32) != torch.float32:
        return None
    # x32 * rsqrt(...) -> [cast back] -> weight * (...)
    normed = single_user(rsqrt)
    if normed is None or not is_op(normed, aten.mul.Tensor) or x32 not in normed.args:
        return None
    x = x32.args[0] if is_op(x32, CAST_OPS) and dtype(x32.args[0]) is not None else x32
    cast_back = single_user(normed)
    if cast_back is not None and is_op(cast_back, CAST_OPS):
        if dtype(cast_back) != dtype(x):
            return None
        scaled = single_user(cast_back)
        pre = cast_back
    else:  # no cast back: only the same math when the input already is fp32
        if dtype(x) != torch.float32:
            return None
        scaled, pre = cast_back, normed
    if scaled is None or not is_op(scaled, aten.mul.Tensor):
        return None
    for w, y in commutative_operands(scaled):
        if y is pre and isinstance(w, fx.Node):
            wv, xv = val(w), val(x)
            if isinstance(wv, torch.Tensor) and wv.dim() == 1 and same_size(wv.shape[0], xv.shape[-1]):
                return RmsNormMatch(scaled, x, w, eps)
    return None


@dataclass
class MatchRmsNormConfig(TransformConfig):
    stage: str = "pattern_matcher"
    requires_shape_prop: bool = True


@register("match_rmsnorm_pattern")
class MatchRmsNormPattern(BaseTransform):
    """Llama-style RMSNorm -> autodeploy::rms_norm (eps read from the graph)."""

    config_class = MatchRmsNormConfig
    graph_only = True

    def apply(self, model, ctx: BuildContext):
        editor = GraphEditor(model)
        matches = [m for node in model.graph.nodes if (m := try_match(match_rmsnorm, node)) is not None]
        for m in matches:
            with model.graph.inserting_before(m.output):
                out = editor.call(torch.ops.autodeploy.rms_norm.default, m.x, m.weight, m.eps)
            editor.replace(m.output, out)
        return model, TransformInfo(num_matches=len(matches), is_clean=False, has_valid_shapes=editor.shapes_valid)
