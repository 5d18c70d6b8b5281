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
- ``repeat_interleave(n, dim=1)`` (int ``n``) of a 4-D tensor, the other way to write repeat_kv,
  becomes the same op: torch 2.11's meta function of ``repeat_interleave`` on a transposed
  ``[B, KV, S, D]`` adds the same kind of guard (``Min(8*seq, 16*seq) == 8*seq``). Every other
  ``repeat_interleave`` is left as it is.
"""

from __future__ import annotations

import contextlib
import sys

import torch

from . import register_patch


_original_repeat_interleave = torch.repeat_interleave
_original_tensor_repeat_interleave = torch.Tensor.repeat_interleave


@torch.library.custom_op("autodeploy::repeat_kv", mutates_args=())
def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, KV, S, D] -> [B, KV * n_rep, S, D]``, each KV head repeated ``n_rep`` times in a row."""
    return _original_repeat_interleave(hidden_states, n_rep, dim=1)


@repeat_kv.register_fake
def _(hidden_states, n_rep):
    b, kv, s, d = hidden_states.shape
    return hidden_states.new_empty((b, kv * n_rep, s, d))


def _repeat_kv_call(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    return hidden_states if n_rep == 1 else torch.ops.autodeploy.repeat_kv(hidden_states, n_rep)


def _is_head_repeat(input, repeats, dim, output_size) -> bool:
    return (isinstance(input, torch.Tensor) and input.dim() == 4 and isinstance(repeats, int)
            and not isinstance(repeats, bool) and isinstance(dim, int) and dim in (1, -3)
            and (output_size is None or output_size == input.shape[1] * repeats))


def _repeat_interleave(input, repeats=None, dim=None, *, output_size=None):
    if _is_head_repeat(input, repeats, dim, output_size):
        return _repeat_kv_call(input, repeats)
    if repeats is None:  # torch.repeat_interleave(repeats_tensor)
        return _original_repeat_interleave(input, output_size=output_size)
    return _original_repeat_interleave(input, repeats, dim, output_size=output_size)


def _tensor_repeat_interleave(self, repeats, dim=None, *, output_size=None):
    if _is_head_repeat(self, repeats, dim, output_size):
        return _repeat_kv_call(self, repeats)
    return _original_tensor_repeat_interleave(self, repeats, dim, output_size=output_size)


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
    replacements += [(torch, "repeat_interleave", _repeat_interleave),
                     (torch.Tensor, "repeat_interleave", _tensor_repeat_interleave)]
    # (owner, name, replacement, original, whether the owner itself held it: Tensor inherits methods)
    active = [(mod, name, fn, getattr(mod, name), name in vars(mod))
              for mod, name, fn in replacements if callable(getattr(mod, name, None))]
    try:
        for mod, name, fn, _, _ in active:
            setattr(mod, name, fn)
        yield
    finally:
        for mod, name, _, original, own in active:
            if own:
                setattr(mod, name, original)
            else:
                delattr(mod, name)
