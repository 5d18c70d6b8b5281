"""``autodeploy::moe``: SiLU-gated mixture of experts over already-routed tokens.

Weights in the transformers-5 3-D layout: ``w_gate_up [E, 2I, Hd]`` (gate rows first, then up),
``w_down [E, Hd, I]``. Routing (router linear, softmax/sigmoid, top-k, renormalization) stays
in the graph; the op takes its results: ``selected_experts [T, k]`` and ``routing_weights [T, k]``.
An id outside ``[0, E)`` contributes nothing, like transformers' expert-parallel sentinels.

Math follows transformers' ``grouped_mm`` experts: expert matmuls in the weights' dtype, the
weighting and the sum over k in the promoted dtype of expert output and routing weights, the
result cast to the input dtype.
"""

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
    if x.shape[0] <= DENSE_MAX_TOKENS or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        return _moe_dense(x, selected_experts, routing_weights, w_gate_up, w_down)
    return _moe_grouped(x, selected_experts, routing_weights, w_gate_up, w_down)


def _moe_dense(x, selected_experts, routing_weights, w_gate_up, w_down) -> torch.Tensor:
    """Every expert on every token, weighted by its routing weight (0 where not chosen).

    For decode-sized batches this reads each expert's weights once, like the grouped path, and
    needs no host sync, so it can be captured in a CUDA graph.
    """
    x_w = x.to(w_gate_up.dtype)
    out = None
    for expert in range(w_gate_up.shape[0]):
        weight = (routing_weights * (selected_experts == expert)).sum(dim=1, keepdim=True)  # [T, 1]
        gate, up = F.linear(x_w, w_gate_up[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w_down[expert]) * weight
        out = y if out is None else out + y
    return out.to(x.dtype)


def _moe_grouped(x, selected_experts, routing_weights, w_gate_up, w_down) -> torch.Tensor:
    num_tokens, top_k = selected_experts.shape
    num_experts = w_gate_up.shape[0]
    flat_experts = selected_experts.reshape(-1)
    # ids outside [0, E) (other ranks' experts under expert parallelism) go to a last group, E,
    # that no expert reads: their slots stay 0
    local = (flat_experts >= 0) & (flat_experts < num_experts)
    flat_experts = torch.where(local, flat_experts, num_experts)
    # group (token, slot) pairs by expert; one host sync for the group sizes
    order = torch.argsort(flat_experts, stable=True)
    counts = torch.bincount(flat_experts, minlength=num_experts + 1).tolist()
    x_w = x.to(w_gate_up.dtype)
    slot_out = x_w.new_zeros((num_tokens * top_k, w_down.shape[1]))
    start = 0
    for expert, count in enumerate(counts[:num_experts]):
        if count == 0:
            continue
        rows = order[start : start + count]
        start += count
        gate, up = F.linear(x_w[rows // top_k], w_gate_up[expert]).chunk(2, dim=-1)
        slot_out[rows] = F.linear(F.silu(gate) * up, w_down[expert])
    weighted = slot_out * routing_weights.reshape(-1, 1)
    return weighted.view(num_tokens, top_k, -1).sum(dim=1).to(x.dtype)


@moe.register_fake
def _moe_fake(x, selected_experts, routing_weights, w_gate_up, w_down):
    _check(x, selected_experts, routing_weights, w_gate_up, w_down)
    return x.new_empty(x.shape)
