"""Log-probabilities of chosen tokens and their top-k alternatives (``SamplingParams.logprobs`` and
``prompt_logprobs``), as vLLM reports them.

Computed on the device from the logits the sampler gets: ``log_softmax`` in fp32 of the model's raw
logits (before temperature, top-k/top-p: vLLM's default ``raw_logprobs``). One step's rows (the
sampled token of each request that asks for logprobs, and every prompt token of a chunk that
asks for prompt logprobs) go through one batched computation (``compute``); their results reach
the host with the sampled ids and become ``{token_id: Logprob}`` dicts there (``TokenDicts``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Optional

import torch

from .outputs import Logprob, TokenLogprobs

# rows per log_softmax: bounds the fp32 [rows, vocab] temporaries of a long prompt's prompt logprobs
ROWS_PER_CHUNK = 1024


@dataclass
class LogprobRows:
    """R rows: the chosen token's logprob and rank, and the k most likely tokens (ids, logprobs)."""

    token_logprob: torch.Tensor  # [R] float32
    token_rank: torch.Tensor  # [R] int64, 1-based
    top_ids: torch.Tensor  # [R, k] int64
    top_logprobs: torch.Tensor  # [R, k] float32

    def to_host(self) -> "LogprobRows":
        """Copies on the host (pinned and non-blocking from CUDA: valid once the step's event passed)."""
        if not self.token_logprob.is_cuda:
            return self
        fields = (self.token_logprob, self.token_rank, self.top_ids, self.top_logprobs)
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in fields]
        for h, t in zip(host, fields):
            h.copy_(t, non_blocking=True)
        return LogprobRows(*host)


def compute(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, k: int) -> LogprobRows:
    """For ``logits[rows]`` (``logits [G, V]``, ``rows [R]``): the logprob and rank of ``tokens [R]``
    and the top ``k``. The rank counts the tokens with a strictly larger logprob, plus one."""
    parts = []
    for start in range(0, rows.numel(), ROWS_PER_CHUNK):
        logprobs = logits.index_select(0, rows[start: start + ROWS_PER_CHUNK]).float().log_softmax(dim=-1)
        chosen = logprobs.gather(-1, tokens[start: start + ROWS_PER_CHUNK, None])
        rank = (logprobs > chosen).sum(dim=-1) + 1
        top_logprobs, top_ids = logprobs.topk(k, dim=-1)
        parts.append((chosen[:, 0], rank, top_ids, top_logprobs))
    if len(parts) == 1:
        return LogprobRows(*parts[0])
    return LogprobRows(*(torch.cat(ts) for ts in zip(*parts)))


class TokenDicts:
    """Host results of one step's rows -> ``{token_id: Logprob}`` (the chosen token first, then
    the top-k in rank order); ``decode(token_id)`` names each token (``decoded_token``)."""

    def __init__(self, rows: LogprobRows, decode: Callable[[int], Optional[str]]):
        self.logprob = rows.token_logprob.tolist()
        self.rank = rows.token_rank.tolist()
        self.top_ids = rows.top_ids.tolist()
        self.top_logprobs = rows.top_logprobs.tolist()
        self.decode = decode

    def __call__(self, row: int, token: int, k: int) -> TokenLogprobs:
        out = {token: Logprob(self.logprob[row], self.rank[row], self.decode(token))}
        for rank, (t, lp) in enumerate(zip(self.top_ids[row][:k], self.top_logprobs[row][:k]), start=1):
            if t != token:
                out[t] = Logprob(lp, rank, self.decode(t))
        return out


def token_decoder(tokenizer: Optional[Any]) -> Callable[[int], Optional[str]]:
    """``tokenizer.decode([token_id])`` (special tokens too: an EOS shows as itself), cached; None
    for every token without a tokenizer."""
    if tokenizer is None:
        return lambda token: None

    @lru_cache(maxsize=1 << 16)
    def decode(token: int) -> str:
        return tokenizer.decode([token], skip_special_tokens=False)

    return decode


class StepLogprobs:
    """One step's logprob rows: which rows of its logits ``[G, V]`` (``SequenceInfo.build``'s
    ``logits_idx`` order) need them and whose they are, then their results.

    Rows: first every prompt position of the chunks that want prompt logprobs (position ``q``
    predicts prompt token ``q + 1``, known on the host), then the last row of each request that
    gets a token this step and asks for logprobs (its target is the sampled id, on the device).
    """

    def __init__(self, requests: list, num_new_tokens: list[int], full_logits: list[bool]):
        self.prompt: list[tuple[Any, int, int, int]] = []  # (request, first prompt index, count, first row)
        self.sampled: dict[Any, tuple[int, int]] = {}  # request -> (its row in the batch, its result row)
        self.last_rows: list[int] = []  # each sequence's last row of the logits
        self.rows: list[int] = []
        self.prompt_targets: list[int] = []
        ks = [0]
        g = 0
        for r, n, full in zip(requests, num_new_tokens, full_logits):
            start = r.num_computed
            if full:
                end = min(start + n, r.prompt_len - 1)  # positions whose next token is a prompt token
                if end > start:
                    self.prompt.append((r, start + 1, end - start, len(self.rows)))
                    self.rows.extend(range(g, g + end - start))
                    self.prompt_targets.extend(r.token_ids[start + 1: end + 1])
                    ks.append(r.params.prompt_logprobs)
            g += n if full else 1
            self.last_rows.append(g - 1)
        for i, (r, n) in enumerate(zip(requests, num_new_tokens)):
            if r.logprobs is not None and r.num_computed + n == r.num_tokens + r.num_inflight:  # gets a token
                self.sampled[r] = (i, len(self.rows))
                self.rows.append(self.last_rows[i])
                ks.append(r.params.logprobs)
        self.k = max(ks)
        self.results: Optional[LogprobRows] = None  # host copies, valid once the step has landed

    def __bool__(self) -> bool:
        return bool(self.rows)

    def compute(self, logits: torch.Tensor, sampled: torch.Tensor) -> None:
        """Launch the rows' computation on ``logits [G, V]``; ``sampled [B]``: the step's ids."""
        from .sampler import _to_device

        device = logits.device
        targets = _to_device(self.prompt_targets, torch.int64, device)
        if self.sampled:
            batch_rows = _to_device([i for i, _ in self.sampled.values()], torch.int64, device)
            targets = torch.cat([targets, sampled.index_select(0, batch_rows)])
        rows = _to_device(self.rows, torch.int64, device)
        self.results = compute(logits, rows, targets, self.k).to_host()

    def land(self, decode: Callable[[int], Optional[str]]) -> TokenDicts:
        """Append the prompt logprobs (positions a request already has, after a preemption's
        recompute, are skipped); returns the dicts the sampled tokens' logprobs come from."""
        dicts = TokenDicts(self.results, decode)
        for r, first, count, row in self.prompt:
            if r.finished or len(r.prompt_logprobs) < first:  # (no gap: chunks land in order)
                continue
            k = r.params.prompt_logprobs
            for j in range(len(r.prompt_logprobs) - first, count):
                r.prompt_logprobs.append(dicts(row + j, r.token_ids[first + j], k))
        return dicts
