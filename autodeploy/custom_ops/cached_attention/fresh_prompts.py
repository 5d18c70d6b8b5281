"""Fresh prompts of a step: the host facts that let the triton backend hand them to flash attention.

A fresh prompt (nothing cached yet, ``input_pos == 0``) attends only to its own new tokens, which
is what flash attention's varlen kernel does at full speed (torch's FA2, ``aten._flash_attention_forward``;
the paged Triton kernel ran a 1024-token prompt at ~230 TFLOP/s on the H200). That kernel sizes its
grid from the longest sequence, a host integer, and the op only sees device tensors; reading it
back would sync the host every layer. So ``SequenceInfo`` (which packs the batch on the host, fresh
prompts first) publishes the leading run of fresh prompts here when it writes a step's buffer,
and the op takes them if the facts belong to the tensors it was called with: the same
``cu_seqlen`` view of that buffer (only ``SequenceInfo`` writes it, and it publishes each time;
not its version: the overlap scheduler patches in-flight ids into the same buffer after), the
same batch and token counts. Anything else (a test calling the op directly, a batch from
elsewhere) finds no facts and runs the Triton kernel alone.

``ENABLED`` turns the flash path off for a same-process comparison (scripts/perf_probe.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

ENABLED = True


@dataclass(frozen=True)
class FreshPrompts:
    num_seqs: int  # the first num_seqs sequences of the batch are fresh prompts
    num_tokens: int  # their tokens: rows [0, num_tokens) of the flattened batch
    max_len: int  # the longest of them
    key: tuple  # (cu_seqlen data_ptr, batch size, total tokens) when published


_current: Optional[FreshPrompts] = None


def leading_fresh(seq_len: list[int], input_pos: list[int]) -> tuple[int, int, int]:
    """(sequences, tokens, longest) of the leading run of sequences with nothing cached."""
    n = tokens = longest = 0
    for length, pos in zip(seq_len, input_pos):
        if pos:
            break
        n, tokens, longest = n + 1, tokens + length, max(longest, length)
    return n, tokens, longest


def publish(cu_seqlen: torch.Tensor, num_tokens: int, fresh: tuple[int, int, int]) -> None:
    """Record the step just written: ``cu_seqlen`` is its view (already holding the step's values)."""
    global _current
    key = (cu_seqlen.data_ptr(), cu_seqlen.shape[0] - 1, num_tokens)
    _current = FreshPrompts(*fresh, key=key) if fresh[0] else None


def follow(cu_seqlen: torch.Tensor, copy: torch.Tensor) -> None:
    """``copy`` of the published ``cu_seqlen`` is what the ops will get (compile/__init__.py copies
    views before a whole-graph compiled call): the facts now belong to it."""
    global _current
    f = _current
    if f is not None and f.key[0] == cu_seqlen.data_ptr():
        _current = FreshPrompts(f.num_seqs, f.num_tokens, f.max_len, (copy.data_ptr(), *f.key[1:]))


def lookup(cu_seqlen: torch.Tensor, num_tokens: int) -> Optional[FreshPrompts]:
    """The published fresh prompts if they describe this call's batch, else None."""
    f = _current
    if f is None or not ENABLED:
        return None
    if f.key != (cu_seqlen.data_ptr(), cu_seqlen.shape[0] - 1, num_tokens):
        return None
    return f


_FLASH_OK: dict[torch.device, bool] = {}


def flash_usable(q: torch.Tensor, v: torch.Tensor, cap: float) -> bool:
    """torch's flash kernel covers this layer: CUDA (sm80+), fp16/bf16, equal K/V head dims up to
    256 in multiples of 8, no soft-cap (its varlen op has none)."""
    if not q.is_cuda or cap or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    D = q.shape[-1]
    if v.shape[-1] != D or D > 256 or D % 8:
        return False
    if q.device not in _FLASH_OK:
        _FLASH_OK[q.device] = (torch.backends.cuda.is_flash_attention_available()
                               and torch.cuda.get_device_capability(q.device) >= (8, 0))
    return _FLASH_OK[q.device]


def flash_attention(q, k, v, cu_seqlen, fresh: FreshPrompts, scale: float, window: int) -> torch.Tensor:
    """Causal attention of the fresh prompts (rows [0, fresh.num_tokens) of q[T, H, D], k/v[T, KV, D])
    over their own tokens -> [fresh.num_tokens, H, D]. GQA as is (FA2 takes KV < H heads)."""
    n, t = fresh.num_seqs, fresh.num_tokens
    cu = cu_seqlen[: n + 1]
    window_left = window - 1 if window else -1  # key j visible from p iff p - j < window
    return torch.ops.aten._flash_attention_forward(
        q[:t], k[:t], v[:t], cu, cu, fresh.max_len, fresh.max_len, 0.0, True, False,
        scale=scale, window_size_left=window_left, window_size_right=0,
    )[0]
