"""Rewrite transformers' ``grouped_mm`` experts into ``autodeploy::moe``.

transformers 5 runs MoE experts (Mixtral, Qwen2/3-MoE, ...) through ``grouped_mm_experts_forward``:

    sort(expert ids) -> gather tokens (perm // k) -> histc -> cumsum offsets
    -> grouped_mm(gate_up^T) -> chunk -> silu(gate) * up -> grouped_mm(down^T)
    -> * routing weight -> unsort (index_put_ of an arange) -> view(T, k, H).sum(1) [-> cast]

``grouped_mm`` is ``transformers::grouped_mm_fallback`` or ``aten._grouped_mm`` depending on the
dtype and torch version. The whole dispatch chain becomes one op fed by the router's top-k ids
and weights, which stay in the graph (softmax or sigmoid, renormalized or not, shared experts:
all plain graph code). Experts with biases, another activation or transposed storage are not
matched and stay as they are: gpt-oss's experts (``[E, Hd, 2I]`` storage, interleaved gate/up
columns, expert biases, clamped SwiGLU ``(up + 1) * gate * sigmoid(alpha * gate)``) stay
transformers' grouped_mm graph code, which is right token by token in the flattened batch.

transformers' expert-parallel sentinel handling (always there in 5.17, only with expert
parallelism in 5.24) adds ``mask = (sorted ids >= E).unsqueeze(-1)``, an in-place
``clamp_(sorted ids, max=E-1)``, ``masked_fill_(gathered tokens, mask, 0)`` and a
``masked_fill(out, mask, 0)`` after each grouped_mm. They zero the rows of ids outside
``[0, E)``, which ``autodeploy::moe`` leaves out as well, so they belong to the chain (E is read
from the expert weights' shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import fx

import autodeploy.custom_ops.moe  # noqa: F401  registers torch.ops.autodeploy.moe

from ..interface import BaseTransform, BuildContext, TransformConfig, TransformInfo, register
from ..patterns.nodes import (
    is_op,
    CAST_OPS,
    GraphEditor,
    arg,
    commutative_operands,
    dtype,
    getitem_source,
    is_last_dim,
    ndim,
    norm_dim,
    same_size,
    single_user,
    static_size,
    try_match,
    val,
)

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def grouped_mm_ops() -> tuple:
    ops = [aten._grouped_mm.default]
    if hasattr(torch.ops.transformers, "grouped_mm_fallback"):
        ops.append(torch.ops.transformers.grouped_mm_fallback.default)
    return tuple(ops)


@dataclass
class MoeMatch:
    output: fx.Node
    x: fx.Node  # [T, Hd]
    selected_experts: fx.Node  # [T, k]
    routing_weights: fx.Node  # [T, k]
    w_gate_up: fx.Node  # [E, 2I, Hd]
    w_down: fx.Node  # [E, Hd, I]
    chain: list[fx.Node]  # nodes of the dispatch chain, erased once unused


class _NoMatch(Exception):
    pass


def _need(cond: Any) -> None:
    if not cond:
        raise _NoMatch


_MASKED_FILLS = (aten.masked_fill.Scalar, aten.masked_fill_.Scalar)


class _Walker:
    """Follows one grouped_mm experts chain, collecting its nodes."""

    def __init__(self, ops: tuple):
        self.ops = ops
        self.chain: list[fx.Node] = []
        self.fill_masks: set[fx.Node] = set()  # sentinel masks of skipped masked_fills, checked at the end

    def skip_fill(self, node: Any) -> Any:
        """``masked_fill[_](t, mask, 0)`` -> t (the mask is checked once the sort is known)."""
        if is_op(node, _MASKED_FILLS) and node.args[2] == 0 and isinstance(node.args[1], fx.Node):
            self.chain.append(node)
            self.fill_masks.add(node.args[1])
            return node.args[0]
        return node

    def past_fill(self, node: fx.Node) -> fx.Node:
        """``node``, or its single user when that is a sentinel ``masked_fill`` of it."""
        user = single_user(node)
        if is_op(user, _MASKED_FILLS) and user.args[0] is node and self.skip_fill(user) is node:
            return user
        return node

    def sentinel_masks(self, sorted_ids: fx.Node, num_experts: int) -> None:
        """Every skipped fill's mask is ``unsqueeze(sorted_ids >= E, -1)``; an in-place
        ``clamp_(sorted_ids, max=E-1)`` without users belongs to the chain too."""
        for mask in self.fill_masks:
            self.take(mask, aten.unsqueeze.default)
            _need(norm_dim(mask.args[1], 2) == 1)
            ge = self.take(mask.args[0], aten.ge.Scalar)
            _need(ge.args[0] is sorted_ids and ge.args[1] == num_experts)
        for user in sorted_ids.users:
            if (is_op(user, aten.clamp_.default) and not user.users and user.args[0] is sorted_ids
                    and arg(user, 1, "min", None) is None and arg(user, 2, "max", None) == num_experts - 1):
                self.chain.append(user)

    def take(self, node: Any, op: Any = None) -> fx.Node:
        _need(isinstance(node, fx.Node) and (op is None or is_op(node, op)))
        self.chain.append(node)
        return node

    def skip_casts(self, node: Any) -> Any:
        while isinstance(node, fx.Node) and is_op(node, CAST_OPS):
            self.chain.append(node)
            node = node.args[0]
        return node

    def grouped_mm(self, node: Any) -> tuple[fx.Node, fx.Node, fx.Node]:
        """-> (input, weight [E, out, in] stored as HF does, offsets)."""
        self.take(node, self.ops)
        _need(arg(node, 3, "bias", None) is None and node.kwargs.get("out_dtype") is None)
        inp, w_t, offs = node.args[0], node.args[1], arg(node, 2, "offs", None)
        self.take(w_t, aten.transpose.int)
        _need({norm_dim(w_t.args[1], 3), norm_dim(w_t.args[2], 3)} == {1, 2} and ndim(w_t.args[0]) == 3)
        return self.skip_fill(self.skip_casts(inp)), w_t.args[0], offs

    def flat(self, node: Any) -> fx.Node:
        """``reshape(t, [-1])`` of a 2-D ``t`` -> t."""
        self.take(node, _VIEWS)
        _need(list(node.args[1]) == [-1] and ndim(node.args[0]) == 2)
        return node.args[0]


def match_moe(down: fx.Node, ops: tuple) -> Optional[MoeMatch]:
    if not is_op(down, ops):
        return None
    w = _Walker(ops)
    try:
        act, w_down, offs = w.grouped_mm(down)
        # silu(gate) * up from chunk(gate_up_out, 2, -1)
        w.take(act, aten.mul.Tensor)
        for silu, up_half in commutative_operands(act):
            if is_op(silu, aten.silu.default):
                break
        else:
            raise _NoMatch
        w.take(silu)
        chunk = getitem_source(silu.args[0], 0, aten.chunk.default)
        _need(chunk is not None and getitem_source(up_half, 1, aten.chunk.default) is chunk)
        _need(chunk.args[1] == 2 and is_last_dim(arg(chunk, 2, "dim", 0), ndim(chunk.args[0])))
        w.chain += [silu.args[0], up_half, chunk]
        gathered, w_gate_up, offs_up = w.grouped_mm(w.skip_fill(chunk.args[0]))
        _need(offs_up is offs)
        # tokens gathered in expert order: x[perm // k]
        w.take(gathered, aten.index.Tensor)
        x, (token_of_slot,) = gathered.args[0], gathered.args[1]
        w.take(token_of_slot, aten.floor_divide.default)
        perm, top_k = token_of_slot.args
        sort = getitem_source(perm, 1, (aten.sort.default, aten.sort.stable))
        _need(sort is not None and not arg(sort, 2, "descending", False) and isinstance(top_k, int))
        w.chain += [perm, sort]
        selected = w.flat(sort.args[0])
        # offsets = cumsum(histc(sorted ids, bins=E, min=0, max=E-1))
        num_experts = static_size(val(w_gate_up).shape[0])
        w.take(offs, aten.cumsum.default)
        histc = w.take(offs.args[0], aten.histc.default)
        _need((arg(histc, 1, "bins", 100), arg(histc, 2, "min", 0), arg(histc, 3, "max", 0)) == (num_experts, 0, num_experts - 1))
        sorted_ids = w.skip_casts(histc.args[0])
        _need(getitem_source(sorted_ids, 0, (aten.sort.default, aten.sort.stable)) is sort)
        w.chain.append(sorted_ids)
        # weighted = [masked_fill(]out[)] * routing_weight[perm][:, None]
        down_out = w.past_fill(down)
        weighted = w.take(single_user(down_out), aten.mul.Tensor)
        for o, weight_col in commutative_operands(weighted):
            if o is down_out and is_op(weight_col, aten.unsqueeze.default):
                break
        else:
            raise _NoMatch
        w.take(weight_col)
        _need(norm_dim(weight_col.args[1], 2) == 1)
        per_slot = w.take(weight_col.args[0], aten.index.Tensor)
        _need(list(per_slot.args[1]) == [perm])
        routing = w.flat(per_slot.args[0])
        # unsort: out[inv_perm] with inv_perm[perm] = arange
        unsorted = w.take(single_user(weighted), aten.index.Tensor)
        (inv_perm,) = unsorted.args[1]
        w.take(inv_perm, (aten.index_put_.default, aten.index_put.default))
        _need(list(inv_perm.args[1]) == [perm] and is_op(inv_perm.args[2], aten.arange.default))
        w.take(inv_perm.args[0], aten.empty_like.default)
        w.take(inv_perm.args[2])
        # view(T, k, H).sum(1) [-> cast to x's dtype]
        grouped = w.take(single_user(unsorted), _VIEWS)
        _need(ndim(grouped) == 3 and static_size(val(grouped).shape[1]) == top_k)
        out = w.take(single_user(grouped), aten.sum.dim_IntList)
        _need(list(out.args[1]) in ([1], [-2]) and not arg(out, 2, "keepdim", False))
        if (cast := single_user(out)) is not None and is_op(cast, CAST_OPS):
            out = w.take(cast)
        # shapes: x [T, Hd], ids/weights [T, k], weights [E, 2I, Hd] / [E, Hd, I]
        xv, sv, rv, gu, dn = (val(n) for n in (x, selected, routing, w_gate_up, w_down))
        _need(xv.dim() == 2 and sv.dim() == 2 and static_size(sv.shape[1]) == top_k)
        _need(same_size(sv.shape[0], xv.shape[0]) and rv.dim() == 2 and same_size(rv.shape[0], sv.shape[0]))
        _need(static_size(rv.shape[1]) == top_k and not sv.dtype.is_floating_point)
        _need(gu.dim() == 3 and dn.dim() == 3 and gu.shape[0] == dn.shape[0] and gu.shape[2] == xv.shape[1])
        _need(gu.shape[1] == 2 * dn.shape[2] and dn.shape[1] == xv.shape[1])
        _need(dtype(out) == dtype(x))
        w.sentinel_masks(sorted_ids, num_experts)
    except (_NoMatch, AttributeError, IndexError, TypeError, ValueError):
        return None
    return MoeMatch(out, x, selected, routing, w_gate_up, w_down, w.chain)


@dataclass
class MatchMoeConfig(TransformConfig):
    stage: str = "pattern_matcher"
    requires_shape_prop: bool = True


@register("match_moe_pattern")
class MatchMoePattern(BaseTransform):
    """transformers grouped_mm experts (sort/histc/cumsum dispatch + SiLU-gated experts) -> autodeploy::moe."""

    config_class = MatchMoeConfig
    graph_only = True

    def apply(self, model, ctx: BuildContext):
        ops = grouped_mm_ops()
        editor = GraphEditor(model)
        matches = [m for node in model.graph.nodes if (m := try_match(match_moe, node, ops)) is not None]
        for m in matches:
            with model.graph.inserting_before(m.output):
                out = editor.call(
                    torch.ops.autodeploy.moe.default, m.x, m.selected_experts, m.routing_weights, m.w_gate_up, m.w_down
                )
            editor.replace(m.output, out)
            # index_put_ is in-place, so plain dead-code elimination would keep the chain alive
            editor.erase_unused(m.chain)
        unmatched = sum(1 for n in model.graph.nodes if is_op(n, ops))
        note = f"{unmatched} grouped_mm call(s) left as is" if unmatched else ""
        return model, TransformInfo(num_matches=len(matches), is_clean=False, has_valid_shapes=editor.shapes_valid, note=note)
