"""Rewrite HF attention (SDPA or eager matmul/softmax) into ``autodeploy::attention``.

What gets folded into the op:
- repeat_kv (``unsqueeze -> expand -> reshape`` or ``repeat_interleave`` on the head dim): the op
  takes the un-repeated k/v and does GQA itself, so no constant head counts stay in the graph;
- the mask: dropped when probing proves it is causal, optionally with a sliding window
  (see ``patterns/mask_probe.py``); any other mask (padding, bidirectional, chunked, ALiBi) keeps
  that attention as it is;
- eager extras: the score scale (mul/div by a literal) and tanh soft-capping.
The op is bsnd: q/k/v get a ``transpose(1, 2)`` in front and the output one behind, which
``eliminate_redundant_transposes`` cancels against HF's own transposes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import fx

import autodeploy.custom_ops.attention  # noqa: F401  registers torch.ops.autodeploy.attention
import autodeploy.export.patches.repeat_kv  # noqa: F401  registers torch.ops.autodeploy.repeat_kv
import autodeploy.export.patches.sdpa  # noqa: F401  registers torch.ops.autodeploy.sdpa (exported SDPA)

from ..interface import BaseTransform, BuildContext, TransformConfig, TransformInfo, register
from ..patterns.mask_probe import MaskVerdict, classify_mask
from ..patterns.nodes import (
    is_op,
    CAST_OPS,
    GraphEditor,
    arg,
    commutative_operands,
    is_last_dim,
    literal_float,
    ndim,
    norm_dim,
    same_size,
    single_user,
    static_size,
    try_match,
    val,
)

log = logging.getLogger(__name__)
aten = torch.ops.aten


@dataclass
class AttentionMatch:
    output: fx.Node  # the node whose value the op replaces (bnsd)
    q: fx.Node  # bnsd
    k: fx.Node  # bnsd, un-repeated
    v: fx.Node
    scale: float
    mask: Optional[fx.Node]
    is_causal: bool
    logit_cap: Optional[float] = None


def strip_repeat_kv(node: Any) -> fx.Node:
    """The kv tensor before HF's repeat_kv (``[B,KV,S,D]``), or ``node`` itself if not repeated."""
    if is_op(node, aten.repeat_interleave.self_int) and norm_dim(arg(node, 2, "dim", 0), 4) == 1:
        return node.args[0]
    if is_op(node, torch.ops.autodeploy.repeat_kv.default):  # export patch gqa_without_repeat_views
        return node.args[0]
    if not is_op(node, (aten.reshape.default, aten.view.default, aten._unsafe_view.default)):
        return node
    expand = node.args[0]
    if not is_op(expand, aten.expand.default) or not is_op(expand.args[0], aten.unsqueeze.default):
        return node
    unsqueeze = expand.args[0]
    src = unsqueeze.args[0]
    src_v, exp_v, out_v = val(src), val(expand), val(node)
    if not all(isinstance(t, torch.Tensor) for t in (src_v, exp_v, out_v)) or src_v.dim() != 4:
        return node
    if norm_dim(unsqueeze.args[1], 5) != 2:
        return node
    b, kv, s, d = src_v.shape
    rep = static_size(exp_v.shape[2])
    n_kv = static_size(kv)
    if rep is None or n_kv is None:
        return node
    expanded_ok = all(same_size(exp_v.shape[i], src_v.shape[j]) for i, j in ((0, 0), (1, 1), (3, 2), (4, 3)))
    out_ok = (
        out_v.dim() == 4
        and static_size(out_v.shape[1]) == n_kv * rep
        and all(same_size(out_v.shape[i], src_v.shape[i]) for i in (0, 2, 3))
    )
    return src if expanded_ok and out_ok else node


def _heads(node: fx.Node) -> Optional[int]:
    v = val(node)
    return static_size(v.shape[1]) if isinstance(v, torch.Tensor) and v.dim() == 4 else None


