"""Rewrite HF attention (SDPA or eager matmul/softmax) into ``autodeploy::attention``.

What gets folded into the op:
- repeat_kv (``unsqueeze -> expand -> reshape`` or ``repeat_interleave`` on the head dim): the op
  takes the un-repeated k/v and does GQA itself, so no constant head counts stay in the graph;
- the additive terms of the scores (SDPA's mask, eager's ``scores + mask``, BLOOM's ``baddbmm``
  bias): dropped when probing proves them causal, optionally with a sliding window or chunk-local,
  optionally ALiBi whose slopes a graph tensor holds (see ``patterns/mask_probe.py``); any other
  term (padding, bidirectional, a learned or relative bias) keeps that attention as it is;
- eager extras: the score scale (mul/div by a literal), tanh soft-capping, learned sinks (a
  ``[H]`` logit concatenated to the scores and dropped after the softmax, gpt-oss) and the
  max-subtraction that only stabilizes the softmax;
- batched-matmul attention over ``[B*H, S, D]`` views (``bmm`` / ``baddbmm``, BLOOM).
The op is bsnd: q/k/v get a ``transpose(1, 2)`` in front and the output one behind, which
``eliminate_redundant_transposes`` cancels against HF's own transposes.

An attention left as is computes the right thing in the uncached graph; ``initialize_cache``
then refuses the graph (it holds an uncached token-mixing computation), naming it.
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
from ..patterns.mask_probe import BiasTerm, MaskVerdict, classify_bias
from ..patterns.nodes import (
    is_op,
    CAST_OPS,
    GraphEditor,
    arg,
    commutative_operands,
    getitem_source,
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
_VIEWS = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
@dataclass
class AttentionMatch:
    output: fx.Node  # the node whose value the op replaces (bnsd)
    q: fx.Node  # bnsd
    k: fx.Node  # bnsd, un-repeated
    v: fx.Node
    scale: float
    bias: list[BiasTerm]  # additive terms of the scores: masks, position biases
    is_causal: bool
    logit_cap: Optional[float] = None
    sinks: Optional[fx.Node] = None  # [H]


def strip_repeat_kv(node: Any) -> fx.Node:
    """The kv tensor before HF's repeat_kv (``[B,KV,S,D]``), or ``node`` itself if not repeated."""
    if is_op(node, aten.repeat_interleave.self_int) and norm_dim(arg(node, 2, "dim", 0), 4) == 1:
        return node.args[0]
    if is_op(node, torch.ops.autodeploy.repeat_kv.default):  # export patch gqa_without_repeat_views
        return node.args[0]
    if not is_op(node, _VIEWS):
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
    bias = [BiasTerm(mask)] if isinstance(mask, fx.Node) else []
    if mask is not None and not bias:
        return None
    return AttentionMatch(node, q, strip_repeat_kv(k), strip_repeat_kv(v), float(scale), bias, is_causal)


def _is_last_two_swap(node: Any) -> bool:
    rank = ndim(node)
    if is_op(node, aten.transpose.int) and rank in (3, 4):
        return {norm_dim(node.args[1], rank), norm_dim(node.args[2], rank)} == {rank - 2, rank - 1}
    if is_op(node, aten.permute.default) and rank == 4:
        return [norm_dim(d, 4) for d in node.args[1]] == [0, 1, 3, 2]
    return False


def _unflatten_heads(node: Any) -> Optional[fx.Node]:
    """``x [B, H, S, D]`` from ``reshape(x, [B*H, S, D])`` (batched-matmul attention), else None."""
    if not is_op(node, _VIEWS) or ndim(node) != 3 or ndim(node.args[0]) != 4:
        return None
    (bh, s, d), (b, h, s4, d4) = val(node).shape, val(node.args[0]).shape
    return node.args[0] if same_size(bh, b * h) and same_size(s, s4) and same_size(d, d4) else None


def _is_head_unflatten(node: Any) -> bool:
    """``view(x [B*H, S, S'], [B, H, S, S'])``."""
    if not is_op(node, _VIEWS) or ndim(node) != 4 or ndim(node.args[0]) != 3:
        return False
    (b, h, s, s2), (bh, s3, s4) = val(node).shape, val(node.args[0]).shape
    return same_size(b * h, bh) and same_size(s, s3) and same_size(s2, s4)


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


def _split_terms(node: Any, flat: bool = False) -> Optional[list[BiasTerm]]:
    """``t1 + t2 + ...`` -> its terms; a 4-D view of a ``[B*H, S, S]`` tensor splits further, flat."""
    if is_op(node, aten.add.Tensor):
        a, b = node.args[:2]
        if not isinstance(a, fx.Node) or not isinstance(b, fx.Node) or node.kwargs.get("alpha", 1) != 1:
            return None
        left, right = _split_terms(a, flat), _split_terms(b, flat)
        return None if left is None or right is None else left + right
    if not flat and _is_head_unflatten(node):
        return _split_terms(node.args[0], True)
    return [BiasTerm(node, flat)] if isinstance(node, fx.Node) else None


