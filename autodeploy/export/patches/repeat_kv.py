"""GQA exported without HF's ``repeat_kv`` reshape.

HF repeats K/V heads as ``expand -> reshape``, merging the KV-head dim with the repeat dim. With
torch 2.11, tracing that reshape on symbolic shapes gives the result a stride such as
``Min(16*seq, 32*seq)`` whose contiguity check becomes a guard export cannot prove
(``Constraints violated (seq)``). So during export:

- the SDPA path skips the repeat and lets SDPA do GQA itself (``enable_gqa=True``);
- ``repeat_kv`` of the model's module and of transformers' SDPA integration (the eager path, or
  SDPA with unequal K/V head dims) becomes ``autodeploy::repeat_kv``, an op with a plain fake
  kernel. The attention matcher folds either form into the canonical op (GQA inside); an
  attention it leaves alone still computes exactly what HF computes.
"""

from __future__ import annotations

import contextlib
import sys

import torch

from . import register_patch


@torch.library.custom_op("autodeploy::repeat_kv", mutates_args=())
def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, KV, S, D] -> [B, KV * n_rep, S, D]``, each KV head repeated ``n_rep`` times in a row."""
    return torch.repeat_interleave(hidden_states, n_rep, dim=1)


@repeat_kv.register_fake
def _(hidden_states, n_rep):
    b, kv, s, d = hidden_states.shape
    return hidden_states.new_empty((b, kv * n_rep, s, d))


def _repeat_kv_call(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    return hidden_states if n_rep == 1 else torch.ops.autodeploy.repeat_kv(hidden_states, n_rep)


def _gqa_in_sdpa(attention_mask, key, value) -> bool:
    return key.shape[-1] == value.shape[-1]


@register_patch("gqa_without_repeat_views")
@contextlib.contextmanager
def gqa_without_repeat_views(model):
    replacements = []
    try:
        from transformers.integrations import sdpa_attention

        replacements += [(sdpa_attention, "use_gqa_in_sdpa", _gqa_in_sdpa), (sdpa_attention, "repeat_kv", _repeat_kv_call)]
    except ImportError:
        pass
    modeling = sys.modules.get(type(model).__module__)
    replacements.append((modeling, "repeat_kv", _repeat_kv_call))
    active = [(mod, name, fn, getattr(mod, name)) for mod, name, fn in replacements if callable(getattr(mod, name, None))]
    try:
        for mod, name, fn, _ in active:
            setattr(mod, name, fn)
        yield
    finally:
        for mod, name, _, original in active:
            setattr(mod, name, original)