def match_sdpa(node: fx.Node) -> Optional[AttentionMatch]:
    # autodeploy::sdpa is SDPA as exported under the `sdpa_as_op` patch (same arguments)
    if not is_op(node, (aten.scaled_dot_product_attention.default, torch.ops.autodeploy.sdpa.default)):
        return None
    q, k, v = node.args[:3]
    if any(ndim(t) != 4 for t in (q, k, v)):
        return None
    mask = arg(node, 3, "attn_mask", None)
    if arg(node, 4, "dropout_p", 0.0) != 0.0:
        return None
    is_causal = bool(arg(node, 5, "is_causal", False))
    scale = node.kwargs.get("scale", arg(node, 6, "scale", None))
    if scale is None:
        head_dim = static_size(val(q).shape[-1])
        if head_dim is None:
            return None
        scale = head_dim**-0.5
    if isinstance(scale, fx.Node):
        return None
    return AttentionMatch(node, q, strip_repeat_kv(k), strip_repeat_kv(v), float(scale), mask, is_causal)


def _is_last_two_swap(node: Any) -> bool:
    if is_op(node, aten.transpose.int) and ndim(node) == 4:
        return {norm_dim(node.args[1], 4), norm_dim(node.args[2], 4)} == {2, 3}
    if is_op(node, aten.permute.default) and ndim(node) == 4:
        return [norm_dim(d, 4) for d in node.args[1]] == [0, 1, 3, 2]
    return False


def _scalar_factor(node: Any) -> Optional[tuple[fx.Node, float]]:
    """``x * c``, ``c * x`` or ``x / c`` with a literal c -> (x, factor)."""
    if is_op(node, aten.mul.Tensor) or is_op(node, aten.mul.Scalar):
        for x, c in commutative_operands(node):
            if isinstance(x, fx.Node) and literal_float(c) is not None:
                return x, literal_float(c)
    if (is_op(node, aten.div.Tensor) or is_op(node, aten.div.Scalar)) and literal_float(node.args[1]):
        return node.args[0], 1.0 / literal_float(node.args[1])
    return None


def _soft_cap(node: Any) -> Optional[tuple[fx.Node, float]]:
    """``tanh(x / c) * c`` -> (x, c)."""
    if not (is_op(node, aten.mul.Tensor) or is_op(node, aten.mul.Scalar)):
        return None
    for t, c in commutative_operands(node):
        cap = literal_float(c)
        if cap is None or not is_op(t, aten.tanh.default):
            continue
        inner = t.args[0]
        if (is_op(inner, aten.div.Tensor) or is_op(inner, aten.div.Scalar)) and literal_float(inner.args[1]) == cap:
            return inner.args[0], cap
    return None


def _parse_scores(node: Any) -> Optional[tuple[fx.Node, fx.Node, float, Optional[float]]]:
    """scores = [cap](scale * q @ k^T) -> (q, k_repeated, scale, cap)."""
    cap = None
    capped = _soft_cap(node)
    if capped is not None:
        node, cap = capped
    scale = 1.0
    while (factor := _scalar_factor(node)) is not None:
        node, f = factor
        scale *= f
    if not is_op(node, aten.matmul.default) or not _is_last_two_swap(node.args[1]):
        return None
    q, k = node.args[0], node.args[1].args[0]
    if ndim(q) != 4 or ndim(k) != 4:
        return None
    return q, k, scale, cap


