"""``autodeploy::moe``: SiLU-gated mixture of experts over already-routed tokens.

Weights in the transformers-5 3-D layout: ``w_gate_up [E, 2I, Hd]`` (gate rows first, then up),
``w_down [E, Hd, I]``. Routing (router linear, softmax/sigmoid, top-k, renormalization) stays
in the graph; the op takes its results: ``selected_experts [T, k]`` and ``routing_weights [T, k]``.
An id outside ``[0, E)`` contributes nothing, like transformers' expert-parallel sentinels.

Math follows transformers' ``grouped_mm`` experts: expert matmuls in the weights' dtype, the
weighting and the sum over k in the promoted dtype of expert output and routing weights, the
result cast to the input dtype.
"""

from typing import List, Optional

import torch
import torch.nn.functional as F


def _check(x, selected_experts, routing_weights, w_gate_up, w_down) -> None:
    if x.dim() != 2 or selected_experts.dim() != 2 or routing_weights.shape != selected_experts.shape:
        raise ValueError(
            "autodeploy::moe expects x [T,Hd], selected_experts [T,k], routing_weights [T,k]; got "
            f"{tuple(x.shape)}, {tuple(selected_experts.shape)}, {tuple(routing_weights.shape)}"
        )
    if w_gate_up.dim() != 3 or w_down.dim() != 3 or w_gate_up.shape[1] != 2 * w_down.shape[2]:
        raise ValueError(
            f"autodeploy::moe expects w_gate_up [E,2I,Hd], w_down [E,Hd,I]; got {tuple(w_gate_up.shape)}, {tuple(w_down.shape)}"
        )


# at most this many tokens run every expert on every token (no host sync; CUDA-graph safe)
DENSE_MAX_TOKENS = 64


@torch.library.custom_op("autodeploy::moe", mutates_args=())
def moe(
    x: torch.Tensor,
    selected_experts: torch.Tensor,
    routing_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    _check(x, selected_experts, routing_weights, w_gate_up, w_down)
    if _runs_dense(x):
        return _moe_dense(x, selected_experts, routing_weights, w_gate_up, w_down)
    return _moe_grouped(x, selected_experts, routing_weights, w_gate_up, w_down)


def _runs_dense(x: torch.Tensor) -> bool:
    return x.shape[0] <= DENSE_MAX_TOKENS or (x.is_cuda and torch.cuda.is_current_stream_capturing())


def _moe_dense(x, selected_experts, routing_weights, w_gate_up, w_down) -> torch.Tensor:
    return _dense(x.to(w_gate_up.dtype), selected_experts, routing_weights, w_gate_up.shape[0],
                  _expert_mlp(w_gate_up, w_down)).to(x.dtype)


def _moe_grouped(x, selected_experts, routing_weights, w_gate_up, w_down) -> torch.Tensor:
    return _grouped(x.to(w_gate_up.dtype), selected_experts, routing_weights, w_gate_up.shape[0], w_down.shape[1],
                    _expert_mlp(w_gate_up, w_down)).to(x.dtype)


def _expert_mlp(w_gate_up, w_down):
    """``mlp(x, e)``: expert ``e``'s SiLU-gated MLP on the rows ``x``."""

    def mlp(x, expert):
        gate, up = F.linear(x, w_gate_up[expert]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w_down[expert])

    return mlp


def _dense(x, selected_experts, routing_weights, num_experts, mlp) -> torch.Tensor:
    """Every expert on every token, weighted by its routing weight (0 where not chosen).

    For decode-sized batches this reads each expert's weights once, like the grouped path, and
    needs no host sync, so it can be captured in a CUDA graph.
    """
    out = None
    for expert in range(num_experts):
        weight = (routing_weights * (selected_experts == expert)).sum(dim=1, keepdim=True)  # [T, 1]
        y = mlp(x, expert) * weight
        out = y if out is None else out + y
    return out


def _grouped(x, selected_experts, routing_weights, num_experts, hidden, mlp) -> torch.Tensor:
    num_tokens, top_k = selected_experts.shape
    flat_experts = selected_experts.reshape(-1)
    # ids outside [0, E) (other ranks' experts under expert parallelism) go to a last group, E,
    # that no expert reads: their slots stay 0
    local = (flat_experts >= 0) & (flat_experts < num_experts)
    flat_experts = torch.where(local, flat_experts, num_experts)
    # group (token, slot) pairs by expert; one host sync for the group sizes
    order = torch.argsort(flat_experts, stable=True)
    counts = torch.bincount(flat_experts, minlength=num_experts + 1).tolist()
    slot_out = x.new_zeros((num_tokens * top_k, hidden))  # ids outside [0, E) stay 0
    start = 0
    for expert, count in enumerate(counts[:num_experts]):
        if count == 0:
            continue
        rows = order[start : start + count]
        start += count
        slot_out[rows] = mlp(x[rows // top_k], expert)
    weighted = slot_out * routing_weights.reshape(-1, 1)
    return weighted.view(num_tokens, top_k, -1).sum(dim=1)


@moe.register_fake
def _moe_fake(x, selected_experts, routing_weights, w_gate_up, w_down):
    _check(x, selected_experts, routing_weights, w_gate_up, w_down)
    return x.new_empty(x.shape)


@torch.library.custom_op("autodeploy::fp8_moe", mutates_args=())
def fp8_moe(
    x: torch.Tensor,
    selected_experts: torch.Tensor,
    routing_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    gate_up_scale: torch.Tensor,
    down_scale: torch.Tensor,
    block_size: Optional[List[int]] = None,
) -> torch.Tensor:
    """``moe`` with FP8 experts (``quantize_fp8``): weights as ``moe``'s in ``float8_e4m3fn``, their
    scales per channel (``[E, 2I]``, ``[E, Hd]``) or in blocks (``[E, 2I/bn, Hd/bk]``, ``[E, Hd/bn,
    I/bk]``, ``block_size``); the expert GEMMs are ``fp8_linear``'s (``fp8_matmul``), in ``x``'s dtype."""
    _check(x, selected_experts, routing_weights, w_gate_up, w_down)
    from .fp8_linear import fp8_matmul

    def mlp(rows, expert):
        gate, up = fp8_matmul(rows, w_gate_up[expert], gate_up_scale[expert], block_size=block_size).chunk(2, dim=-1)
        return fp8_matmul(F.silu(gate) * up, w_down[expert], down_scale[expert], block_size=block_size)

    if _runs_dense(x):
        return _dense(x, selected_experts, routing_weights, w_gate_up.shape[0], mlp).to(x.dtype)
    return _grouped(x, selected_experts, routing_weights, w_gate_up.shape[0], w_down.shape[1], mlp).to(x.dtype)


@fp8_moe.register_fake
def _fp8_moe_fake(x, selected_experts, routing_weights, w_gate_up, w_down, gate_up_scale, down_scale, block_size=None):
    _check(x, selected_experts, routing_weights, w_gate_up, w_down)
    from .fp8_linear import check_scale

    check_scale(w_gate_up, gate_up_scale, block_size)
    check_scale(w_down, down_scale, block_size)
    return x.new_empty(x.shape)
