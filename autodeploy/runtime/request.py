"""A request's state inside the engine.

A request is its token list (prompt + generated so far) and how many of those tokens already
have K/V in the cache (``num_computed``). Every step feeds ``token_ids[num_computed:]`` (or a
chunk of it): a fresh prompt, a later prefill chunk, a decode (one token) and a request resumed
after preemption (everything again) are the same case.

With the overlap scheduler a token may still be on the device when the next step is scheduled:
``num_inflight`` counts those (at most one per step in flight). They are fed to the next step
straight from the device, and join ``token_ids`` when their step lands on the host.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from .outputs import RequestMetrics
from .sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: int
    prompt: Any  # as the user gave it, echoed in the output
    token_ids: list[int]  # prompt + generated
    prompt_len: int
    params: SamplingParams
    seed: int  # 32-bit, folded from params.seed or drawn at arrival
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose K/V (and state) are in the cache
    num_inflight: int = 0  # sampled on the device, not in token_ids yet (overlap scheduler)
    pages: list[int] = field(default_factory=list)
    slot: Optional[int] = None
    finish_reason: Optional[str] = None
    stop_reason: Any = None
    error: Optional[str] = None
    text: Optional[str] = None  # set at finish (or on demand for streaming)
    # with SamplingParams.logprobs / prompt_logprobs: one dict per generated / prompt token so far
    logprobs: Optional[list] = None
    prompt_logprobs: Optional[list] = None
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=time.perf_counter()))

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def wants_prompt_logits(self) -> bool:
        """Its next chunk (from ``num_computed``) holds prompt tokens whose logprobs are missing: it
        needs every token's logits (the last prompt token's row only predicts the first output)."""
        return (self.prompt_logprobs is not None and self.num_computed + 1 < self.prompt_len
                and len(self.prompt_logprobs) < self.prompt_len)

    @property
    def num_pending(self) -> int:
        """Tokens not in the cache yet (1 for a decode), in-flight ones included."""
        return len(self.token_ids) + self.num_inflight - self.num_computed

    def ends_by_length_when_landed(self, max_seq_len: int) -> bool:
        """Its in-flight tokens already end it by length (``max_tokens`` or ``max_seq_len``, as
        ``StopChecker`` decides once they land): nothing more to schedule for it."""
        n = len(self.token_ids) + self.num_inflight
        return self.num_inflight > 0 and (n - self.prompt_len >= self.params.max_tokens or n > max_seq_len)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