def match_eager(softmax: fx.Node) -> Optional[AttentionMatch]:
    if not is_op(softmax, (aten.softmax.int, aten._softmax.default)):
        return None
    if not is_last_dim(softmax.args[1], ndim(softmax)) or ndim(softmax) != 4:
        return None
    # forward: softmax -> [cast] -> matmul(probs, v)
    probs = softmax
    while (user := single_user(probs)) is not None and is_op(user, CAST_OPS):
        probs = user
    pv = single_user(probs)
    if pv is None or not is_op(pv, aten.matmul.default) or pv.args[0] is not probs or ndim(pv.args[1]) != 4:
        return None
    # backward: [scores + mask] -> [soft-cap] -> [scale] -> q @ k^T
    scores, mask = softmax.args[0], None
    parsed = None
    if is_op(scores, aten.add.Tensor):
        for s, m in commutative_operands(scores):
            if isinstance(m, fx.Node) and (parsed := _parse_scores(s)) is not None:
                mask = m
                break
    else:
        parsed = _parse_scores(scores)
    if parsed is None:
        return None
    q, k, scale, cap = parsed
    return AttentionMatch(pv, q, strip_repeat_kv(k), strip_repeat_kv(pv.args[1]), scale, mask, False, cap)


def _config_windows(ctx: BuildContext) -> list[int]:
    config = getattr(ctx.factory, "config", None) if ctx is not None else None
    if config is not None and callable(getattr(config, "get_text_config", None)):
        config = config.get_text_config()
    windows = [getattr(config, name, None) for name in ("sliding_window", "attention_chunk_size")]
    return [w for w in windows if isinstance(w, int)]


@dataclass
class MatchAttentionConfig(TransformConfig):
    stage: str = "pattern_matcher"
    requires_shape_prop: bool = True
    match_sdpa: bool = True
    match_eager: bool = True
    # masks are probed at sequence lengths up to this (windows beyond it must agree with the config)
    max_mask_probe_len: int = 8192


@register("match_attention_pattern")
class MatchAttentionPattern(BaseTransform):
    """SDPA / eager attention (+ repeat_kv, causal or sliding mask, soft-cap) -> autodeploy::attention."""

    config_class = MatchAttentionConfig
    graph_only = True

    def apply(self, model, ctx: BuildContext):
        cfg: MatchAttentionConfig = self.config
        matches = []
        for node in model.graph.nodes:
            m = (try_match(match_sdpa, node) if cfg.match_sdpa else None) or (
                try_match(match_eager, node) if cfg.match_eager else None
            )
            if m is not None:
                matches.append(m)

        editor = GraphEditor(model)
        verdicts: dict[tuple[Optional[fx.Node], bool], MaskVerdict] = {}
        windows = _config_windows(ctx)
        skipped: list[str] = []
        num = 0
        for m in matches:
            key = (m.mask, m.is_causal)
            if key not in verdicts:
                verdicts[key] = classify_mask(
                    m.mask, model, is_causal=m.is_causal, config_windows=windows, max_probe_len=cfg.max_mask_probe_len
                )
            verdict = verdicts[key]
            if not verdict.ok:
                skipped.append(f"{m.output.name}: {verdict.reason}")
                continue
            n_heads, n_kv, n_kv_v = _heads(m.q), _heads(m.k), _heads(m.v)
            if n_heads is None or n_kv is None or n_kv != n_kv_v or n_heads % n_kv:
                skipped.append(f"{m.output.name}: head counts q={n_heads} k={n_kv} v={n_kv_v} do not fit GQA")
                continue
            with model.graph.inserting_before(m.output):
                q, k, v = (editor.call(aten.transpose.int, t, 1, 2) for t in (m.q, m.k, m.v))
                att = editor.call(
                    torch.ops.autodeploy.attention.default, q, k, v, m.scale, verdict.sliding_window, m.logit_cap
                )
                out = editor.call(aten.transpose.int, att, 1, 2)
            editor.replace(m.output, out)
            editor.erase_unused([m.output])  # SDPA counts as impure (dropout RNG), so DCE keeps it
            num += 1
        for reason in skipped:
            log.warning("attention left as is: %s", reason)
        note = f"{len(skipped)} left as is: {skipped[0]}" + (" ..." if len(skipped) > 1 else "") if skipped else ""
        return model, TransformInfo(num_matches=num, is_clean=False, has_valid_shapes=editor.shapes_valid, note=note)
