"""Canonical ops as plain torch code: for inductor, and for the host's eager graphs.

A ``torch.library`` custom op is opaque to ``torch.compile``: inductor calls it as an eager
kernel (under torch-opt, ``rms_norm`` ran as six eager kernels, 65 times a decode step). Before ``torch-compile`` / ``torch-opt`` compile the graph, the row-wise
canonical ops below are replaced by their reference implementations (the same math the ops run
on the CPU), so inductor sees them and fuses them with the ops around them. ``linear`` (the
one-token GEMV's op) becomes ``F.linear`` in graphs traced for more than one token. Attention,
MoE and the SSM ops stay ops (their own kernels).

On the CPU a torch-simple graph runs op by op in Python, so a custom op's dispatch (schema checks,
the mutation bookkeeping of the cached attention) and every extra kernel show in the time per
token: there the row-wise ops and the torch attention backend call lean host functions with the
same values (``inline_for_host``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import fx


def reference_impls() -> dict[object, Callable]:
    from ..custom_ops import add_rms_norm, linear, rms_norm, rope, silu_mul

    ops = torch.ops.autodeploy
    return {
        ops.linear.default: linear.linear_for_inductor,
        ops.rms_norm.default: rms_norm.rms_norm_reference,
        ops.fused_add_rms_norm.default: add_rms_norm.fused_add_rms_norm_reference,
        ops.silu_mul.default: silu_mul.silu_mul_reference,
        ops.rope.default: rope.rope_reference,
    }


def host_impls() -> dict[object, Callable]:
    from ..custom_ops import add_rms_norm, rms_norm, rope, silu_mul
    from ..custom_ops.cached_attention import torch_backend

    ops, aten = torch.ops.autodeploy, torch.ops.aten
    return {
        ops.rms_norm.default: rms_norm.rms_norm_host,
        ops.fused_add_rms_norm.default: add_rms_norm.fused_add_rms_norm_host,
        ops.silu_mul.default: silu_mul.silu_mul_reference,
        ops.rope.default: rope.rope_host,
        ops.torch_cached_attention.default: torch_backend.cached_attention,
        # the graph's own glue, through torch's direct bindings (an OpOverload call costs ~2 us more)
        aten.linear.default: torch.nn.functional.linear,
        aten.view.default: torch.Tensor.view,
        aten.reshape.default: torch.Tensor.reshape,
        aten.contiguous.default: torch.Tensor.contiguous,
        aten.split_with_sizes.default: torch.Tensor.split_with_sizes,
    }


def inline_for_inductor(gm: fx.GraphModule) -> int:
    """Point every call of those ops at its reference implementation; returns how many."""
    return _inline(gm, reference_impls())


def inline_for_host(gm: fx.GraphModule) -> int:
    """Point every call of the ops ``host_impls`` names at its host function; returns how many
    canonical ops it replaced (the aten glue goes along uncounted)."""
    return _inline(gm, host_impls())


def _inline(gm: fx.GraphModule, impls: dict[object, Callable]) -> int:
    count = changed = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in impls:
            count += str(node.target).startswith("autodeploy.")
            node.target = impls[node.target]
            changed += 1
    if changed:
        gm.recompile()
    return count
