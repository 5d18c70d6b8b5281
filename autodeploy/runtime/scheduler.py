"""Continuous batching: which requests run in the next forward, and how many tokens each.

Each step, within ``max_batch_size`` sequences and ``max_num_tokens`` tokens:
1. running requests get their pending tokens, decodes (one token) first, then prompt chunks,
   oldest first; a request that needs a page when none is free preempts the newest running
   request (its pages are freed; it goes back to the front of the queue and is recomputed later,
   keeping the tokens it generated);
2. waiting requests are admitted first come, first served while their first chunk fits.
Long prompts are prefilled in chunks when they exceed the token budget. While a step carries
decodes, its prompt tokens are capped at ``prefill_chunk_size``: a step's time grows with its
prompt tokens, and every decoding request waits for the whole step, so the cap bounds the
inter-token latency that arriving prompts add. The decodes ride on top of the cap: counting them
against it was measured slower (prompts split mid-sequence read their prefix back from the pages;
docs/performance-history.md#the-scheduler-cap-h200-2026-11-30). With nothing decoding, prompts
take the whole ``max_num_tokens``. Nothing is dropped: a request leaves only
through ``release`` (finished, failed or aborted).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

from .kv_cache import CacheInterface
from .request import Request, Status


@dataclass
class ScheduledBatch:
    requests: list[Request]  # multi-token sequences (prefills) first, then single-token ones
    num_new_tokens: list[int]

    def __len__(self) -> int:
        return len(self.requests)


# prompt tokens per step while requests decode (twice that doubled the decodes' ITL p99: performance-history.md)
DEFAULT_PREFILL_CHUNK_SIZE = 2048


class Scheduler:
    def __init__(self, cache: CacheInterface, prefill_chunk_size: Optional[int] = DEFAULT_PREFILL_CHUNK_SIZE):
        if prefill_chunk_size is not None and prefill_chunk_size < 1:
            raise ValueError(f"prefill_chunk_size must be >= 1 or None, got {prefill_chunk_size}")
        self.cache = cache
        self.max_batch_size = cache.max_batch_size
        self.max_num_tokens = cache.max_num_tokens
        self.prefill_chunk_size = prefill_chunk_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        scheduled: dict[Request, int] = {}  # request -> new tokens, in scheduling order
        preemptions_before = self.num_preemptions
        # decodes before prompt chunks, so a long chunked prefill never stalls token generation
        used = decodes = 0  # tokens and one-token sequences in `scheduled`
        for request in sorted(self.running, key=lambda r: r.num_pending > 1):
            if request.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            if request.ends_by_length_when_landed(self.cache.max_seq_len):
                continue  # its last token is still on the device (overlap scheduler)
            pending = request.num_pending
            n = min(pending, self._budget(used, decodes, prompt=pending > 1))
            if n == 0:
                continue
            preemptions = self.num_preemptions
            if self._reserve_pages(request, request.num_computed + n, scheduled):
                scheduled[request] = n
            if self.num_preemptions != preemptions:  # requests left `scheduled`: count again
                used, decodes = sum(scheduled.values()), sum(k == 1 for k in scheduled.values())
            else:
                used, decodes = used + n, decodes + (n == 1)
        # no admissions in a step that preempted: the freed pages go to the requests already running
        preempted = self.num_preemptions != preemptions_before
        while not preempted and self.waiting and len(self.running) < self.max_batch_size:
            request = self.waiting[0]
            n = min(request.num_pending, self._budget(used, decodes, prompt=True))
            if n == 0:
                break
            if self.cache.pages_needed(request.num_computed + n) > self.cache.num_free_pages:
                break  # first come, first served: later requests wait too
            self.waiting.popleft()
            request.slot = self.cache.allocate_slot()
            self._reserve_pages(request, request.num_computed + n, scheduled)
            request.status = Status.RUNNING
            self.running.append(request)
            scheduled[request] = n
            used, decodes = used + n, decodes + (n == 1)
        order = sorted(scheduled.items(), key=lambda item: item[1] == 1)  # prefills first, then decodes
        return ScheduledBatch([r for r, _ in order], [n for _, n in order])

    def _budget(self, used: int, decodes: int, prompt: bool) -> int:
        """Tokens the next request may take: what ``max_num_tokens`` leaves and, for a prompt
        chunk in a step that carries decodes, what ``prefill_chunk_size`` leaves."""
        left = self.max_num_tokens - used
        if prompt and decodes and self.prefill_chunk_size is not None:
            left = min(left, self.prefill_chunk_size - (used - decodes))
        return max(left, 0)

    def _reserve_pages(self, request: Request, num_tokens: int, scheduled: dict[Request, int]) -> bool:
        """Give ``request`` pages for ``num_tokens`` tokens, preempting the newest running requests
        (also ones already scheduled in this step) if needed. False if ``request`` itself was."""
        missing = self.cache.pages_needed(num_tokens) - len(request.pages)
        while missing > self.cache.num_free_pages:
            victim = self.running[-1]
            self._preempt(victim)
            scheduled.pop(victim, None)
            if victim is request:
                return False
        if missing > 0:
            request.pages += self.cache.allocate_pages(missing)
        return True

    def _preempt(self, request: Request) -> None:
        self._free(request)
        self.running.remove(request)
        request.num_computed = 0  # recomputed from scratch (prompt + generated) when resumed
        request.status = Status.WAITING
        request.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def release(self, request: Request) -> None:
        """Remove a finished, failed or aborted request and free what it holds."""
        self._free(request)
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = Status.FINISHED

    def _free(self, request: Request) -> None:
        self.cache.free_pages(request.pages)
        request.pages = []
        if request.slot is not None:
            self.cache.free_slot(request.slot)
            request.slot = None
