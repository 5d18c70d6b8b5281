"""How one request is sampled and when it stops (vLLM semantics).

Construction validates every field (``ValueError`` naming the field, as vLLM does). The engine calls
``check()`` again when a request arrives, so a field changed after construction fails only that
request; what only the engine can know (a prompt longer than max_seq_len) is a per-request error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

# below this temperature sampling is greedy (as in vLLM)
GREEDY_EPS = 1e-5
# the most top-k alternatives a request may ask for per token (vLLM's default max_logprobs)
MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: Optional[int] = None  # None, 0 or -1 = no top-k
    top_p: float = 1.0  # in (0, 1]; 1 = no top-p
    seed: Optional[int] = None  # same seed, same prompt -> same output
    stop: Union[str, list[str], None] = None  # stop strings (cut from the text)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # log-probabilities (``RequestOutput.logprobs`` / ``prompt_logprobs``): None = off, k = the chosen
    # token plus the k most likely ones; raw log_softmax of the model's logits (before temperature, top-k/p)
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None

    def __post_init__(self):
        self.check()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def stop_strings(self) -> list[str]:
        if not self.stop:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def top_k_or_none(self) -> Optional[int]:
        return self.top_k if self.top_k not in (None, 0, -1) else None

    def check(self) -> None:
        """Raise ValueError with a message naming the bad field."""
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or math.isnan(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if math.isinf(self.temperature):
            raise ValueError("temperature must be finite")
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1
        ):
            raise ValueError(f"top_k must be None, -1, 0 (all disabled) or a positive integer, got {self.top_k!r}")
        if not _is_number(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        stops = self.stop_strings
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop must be a non-empty string or a list of non-empty strings, got {self.stop!r}")
        if any(isinstance(t, bool) or not isinstance(t, int) for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be integers, got {self.stop_token_ids!r}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be None or an integer in [0, {MAX_LOGPROBS}] (MAX_LOGPROBS), got {k!r}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
