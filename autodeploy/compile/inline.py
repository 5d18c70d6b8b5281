"""Canonical ops as plain torch code for inductor.

A ``torch.library`` custom op is opaque to ``torch.compile``: inductor calls it as an eager
kernel (the H200 profile of be82854: ``rms_norm`` ran as six eager kernels, 65 times a decode
step, under torch-opt). Before ``torch-compile`` / ``torch-opt`` compile the graph, the row-wise
canonical ops below are replaced by their reference implementations (the same math the ops run
on the CPU), so inductor sees them and fuses them with the ops around them. ``linear`` (the
one-token GEMV's op) becomes ``F.linear`` in graphs traced for more than one token. Attention,
MoE and the SSM ops stay ops (their own kernels).
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


def inline_for_inductor(gm: fx.GraphModule) -> int:
    """Point every call of those ops at its reference implementation; returns how many."""
    impls = reference_impls()
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in impls:
            node.target = impls[node.target]
            count += 1
    if count:
        gm.recompile()
    return count
