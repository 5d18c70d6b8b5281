"""Continuous batching: which requests run in the next forward, and how many tokens each.

Each step, within ``max_batch_size`` sequences and ``max_num_tokens`` tokens:
1. running requests, oldest first, get their pending tokens (one for a decode, a chunk of the
   prompt for a prefill); a request that needs a page when none is free preempts the newest
   running request (its pages are freed; it goes back to the front of the queue and is recomputed
   later, keeping the tokens it generated);
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
        budget = self.max_num_tokens
        scheduled: list[tuple[Request, int]] = []
        preemptions_before = self.num_preemptions
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_pending, budget)
            if not self._reserve_pages(request, request.num_computed + n):
                break  # it was the newest running request and got preempted itself
            scheduled.append((request, n))
            budget -= n
            i += 1
        # no admissions in a step that preempted: the freed pages go to the requests already running
        preempted = self.num_preemptions != preemptions_before
        while not preempted and self.waiting and len(self.running) < self.max_batch_size and budget > 0:
            request = self.waiting[0]
            n = min(request.num_pending, budget)
            if self.cache.pages_needed(request.num_computed + n) > self.cache.num_free_pages:
                break  # first come, first served: later requests wait too
            self.waiting.popleft()
            request.slot = self.cache.allocate_slot()
            self._reserve_pages(request, request.num_computed + n)
            request.status = Status.RUNNING
            self.running.append(request)
            scheduled.append((request, n))
            budget -= n
        scheduled.sort(key=lambda item: item[1] == 1)  # stable: prefills first, then decodes
        return ScheduledBatch([r for r, _ in scheduled], [n for _, n in scheduled])

    def _reserve_pages(self, request: Request, num_tokens: int) -> bool:
        """Give ``request`` pages for ``num_tokens`` tokens, preempting newer requests if needed."""
        missing = self.cache.pages_needed(num_tokens) - len(request.pages)
        while missing > self.cache.num_free_pages:
            victim = self.running[-1]
            self._preempt(victim)
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
