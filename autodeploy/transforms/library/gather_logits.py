"""Logits only for the tokens that are sampled: each sequence's last one.

- ``gather_last_token_logits`` (stage post_load_fusion): puts ``autodeploy::last_tokens`` on the
  input of the LM head (the ``linear`` that makes the graph's output, possibly followed by
  row-wise ops such as casts or logit soft-capping). A prefill of T tokens then runs the head's
  GEMM and writes logits for its sequences only, not ``[T, vocab]``.
- ``insert_cached_last_tokens`` (stage cache_init, after the cached attention/SSM ops): the op
  becomes ``index_select`` of the rows in the graph input ``logits_idx [G]`` (int64), which the
  runtime fills with each sequence's last token (``cu_seqlen[1:] - 1``, so ``G == B``) or, for a
  request that asks for prompt logprobs, every token of its chunk (``SequenceInfo.build``): the
  cached graph returns ``[1, G, vocab]`` in batch order. ``G`` is a batch dim like ``B`` (dynamic
  for torch.compile, ``arange`` in a decode CUDA graph). The engine takes either form
  (``Engine._forward_and_sample``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import fx

import autodeploy.custom_ops.last_tokens  # noqa: F401  registers torch.ops.autodeploy.last_tokens

from ..interface import BaseTransform, BuildContext, TransformConfig, TransformInfo, register
from ..patterns.nodes import CAST_OPS, GraphEditor, is_op, set_fake_val, val
from .kvcache import _fake, add_input, add_metadata_inputs, as_plain_graph_module, ensure_cache

aten = torch.ops.aten

# ops that act on each row of the logits on their own (casts, scaling, tanh soft-capping)
_ROW_WISE = (*CAST_OPS, aten.mul.Tensor, aten.div.Tensor, aten.tanh.default)


def _output_tensor(gm: fx.GraphModule) -> Optional[fx.Node]:
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    result = output.args[0]
    if isinstance(result, (tuple, list)):
        result = result[0] if len(result) == 1 else None
    return result if isinstance(result, fx.Node) else None


def _scalar_like(x) -> bool:
    v = val(x)
    return not isinstance(x, fx.Node) or (isinstance(v, torch.Tensor) and v.dim() <= 1)


def _vocab_all_gather(node) -> bool:
    """Tensor parallelism's ``autodeploy::all_gather(x, dim, group)`` of a vocab-sharded head along
    the last dim: each token's row is gathered on its own, so it is row-wise too."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and str(node.target).startswith("autodeploy.all_gather")):
        return False
    x, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    v = val(x)
    return isinstance(dim, int) and isinstance(v, torch.Tensor) and dim in (-1, v.dim() - 1)


def find_lm_head(gm: fx.GraphModule) -> tuple[Optional[fx.Node], list[fx.Node]]:
    """(the head ``linear``, the row-wise nodes between it and the output), or (None, [])."""
    node, chain = _output_tensor(gm), []
    while node is not None and (_vocab_all_gather(node) or is_op(node, _ROW_WISE)):
        tensor_args = [a for a in node.args if isinstance(a, fx.Node) and not _scalar_like(a)]
        if _vocab_all_gather(node):
            tensor_args = [node.args[0]]
        elif len(tensor_args) != 1 or not all(_scalar_like(a) for a in node.args if a is not tensor_args[0]):
            return None, []
        chain.append(node)
        node = tensor_args[0]
    if node is None or not (is_op(node, aten.linear.default) or str(node.target) == "autodeploy.fp8_linear.default"):
        return None, []
    hidden = val(node.args[0])
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:  # [B, S, H]
        return None, []
    return node, chain[::-1]


@dataclass
class GatherLastTokenLogitsConfig(TransformConfig):
    stage: str = "post_load_fusion"
    requires_shape_prop: bool = True


@register("gather_last_token_logits")
class GatherLastTokenLogits(BaseTransform):
    config_class = GatherLastTokenLogitsConfig
    graph_only = True

    def apply(self, gm, ctx: BuildContext):
        head, chain = find_lm_head(gm)
        if head is None:
            return gm, TransformInfo(num_matches=0, note="no LM head linear at the output")
        editor = GraphEditor(gm)
        with gm.graph.inserting_before(head):
            last = editor.call(torch.ops.autodeploy.last_tokens.default, head.args[0])
        head.args = (last, *head.args[1:])
        try:  # the head and what follows it now have one row per sequence
            for node in (head, *chain):
                set_fake_val(node, editor.fake_mode)
            shapes_valid = editor.shapes_valid
        except Exception:  # noqa: BLE001 - the next transform that needs shapes re-propagates them
            shapes_valid = False
        return gm, TransformInfo(num_matches=1, is_clean=False, has_valid_shapes=shapes_valid)


@dataclass
class InsertCachedLastTokensConfig(TransformConfig):
    stage: str = "cache_init"


@register("insert_cached_last_tokens")
class InsertCachedLastTokens(BaseTransform):
    config_class = InsertCachedLastTokensConfig
    graph_only = True

    def apply(self, gm, ctx: BuildContext):
        op = torch.ops.autodeploy.last_tokens.default
        nodes = [n for n in gm.graph.nodes if is_op(n, op)]
        if not nodes:
            return gm, TransformInfo(num_matches=0, note="no last_tokens op in the graph")
        gm = as_plain_graph_module(gm)
        cache = ensure_cache(ctx)
        add_metadata_inputs(gm, cache)
        index = add_input(gm, "logits_idx", _fake(gm, (cache.max_batch_size,), torch.int64, cache.device))
        editor = GraphEditor(gm)
        for node in nodes:
            with gm.graph.inserting_before(node):
                rows = editor.call(aten.index_select.default, node.args[0], 1, index)
            editor.replace(node, rows)
            gm.graph.erase_node(node)
        gm.recompile()
        return gm, TransformInfo(num_matches=len(nodes), is_clean=False, has_valid_shapes=editor.shapes_valid)
