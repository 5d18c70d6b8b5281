"""Continuous batching: which requests run in the next forward, and how many tokens each.

Each step, within ``max_batch_size`` sequences and ``max_num_tokens`` tokens:
1. running requests get their pending tokens, decodes (one token) first, then prompt chunks,
   oldest first; a request that needs a page when none is free preempts the newest running
   request (its pages are freed; it goes back to the front of the queue and is recomputed later,
   keeping the tokens it generated);
2. waiting requests are admitted first come, first served while their first chunk fits.
Long prompts are prefilled in chunks when they exceed the token budget. Nothing is dropped: a
request leaves only through ``release`` (finished, failed or aborted).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .kv_cache import CacheInterface
from .request import Request, Status


@dataclass
class ScheduledBatch:
    requests: list[Request]  # multi-token sequences (prefills) first, then single-token ones
    num_new_tokens: list[int]

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    def __init__(self, cache: CacheInterface):
        self.cache = cache
        self.max_batch_size = cache.max_batch_size
        self.max_num_tokens = cache.max_num_tokens
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
        budget = self.max_num_tokens
        preemptions_before = self.num_preemptions
        # decodes before prompt chunks, so a long chunked prefill never stalls token generation
        for request in sorted(self.running, key=lambda r: r.num_pending > 1):
            if budget == 0:
                break
            if request.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            n = min(request.num_pending, budget)
            if self._reserve_pages(request, request.num_computed + n, scheduled):
                scheduled[request] = n
            budget = self.max_num_tokens - sum(scheduled.values())  # preemption may refund tokens
        # no admissions in a step that preempted: the freed pages go to the requests already running
        preempted = self.num_preemptions != preemptions_before
        while not preempted and self.waiting and len(self.running) < self.max_batch_size and budget > 0:
            request = self.waiting[0]
            n = min(request.num_pending, budget)
            if self.cache.pages_needed(request.num_computed + n) > self.cache.num_free_pages:
                break  # first come, first served: later requests wait too
            self.waiting.popleft()
            request.slot = self.cache.allocate_slot()
            self._reserve_pages(request, request.num_computed + n, scheduled)
            request.status = Status.RUNNING
            self.running.append(request)
            scheduled[request] = n
            budget -= n
        order = sorted(scheduled.items(), key=lambda item: item[1] == 1)  # prefills first, then decodes
        return ScheduledBatch([r for r, _ in order], [n for _, n in order])

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