@dataclass
class _Scores:
    q: fx.Node  # bnsd, as HF feeds the product
    k: fx.Node
    scale: float
    cap: Optional[float]
    bias: list[BiasTerm]


def _parse_product(term: BiasTerm) -> Optional[_Scores]:
    """[cap](scale * q @ k^T), or BLOOM's ``baddbmm(bias, q, k^T, beta=1, alpha=scale)`` (flat)."""
    node, cap, scale, bias = term.node, None, 1.0, []
    if term.flat_heads and is_op(node, aten.baddbmm.default):
        if arg(node, 3, "beta", 1) != 1 or literal_float(arg(node, 4, "alpha", 1)) is None:
            return None
        if not isinstance(node.args[0], fx.Node):
            return None
        scale, bias = literal_float(arg(node, 4, "alpha", 1)), [BiasTerm(node.args[0], True)]
        q, k_t = node.args[1], node.args[2]
    else:
        if (capped := _soft_cap(node)) is not None:
            node, cap = capped
        while (factor := _scalar_factor(node)) is not None:
            node, f = factor
            scale *= f
        if not is_op(node, (aten.matmul.default, aten.bmm.default)):
            return None
        q, k_t = node.args[0], node.args[1]
    if not _is_last_two_swap(k_t):
        return None
    k = k_t.args[0]
    if term.flat_heads:
        q, k = _unflatten_heads(q), _unflatten_heads(k)
    if ndim(q) != 4 or ndim(k) != 4:
        return None
    return _Scores(q, k, scale, cap, bias)


def _parse_scores(node: Any) -> Optional[_Scores]:
    """scores = [cap](scale * q @ k^T) + bias terms -> the product's parts and the other terms."""
    terms = _split_terms(node)
    if terms is None:
        return None
    products = [(t, p) for t in terms if (p := _parse_product(t)) is not None]
    if len(products) != 1:
        return None
    term, scores = products[0]
    scores.bias += [t for t in terms if t is not term]
    return scores


def _strip_max_subtraction(node: Any) -> Any:
    """``x - max(x, -1, keepdim=True)`` (a no-op for softmax, HF adds it for stability) -> x."""
    if not is_op(node, aten.sub.Tensor):
        return node
    x, m = node.args[:2]
    src = getitem_source(m, 0, aten.max.dim)
    if src is not None and src.args[0] is x and is_last_dim(src.args[1], ndim(x)) and arg(src, 2, "keepdim", False):
        return x
    if is_op(m, aten.amax.default) and m.args[0] is x and arg(m, 2, "keepdim", False) and \
            [norm_dim(d, ndim(x)) for d in m.args[1]] == [ndim(x) - 1]:
        return x
    return node


def _per_head_vector(node: Any, heads: int) -> Optional[fx.Node]:
    """The ``[H]`` tensor behind ``expand(reshape(t, [1, H, 1, 1]), [B, H, S, 1])``, else None."""
    while is_op(node, aten.expand.default):
        node = node.args[0]
    v = val(node)
    if not isinstance(v, torch.Tensor) or v.dim() != 4 or [static_size(d) for d in v.shape] != [1, heads, 1, 1]:
        return None
    while is_op(node, (*_VIEWS, aten.unsqueeze.default)):
        node = node.args[0]
    v = val(node)
    return node if isinstance(v, torch.Tensor) and v.dim() == 1 and static_size(v.shape[0]) == heads else None


def _drops_last_column(node: Any) -> bool:
    """``x[..., :-1]`` on the last dim."""
    if not is_op(node, aten.slice.Tensor) or not is_last_dim(arg(node, 1, "dim", 0), ndim(node)):
        return False
    return arg(node, 2, "start", None) in (0, None) and arg(node, 3, "end", None) == -1 and arg(node, 4, "step", 1) == 1


def _times_values(probs: fx.Node) -> Optional[tuple[fx.Node, fx.Node]]:
    """probs @ v -> (output [B, H, S, Dv], v), also as ``bmm`` over ``[B*H, ...]`` views."""
    pv = single_user(probs)
    if is_op(pv, aten.matmul.default) and pv.args[0] is probs and ndim(pv.args[1]) == 4:
        return pv, pv.args[1]
    if pv is None or not is_op(pv, _VIEWS) or ndim(pv) != 3 or not _is_head_unflatten_of(probs, pv):
        return None
    bmm = single_user(pv)
    if not is_op(bmm, aten.bmm.default) or bmm.args[0] is not pv or (v := _unflatten_heads(bmm.args[1])) is None:
        return None
    out = single_user(bmm)
    return (out, v) if _is_head_unflatten(out) else None


def _is_head_unflatten_of(x4: fx.Node, x3: fx.Node) -> bool:
    """``x3 = reshape(x4 [B, H, S, S'], [B*H, S, S'])``."""
    (b, h, s, s2), (bh, s3, s4) = val(x4).shape, val(x3).shape
    return same_size(b * h, bh) and same_size(s, s3) and same_size(s2, s4)


