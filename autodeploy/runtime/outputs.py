"""What the engine hands back for each request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union


@dataclass
class RequestMetrics:
    """Host timestamps (``time.perf_counter()``) for latency numbers (TTFT, TPOT, ITL)."""

    arrival_time: float = 0.0
    first_scheduled_time: Optional[float] = None
    token_times: list[float] = field(default_factory=list)  # when each generated token was read
    finished_time: Optional[float] = None
    num_preemptions: int = 0

    @property
    def ttft(self) -> Optional[float]:
        return self.token_times[0] - self.arrival_time if self.token_times else None

    @property
    def itl(self) -> list[float]:
        """Inter-token latencies (seconds between consecutive generated tokens)."""
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


@dataclass
class StepTiming:
    """One engine step: its batch, the host's own time (schedule, metadata, launches, commit) and
    the time it waited for the device to hand back the sampled ids."""

    num_seqs: int
    num_tokens: int
    host_s: float
    wait_s: float

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == self.num_seqs


@dataclass
class Logprob:
    """One token's log-probability at one position (as vLLM's): ``log_softmax`` of the model's raw
    logits in fp32, before temperature, top-k or top-p (vLLM's default ``raw_logprobs``).
    ``rank``: 1-based, 1 + the number of tokens with a strictly larger log-probability (so the
    greedy token has rank 1). ``decoded_token``: ``tokenizer.decode([token_id])`` (special tokens
    included), None without a tokenizer."""

    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


# token id -> its Logprob: the token at that position and the top-k alternatives (k or k + 1 entries)
TokenLogprobs = dict[int, Logprob]


@dataclass
class RequestOutput:
    """One prompt's result. ``token_ids`` are the generated ids only (EOS included when hit).

    ``finish_reason``: ``"stop"`` (EOS, stop token or stop string), ``"length"`` (max_tokens or
    max_seq_len), ``"error"`` (``error`` says why; nothing was generated or generation failed),
    ``"aborted"``, or ``None`` while the request is still running (streaming).

    ``logprobs`` (with ``SamplingParams.logprobs=k``): one dict per generated token (so far, while
    streaming), holding that token and the k most likely ones. ``prompt_logprobs`` (with
    ``SamplingParams.prompt_logprobs=k``): one entry per prompt token, the first ``None`` (nothing
    predicts it), each dict holding the prompt token and the k most likely ones. None when not asked for.
    """

    request_id: int
    prompt: Any
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_reason: Union[str, int, None] = None  # the stop string or stop token id that ended it
    error: Optional[str] = None
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    logprobs: Optional[list[TokenLogprobs]] = None
    prompt_logprobs: Optional[list[Optional[TokenLogprobs]]] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
