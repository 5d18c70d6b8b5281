"""``quantize_fp8`` (stage weight_load, before ``load_weights``): FP8 linears and MoE experts.

The checkpoint decides (``models/quantized.py``): in an FP8 checkpoint (HF ``quant_method: fp8``,
per-tensor or block scales; ModelOpt FP8) every linear and MoE expert pair whose weight scale the
checkpoint holds becomes ``autodeploy::fp8_linear`` / ``autodeploy::fp8_moe``. A 16-bit checkpoint
stays 16-bit unless ``on_the_fly``: then every linear but ``exclude`` (fnmatch patterns on module
names; by default the LM head and MoE routers) and every MoE expert is quantized at load, per
channel, activations scaled per token at run time. Embeddings are lookups, not linears: they stay
16-bit; so does a weight tied to another (the LM head tied to the embedding).

Runs on the meta graph after sharding: each weight becomes an FP8 parameter of the rank's shape,
and its scale (and a static input scale) a float32 parameter beside it; ``ctx.shared["weight_sources"]``
tells ``load_weights`` how to make what the checkpoint does not hold as such (scales in the op's
layout and the rank's slice, weights quantized on the device).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import fx

import autodeploy.custom_ops.fp8_linear  # noqa: F401  registers torch.ops.autodeploy.fp8_linear
import autodeploy.custom_ops.moe  # noqa: F401  registers torch.ops.autodeploy.fp8_moe

from ...models.checkpoint import SafetensorsCheckpoint
from ...models.quantized import (
    Fp8Scheme,
    checkpoint_scale_source,
    checkpoint_scheme,
    meta_param,
    on_the_fly_sources,
    scale_key,
    static_input_source,
)
from ..graph_utils import get_attr_value
from ..interface import BaseTransform, BuildContext, TransformConfig, TransformInfo, register
from ..patterns.nodes import arg, is_op
from .fuse_linears import _tied_targets

aten = torch.ops.aten


@dataclass
class QuantizeFp8Config(TransformConfig):
    stage: str = "weight_load"
    # quantize a 16-bit checkpoint's linears and MoE experts at load (per-channel e4m3 weights,
    # per-token activation scales); an FP8 checkpoint loads as it is stored either way
    on_the_fly: bool = False
    # on the fly: modules left 16-bit (fnmatch patterns on module names)
    exclude: List[str] = field(default_factory=lambda: ["lm_head", "*.gate", "*.router"])


class _Plan:
    """What one apply does: which weights, their scale layouts, the load sources."""

    def __init__(self, gm: fx.GraphModule, ctx: BuildContext, scheme: Optional[Fp8Scheme],
                 checkpoint: Optional[SafetensorsCheckpoint], exclude: list[str]):
        self.gm, self.ctx, self.scheme, self.checkpoint, self.exclude = gm, ctx, scheme, checkpoint, exclude
        self.record = ctx.factory._record()
        self.slices = ctx.shared.get("shard_slices") or {}
        self.sources: dict = {}
        self.tied = _tied_targets(gm)
        self.kept: list[str] = []  # 16-bit linears (reported)

    @property
    def block(self) -> Optional[tuple[int, int]]:
        return self.scheme.block_size if self.scheme is not None else None

    def weight_ok(self, node) -> Optional[torch.Tensor]:
        if not isinstance(node, fx.Node) or node.op != "get_attr" or len(node.users) != 1 or node.target in self.tied:
            return None
        w = get_attr_value(self.gm, node.target)
        return w if isinstance(w, torch.Tensor) and w.dtype in (torch.bfloat16, torch.float16, torch.float32) else None

    def stored_fp8(self, key: str) -> bool:
        """Whether the checkpoint holds ``key``'s weight scale (its own, or each expert piece's)."""
        ckpt = self.checkpoint
        if key not in ckpt:
            return False
        pieces = ckpt.pieces(key)
        if pieces is None:
            return scale_key(key, self.scheme) in ckpt
        return all(ckpt.has_key(scale_key(k, self.scheme)) for k, _, _ in pieces)

    def wanted(self, key: str, module: str) -> bool:
        if self.scheme is not None:
            return self.stored_fp8(key)
        return not any(fnmatch.fnmatchcase(module, p) for p in self.exclude)

    def replace(self, key: str, w: torch.Tensor, scale_name: str, before: fx.Node) -> fx.Node:
        """The weight at ``key`` as an FP8 parameter and its scale (op layout) beside it; returns
        the scale's get_attr node."""
        owner_path, _, attr = key.rpartition(".")
        owner = self.gm.get_submodule(owner_path)
        setattr(owner, attr, meta_param(w.shape))
        lead, (rows, cols) = list(w.shape[:-2]), w.shape[-2:]
        block = self.block
        scale_shape = lead + ([rows] if block is None else [-(-rows // block[0]), -(-cols // block[1])])
        owner.register_parameter(scale_name, meta_param(scale_shape, torch.float32))
        scale_fqn = f"{owner_path}.{scale_name}"
        spec = self.slices.get(key)
        if self.scheme is None:
            self.sources[key], self.sources[scale_fqn] = on_the_fly_sources(key, spec, self.ctx.dtype)
        else:
            pieces = self.checkpoint.pieces(key)
            self.sources[scale_fqn] = checkpoint_scale_source(self.scheme, key, self.record.shapes[key], spec, pieces)
        with self.gm.graph.inserting_before(before):
            return self.gm.graph.get_attr(scale_fqn)

    def input_scale(self, key: str, before: fx.Node) -> Optional[fx.Node]:
        if self.scheme is None or self.scheme.input_name is None:
            return None
        owner_path = key.rpartition(".")[0]
        self.gm.get_submodule(owner_path).register_parameter("input_scale", meta_param([], torch.float32))
        fqn = f"{owner_path}.input_scale"
        self.sources[fqn] = static_input_source(self.scheme, key)
        with self.gm.graph.inserting_before(before):
            return self.gm.graph.get_attr(fqn)

    def linear(self, node: fx.Node) -> bool:
        w_node = node.args[1]
        w = self.weight_ok(w_node)
        if w is None or w.dim() != 2 or not w_node.target.endswith(".weight"):
            return False
        module = w_node.target[: -len(".weight")]
        if not self.wanted(w_node.target, module):
            self.kept.append(module)
            return False
        scale = self.replace(w_node.target, w, "weight_scale", node)
        inputs = self.input_scale(w_node.target, node)
        block = list(self.block) if self.block else None
        node.target = torch.ops.autodeploy.fp8_linear.default
        node.args = (node.args[0], w_node, scale, inputs, arg(node, 2, "bias", None), block)
        node.kwargs = {}
        return True

    def moe(self, node: fx.Node) -> bool:
        w_nodes = node.args[3:5]
        ws = [self.weight_ok(n) for n in w_nodes]
        if any(w is None or w.dim() != 3 for w in ws):
            return False
        module = w_nodes[0].target.rpartition(".")[0]
        if not all(self.wanted(n.target, module) for n in w_nodes):
            self.kept.append(module)
            return False
        scales = [self.replace(n.target, w, f"{n.target.rpartition('.')[2]}_scale", node)
                  for n, w in zip(w_nodes, ws)]
        node.target = torch.ops.autodeploy.fp8_moe.default
        node.args = (*node.args[:5], *scales, list(self.block) if self.block else None)
        return True


@register("quantize_fp8")
class QuantizeFp8(BaseTransform):
    config_class = QuantizeFp8Config
    graph_only = True

    def apply(self, gm, ctx: BuildContext):
        cfg: QuantizeFp8Config = self.config
        factory = ctx.factory
        scheme, checkpoint = None, None
        directory = factory.source.local_dir if factory is not None else None
        if factory is not None and not factory.skip_loading_weights and factory.source.kind != "card":
            scheme = checkpoint_scheme(factory.config, directory)
        if scheme is None and not cfg.on_the_fly:
            note = "16-bit checkpoint" if factory is None or not factory.skip_loading_weights else "random weights"
            return gm, TransformInfo(num_matches=0, note=note)
        if scheme is not None:
            record = factory._record()
            checkpoint = SafetensorsCheckpoint(factory.checkpoint_dir(), record.conversions, record.base_model_prefix)
        plan = _Plan(gm, ctx, scheme, checkpoint, list(cfg.exclude))
        linears = moes = 0
        for node in list(gm.graph.nodes):
            if is_op(node, aten.linear.default):
                linears += plan.linear(node)
            elif is_op(node, torch.ops.autodeploy.moe.default):
                moes += plan.moe(node)
        if checkpoint is not None:
            checkpoint.close()
        ctx.shared.setdefault("weight_sources", {}).update(plan.sources)
        gm.recompile()
        what = scheme.describe() if scheme is not None else "on the fly, per channel"
        if scheme is not None and cfg.on_the_fly:
            what += "; on_the_fly does not apply to it"
        kept = f"; 16-bit: {', '.join(plan.kept[:3])}{'...' if len(plan.kept) > 3 else ''}" if plan.kept else ""
        note = f"{what}: {linears} linears, {moes} MoE expert pairs in fp8{kept}"
        return gm, TransformInfo(num_matches=linears + moes, is_clean=False, has_valid_shapes=False, note=note)