def match_eager(softmax: fx.Node) -> Optional[AttentionMatch]:
    if not is_op(softmax, (aten.softmax.int, aten._softmax.default)):
        return None
    if not is_last_dim(softmax.args[1], ndim(softmax)) or ndim(softmax) != 4:
        return None
    # forward: softmax -> [drop the sink column] -> [cast] -> probs @ v
    probs = softmax
    drops_sink = _drops_last_column(single_user(probs))
    if drops_sink:
        probs = single_user(probs)
    while (user := single_user(probs)) is not None and is_op(user, CAST_OPS):
        probs = user
    attended = _times_values(probs)
    if attended is None:
        return None
    output, v = attended
    # backward: [- max] -> [cat sinks] -> scores + bias terms -> [soft-cap] -> [scale] -> q @ k^T
    scores, sinks = _strip_max_subtraction(softmax.args[0]), None
    if drops_sink:
        if not is_op(scores, aten.cat.default) or not is_last_dim(arg(scores, 1, "dim", 0), ndim(scores)):
            return None
        parts = scores.args[0]
        heads = _heads(softmax)
        if len(parts) != 2 or heads is None or (sinks := _per_head_vector(parts[1], heads)) is None:
            return None
        scores = parts[0]
    parsed = _parse_scores(scores)
    if parsed is None:
        return None
    return AttentionMatch(output, parsed.q, strip_repeat_kv(parsed.k), strip_repeat_kv(v), parsed.scale, parsed.bias,
                          False, parsed.cap, sinks)


def _looks_like_attention(node: fx.Node) -> bool:
    """A 4-D softmax over the last dim: eager attention the matcher did not recognize."""
    return is_op(node, (aten.softmax.int, aten._softmax.default)) and ndim(node) == 4 and \
        is_last_dim(node.args[1], 4)


def _config_sizes(ctx: BuildContext) -> tuple[list[int], list[int]]:
    """(sliding windows, attention chunk sizes) the model config names: probe candidates."""
    config = getattr(ctx.factory, "config", None) if ctx is not None else None
    if config is not None and callable(getattr(config, "get_text_config", None)):
        config = config.get_text_config()
    windows, chunks = getattr(config, "sliding_window", None), getattr(config, "attention_chunk_size", None)
    return [w for w in (windows,) if isinstance(w, int)], [c for c in (chunks,) if isinstance(c, int)]


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
    """SDPA / eager attention (+ repeat_kv, masks, window, chunks, ALiBi, soft-cap, sinks) -> autodeploy::attention."""

    config_class = MatchAttentionConfig
    graph_only = True

    def apply(self, model, ctx: BuildContext):
        cfg: MatchAttentionConfig = self.config
        matches, skipped = [], []
        for node in model.graph.nodes:
            m = (try_match(match_sdpa, node) if cfg.match_sdpa else None) or (
                try_match(match_eager, node) if cfg.match_eager else None
            )
            if m is not None:
                matches.append(m)
            elif cfg.match_eager and _looks_like_attention(node):
                skipped.append(f"{node.name}: eager attention in a form the matcher does not know")

        editor = GraphEditor(model)
        verdicts: dict[tuple, MaskVerdict] = {}
        windows, chunks = _config_sizes(ctx)
        num = 0
        for m in matches:
            n_heads, n_kv, n_kv_v = _heads(m.q), _heads(m.k), _heads(m.v)
            if n_heads is None or n_kv is None or n_kv != n_kv_v or n_heads % n_kv:
                skipped.append(f"{m.output.name}: head counts q={n_heads} k={n_kv} v={n_kv_v} do not fit GQA")
                continue
            key = (tuple(m.bias), m.is_causal, n_heads, m.sinks is None)
            if key not in verdicts:
                verdicts[key] = classify_bias(
                    m.bias, model, heads=n_heads, is_causal=m.is_causal, config_windows=windows,
                    config_chunks=chunks, max_probe_len=cfg.max_mask_probe_len, row_shift_ok=m.sinks is None,
                )
            verdict = verdicts[key]
            if not verdict.ok:
                skipped.append(f"{m.output.name}: {verdict.reason}")
                continue
            with model.graph.inserting_before(m.output):
                q, k, v = (editor.call(aten.transpose.int, t, 1, 2) for t in (m.q, m.k, m.v))
                slopes = verdict.alibi_slopes
                if slopes is not None and tuple(val(slopes).shape) != (n_heads,):
                    slopes = editor.call(aten.reshape.default, slopes, [n_heads])
                variants = [verdict.sliding_window, m.logit_cap, m.sinks, slopes, verdict.chunk_size]
                while len(variants) > 2 and variants[-1] is None:  # graphs without the new variants stay as before
                    variants.pop()
                att = editor.call(torch.ops.autodeploy.attention.default, q, k, v, m.scale, *variants)
                out = editor.call(aten.transpose.int, att, 1, 2)
            editor.replace(m.output, out)
            editor.erase_unused([m.output])  # SDPA counts as impure (dropout RNG), so DCE keeps it
            num += 1
        for reason in skipped:
            log.warning("attention left as is: %s", reason)
        note = f"{len(skipped)} left as is: {skipped[0]}" + (" ..." if len(skipped) > 1 else "") if skipped else ""
        return model, TransformInfo(num_matches=num, is_clean=False, has_valid_shapes=editor.shapes_valid, note=note)
