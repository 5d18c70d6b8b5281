"""DBRX experts as ``autodeploy::moe``: HF's expert loop depends on the routing data.

``DbrxExperts`` loops in Python over the experts that received tokens (``nonzero`` of the routing
mask), which torch.export rejects (``GuardOnDataDependentSymNode ... Eq(u0, 0)``); DBRX has no
``grouped_mm`` experts path in transformers for the MoE matcher to find. During export the
experts' forward computes the same thing with the canonical op: the router (softmax, top-k,
p-norm renormalization) stays plain graph code and hands its ids and weights to the op.

DBRX stores each expert's gate, up and down matrices as rows of ``w1``, ``v1``, ``w2``
(``[E * I, H]``, ``down = h @ w2[e]``); the op takes ``w_gate_up [E, 2I, H]`` (gate rows first)
and ``w_down [E, H, I]``. Views use -1 for the expert count so expert-parallel slices fit.
"""

from __future__ import annotations

import contextlib
import importlib

import torch
from torch import nn

from . import register_patch


def dbrx_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
    from transformers.activations import SiLUActivation

    from autodeploy.custom_ops import moe  # noqa: F401 - registers the op

    if not isinstance(self.mlp.activation_fn, (nn.SiLU, SiLUActivation)):
        raise RuntimeError(
            f"export patch dbrx_experts: DBRX experts with activation {type(self.mlp.activation_fn).__name__} are "
            "not supported (autodeploy::moe computes SiLU-gated experts)"
        )
    batch_size = hidden_states.shape[0]
    x = hidden_states.reshape(-1, self.hidden_size)
    experts_shape = (-1, self.ffn_hidden_size, self.hidden_size)
    w_gate_up = torch.cat([self.mlp.w1.view(experts_shape), self.mlp.v1.view(experts_shape)], dim=1)
    w_down = self.mlp.w2.view(experts_shape).transpose(1, 2)
    out = torch.ops.autodeploy.moe(x, top_k_index, top_k_weights, w_gate_up, w_down)
    return out.view(batch_size, -1, self.hidden_size)


@register_patch("dbrx_experts", model_types=("dbrx",))
@contextlib.contextmanager
def dbrx_experts(model: nn.Module):
    experts_cls = importlib.import_module("transformers.models.dbrx.modeling_dbrx").DbrxExperts
    original = experts_cls.forward
    experts_cls.forward = dbrx_experts_forward
    try:
        yield
    finally:
        experts_cls.forward = original
