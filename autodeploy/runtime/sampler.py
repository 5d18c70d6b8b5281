"""Vectorized token sampling: greedy, temperature, top-k, top-p, per-request seeds.

Random draws come from a counter-based hash of (request seed, generation step, token id) instead
of a stateful generator: one batched computation for any mix of seeds, and a request's draws do
not depend on which other requests share its batch, on preemption, or on the device. Sampling is
the Gumbel-max trick on the filtered, temperature-scaled logits, which draws exactly from the
softmax distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling_params import SamplingParams

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2**32 for 0 <= x < 2**32 without overflowing int64: split x into 16-bit halves
    hi = ((x >> 16) * c) & 0xFFFF
    return ((hi << 16) + (x & 0xFFFF) * c) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer ("lowbias32") on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def fold_seed(seed: int) -> int:
    """Any Python int -> 32 bits, so 64-bit seeds keep their high bits."""
    seed &= (1 << 64) - 1
    lo, hi = seed & _MASK32, seed >> 32
    return int(hash32(torch.tensor([hi]))[0]) ^ lo if hi else lo


@dataclass
class SamplingBatch:
    """Per-row sampling settings of one step, built on the host from the requests."""

    temperature: list[float]
    top_k: list[int]  # 0 = off
    top_p: list[float]
    seed: list[int]  # 32-bit folded seeds
    step: list[int]  # index of the token being generated (len of the output so far)

    @classmethod
    def from_params(cls, params: list[SamplingParams], seeds: list[int], steps: list[int]) -> "SamplingBatch":
        if all(p.greedy for p in params):  # the common case, built without per-request lookups
            n = len(params)
            return cls(temperature=[0.0] * n, top_k=[0] * n, top_p=[1.0] * n, seed=seeds, step=steps)
        return cls(
            temperature=[0.0 if p.greedy else float(p.temperature) for p in params],
            top_k=[p.top_k_or_none or 0 for p in params],
            top_p=[float(p.top_p) for p in params],
            seed=seeds,
            step=steps,
        )

    @property
    def all_greedy(self) -> bool:
        return all(t == 0.0 for t in self.temperature)

    @property
    def needs_filter(self) -> bool:
        return any(k > 0 for k in self.top_k) or any(p < 1.0 for p in self.top_p)


class Sampler:
    """``Sampler()(logits [B, V], batch) -> token ids [B] int64`` (on the logits' device)."""

    def __init__(self):
        self._vocab_keys: dict[tuple[int, torch.device], torch.Tensor] = {}

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        greedy_tokens = argmax_rows(logits)
        if batch.all_greedy:
            return greedy_tokens
        device = logits.device
        temperature = _to_device(batch.temperature, torch.float32, device)
        is_greedy = temperature == 0
        scaled = logits.float() / torch.where(is_greedy, 1.0, temperature).unsqueeze(-1)
        if batch.needs_filter:
            top_k = _to_device(batch.top_k, torch.int64, device)
            top_p = _to_device(batch.top_p, torch.float32, device)
            scaled = filter_top_k_top_p(scaled, top_k, top_p)
        noise = self.gumbel_noise(batch.seed, batch.step, logits.shape[-1], device)
        sampled_tokens = (scaled + noise).argmax(dim=-1)
        return torch.where(is_greedy, greedy_tokens, sampled_tokens)

    def gumbel_noise(self, seeds: list[int], steps: list[int], vocab_size: int, device) -> torch.Tensor:
        """Standard Gumbel noise [B, V], a pure function of (seed, step, token id)."""
        key = (vocab_size, torch.device(device))
        if key not in self._vocab_keys:
            self._vocab_keys[key] = hash32(torch.arange(vocab_size, dtype=torch.int64, device=device) + 0x9E3779B9)
        vocab_keys = self._vocab_keys[key]
        seed = _to_device(seeds, torch.int64, device)
        step = _to_device(steps, torch.int64, device)
        row_keys = hash32(seed ^ hash32(step & _MASK32))
        bits = hash32(row_keys.unsqueeze(-1) ^ vocab_keys)  # [B, V] uniform 32-bit
        uniform = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))  # (0, 1), 24-bit resolution
        return -torch.log(-torch.log(uniform))


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` for ``[B, V]``; on CUDA a few long rows go in two passes: one block per
    row leaves the GPU nearly idle (docs/performance-history.md)."""
    rows, vocab = logits.shape
    if logits.is_cuda and rows <= 64 and vocab >= 8192:
        chunks = next((k for k in (128, 96, 64, 48, 32) if vocab % k == 0), None)
        if chunks is not None:
            return two_pass_argmax(logits, chunks)
    return logits.argmax(dim=-1)


def two_pass_argmax(logits: torch.Tensor, chunks: int) -> torch.Tensor:
    """The first index of each row's maximum, as ``argmax``: the maximum of each of ``chunks`` equal
    slices of a row (first index within it), then the first slice holding the row's maximum."""
    rows, vocab = logits.shape
    width = vocab // chunks
    best, index = logits.view(rows, chunks, width).max(dim=-1)
    chunk = best.argmax(dim=-1, keepdim=True)
    return (index.gather(-1, chunk) + chunk * width).squeeze(-1)


def filter_top_k_top_p(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set logits outside each row's top-k / top-p (nucleus) set to -inf. ``top_k == 0`` keeps all."""
    vocab_size = scaled.shape[-1]
    sorted_logits, sorted_idx = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(vocab_size, device=scaled.device)
    k = torch.where(top_k > 0, top_k, vocab_size).unsqueeze(-1)
    drop = rank >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # keep the smallest prefix whose mass reaches top_p (the first token always stays)
    p = torch.where(top_p < 1.0, top_p, float("inf")).unsqueeze(-1)
    drop |= mass_before >= p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(scaled).scatter_(-1, sorted_idx, sorted_logits)


def _to_device(values: list, dtype: torch.dtype, device) -> torch.Tensor:
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
