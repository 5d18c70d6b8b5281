"""Mamba2 mixers (Mamba2, NemotronH, Bamba): conv1d and the SSD scan behind ``autodeploy`` ops.

HF's torch path pads ``seq`` to a multiple of ``chunk_size`` and branches on it, so an export
specializes ``seq`` (only multiples of the chunk above one chunk run). During export the mixer's
forward is swapped for one that does exactly HF's (uncached) computation but calls
``autodeploy::causal_conv1d`` and ``autodeploy::ssm_scan``; both are opaque to export, so ``batch``
and ``seq`` stay dynamic. Views use -1 for head/group counts so TP sharding needs no shape fixes.
"""

from __future__ import annotations

import contextlib
import importlib

import torch
from torch import nn

from . import register_patch

# (module, class) of the mixers that share HF's Mamba2 mixer layout (same attributes, same math)
MIXER_CLASSES = (
    ("transformers.models.mamba2.modeling_mamba2", "Mamba2Mixer"),
    ("transformers.models.nemotron_h.modeling_nemotron_h", "NemotronHMamba2Mixer"),
    ("transformers.models.bamba.modeling_bamba", "BambaMixer"),
)

_REQUIRED_ATTRS = (
    "in_proj", "conv1d", "dt_bias", "A_log", "D", "norm", "out_proj", "intermediate_size", "conv_dim",
    "num_heads", "head_dim", "n_groups", "ssm_state_size", "chunk_size", "time_step_limit", "activation",
)


def _mixer_classes() -> list[type]:
    classes = []
    for module_name, class_name in MIXER_CLASSES:
        try:
            classes.append(getattr(importlib.import_module(module_name), class_name))
        except (ImportError, AttributeError):
            continue  # not in this transformers version
    return classes


def mamba2_mixer_forward(self, hidden_states: torch.Tensor, *args, attention_mask: torch.Tensor | None = None,
                         **kwargs) -> torch.Tensor:
    """HF's uncached Mamba2 mixer forward with the sequence-dependent parts as custom ops."""
    from autodeploy.custom_ops import ssm  # noqa: F401 - registers the ops

    cache = kwargs.get("cache", kwargs.get("cache_params", args[0] if args else None))
    if cache is not None:
        raise RuntimeError(f"{type(self).__name__}: export runs without a cache (use_cache=False)")
    batch, seq, _ = hidden_states.shape
    dtype = hidden_states.dtype
    if attention_mask is not None:  # zero out padding tokens, as HF does
        hidden_states = (hidden_states * attention_mask[:, :, None]).to(dtype)
    projected = self.in_proj(hidden_states)
    A = -torch.exp(self.A_log.float())
    gate, xBC, dt = projected.split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
    xBC = torch.ops.autodeploy.causal_conv1d(xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.activation)
    if attention_mask is not None:
        xBC = (xBC * attention_mask[:, :, None]).to(xBC.dtype)
    groups_state = self.n_groups * self.ssm_state_size
    x, B, C = torch.split(xBC, [self.intermediate_size, groups_state, groups_state], dim=-1)
    dt_min, dt_max = self.time_step_limit
    y = torch.ops.autodeploy.ssm_scan(
        x.view(batch, seq, -1, self.head_dim),
        dt,
        A,
        B.view(batch, seq, -1, self.ssm_state_size),
        C.view(batch, seq, -1, self.ssm_state_size),
        self.D,
        self.dt_bias,
        float(dt_min),
        float(dt_max),
        int(self.chunk_size),
    )
    y = self.norm(y.reshape(batch, seq, -1), gate)
    return self.out_proj(y.to(dtype))


@register_patch("mamba2_ssm_ops", model_types=("mamba2", "nemotron_h", "bamba"))
@contextlib.contextmanager
def mamba2_ssm_ops(model: nn.Module):
    classes = _mixer_classes()
    used = {type(m) for m in model.modules() if type(m) in classes}
    for cls in used:
        missing = [a for a in _REQUIRED_ATTRS if not any(hasattr(m, a) for m in model.modules() if type(m) is cls)]
        if missing:
            raise RuntimeError(
                f"export patch mamba2_ssm_ops: {cls.__name__} lacks {missing}; this transformers version's "
                "mixer layout is not supported"
            )
    originals = {cls: cls.forward for cls in used}
    try:
        for cls in used:
            cls.forward = mamba2_mixer_forward
        yield
    finally:
        for cls, fwd in originals.items():
            cls.forward = fwd
