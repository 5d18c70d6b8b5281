"""The engine's own thread: it steps the engine while the HTTP side only queues work and reads results.

The HTTP thread (asyncio) hands requests over through ``submit`` / ``abort`` (a thread-safe inbox);
this loop admits them between steps, so requests from every connection share one continuous batch
and none waits for another to finish. After each step it sends every request's new token ids (and,
when it ends or wants logprobs, its ``RequestOutput``) back to the HTTP thread's event loop in one
call. It blocks only when there is nothing to run, so an arriving request wakes it at once.

It runs on the thread that built the engine (CUDA device, compiled graphs and, with several ranks,
the collectives that every step broadcasts all stay on that thread).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..runtime.outputs import RequestOutput
from ..runtime.request import Request
from ..runtime.sampling_params import SamplingParams

log = logging.getLogger("autodeploy.serve")

SHUTDOWN_MESSAGE = "the server is shutting down"
HANDOFF_S = 0.002  # at most this long the engine thread waits for the HTTP thread to write a step's tokens


@dataclass
class Update:
    """What one step did to one request: its new token ids, and its output when it ended (or
    when its handle asked for snapshots: logprobs)."""

    index: int  # the choice it belongs to
    new_token_ids: list[int]
    output: Optional[RequestOutput] = None
    finished: bool = False


@dataclass(eq=False)
class Handle:
    """One engine request as the HTTP side sees it. ``deliver`` runs on the HTTP event loop."""

    prompt_ids: list[int]
    params: SamplingParams
    index: int
    deliver: Callable[[Update], None]
    loop: Any  # the asyncio loop that ``deliver`` belongs to
    stream: bool = True  # an update per step; False: only the last one
    snapshots: bool = False  # every update carries the RequestOutput so far (logprobs)
    arrival: float = field(default_factory=time.perf_counter)
    request: Optional[Request] = None  # set by the engine thread
    num_sent: int = 0


class EngineLoop:
    def __init__(self, engine: Any, metrics: Any = None):
        self.engine = engine
        self.metrics = metrics
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[int, Handle] = {}  # request id -> handle, until it ends
        self._queued = 0  # submitted, not admitted yet (HTTP thread adds, engine thread removes)
        self._queued_lock = threading.Lock()
        self.stop_requested = threading.Event()
        self._deadline: Optional[float] = None  # with stop_requested: when the rest are aborted
        self.draining = False  # set once the loop has seen stop_requested

    # ---- called from the HTTP thread ----

    def submit(self, handles: list[Handle]) -> None:
        with self._queued_lock:
            self._queued += len(handles)
        self._inbox.put(("add", handles))

    def abort(self, handles: list[Handle]) -> None:
        self._inbox.put(("abort", handles))

    def request_stop(self, grace_s: float) -> None:
        """Stop accepting; in-flight requests may finish within ``grace_s`` (a later, shorter
        grace wins), then the rest are aborted and ``run`` returns. Any thread may call it."""
        deadline = time.monotonic() + grace_s
        self._deadline = deadline if self._deadline is None else min(self._deadline, deadline)
        self.stop_requested.set()
        self._inbox.put(("wake", None))

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + self._queued

    @property
    def kv_cache_usage(self) -> float:
        cache = self.engine.cache
        return cache.num_used_pages / max(cache.num_pages - 1, 1)

    # ---- the engine thread ----

    def run(self, on_drain: Callable[[], None] = lambda: None) -> None:
        """Step until a stop is requested and every request has ended or was aborted at the
        deadline. ``on_drain`` runs once when the stop is first seen (the HTTP side stops listening).
        If the engine cannot go on (another rank died), every request gets the error and it is raised."""
        try:
            self._run(on_drain)
        except BaseException as e:
            self.draining = True  # new requests get a 503
            message = f"the engine failed: {type(e).__name__}: {e}"
            self._send([(h, Update(h.index, [], _refused(h, message), finished=True)) for h in self._live.values()])
            self._live.clear()
            raise

    def _run(self, on_drain: Callable[[], None]) -> None:
        ranks = getattr(self.engine, "ranks", None)
        while True:
            stopping = self.stop_requested.is_set()
            self._take_inbox(block=not stopping and not self.engine.has_unfinished_requests)
            if stopping:
                if not self.draining:
                    self.draining = True
                    log.info("stopping: %d requests in flight", len(self._live))
                    on_drain()
                if not self._live or time.monotonic() >= self._deadline:
                    if self._live:
                        log.warning("aborting %d requests still running at the shutdown deadline", len(self._live))
                        self._abort(list(self._live.values()))
                    self._take_inbox(block=False)  # requests that slipped in are turned away
                    return
            if self.engine.has_unfinished_requests:
                written, first = self._publish(self.engine.step())
                # let the HTTP thread write the chunks before the next step takes the GIL: after every
                # step with the overlap scheduler (its next launch would come first), and after a step
                # that gave a request its first token (TTFT; without it the next step runs first)
                if written is not None and (first or self.engine.overlap) and HANDOFF_S:
                    written.wait(HANDOFF_S)
            elif stopping:
                time.sleep(0.005)
            elif ranks is not None:
                ranks.check()  # idle: a rank that died meanwhile ends the server now, not at the next request

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, handles = item
            if kind == "add":
                self._admit(handles)
            elif kind == "abort":
                self._abort([h for h in handles if h.request is not None and h.request.request_id in self._live])
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _admit(self, handles: list[Handle]) -> None:
        with self._queued_lock:
            self._queued -= len(handles)
        updates = []
        for h in handles:
            if self.draining:
                updates.append((h, Update(h.index, [], _refused(h, SHUTDOWN_MESSAGE), finished=True)))
                continue
            request = self.engine.add_request(h.prompt_ids, h.params)
            request.metrics.arrival_time = h.arrival  # latencies count from the HTTP request, queueing included
            h.request = request
            if request.finished:  # invalid: the engine says why
                updates.append((h, Update(h.index, [], self.engine.output(request), finished=True)))
                continue
            self._live[request.request_id] = h
            if self.metrics is not None:
                self.metrics.prompt_tokens.inc(request.prompt_len)
        self._send(updates)

    def _abort(self, handles: list[Handle]) -> None:
        self.engine.abort([h.request for h in handles])
        self._publish([h.request for h in handles])

    def _publish(self, requests: list[Request]) -> tuple[Optional[threading.Event], bool]:
        """Sends the requests' updates; returns ``_send``'s event and whether a request got its first token."""
        updates, generated, first = [], 0, False
        for r in requests:
            h = self._live.get(r.request_id)
            if h is None:
                continue
            new = r.token_ids[r.prompt_len + h.num_sent:]
            started = h.num_sent == 0 and bool(new)
            h.num_sent += len(new)
            generated += len(new)
            finished = r.finish_reason is not None
            if not (finished or h.stream):
                continue
            first = first or started
            output = self.engine.output(r) if finished or h.snapshots else None
            updates.append((h, Update(h.index, new, output, finished)))
            if finished:
                del self._live[r.request_id]
                if self.metrics is not None:
                    self.metrics.observe_finished(r)
        if generated and self.metrics is not None:
            self.metrics.generation_tokens.inc(generated)
        return self._send(updates), first

    @staticmethod
    def _send(updates: list[tuple[Handle, Update]]) -> Optional[threading.Event]:
        """One wake-up of each event loop per step, not one per request. Returns an event that
        is set once an event loop has handed the updates on (None if nothing was sent)."""
        by_loop: dict[Any, list] = {}
        for h, u in updates:
            by_loop.setdefault(h.loop, []).append((h.deliver, u))
        written = threading.Event() if by_loop else None
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver_all, items, written)
            except RuntimeError:  # the HTTP loop is closed (the server is gone): nobody to tell
                written.set()
        return written


def _deliver_all(items: list, written: Optional[threading.Event] = None) -> None:
    for deliver, update in items:
        deliver(update)
    if written is not None:
        # after the tasks these deliveries woke (they were scheduled first): set once their chunks are out
        asyncio.get_running_loop().call_soon(written.set)


def _refused(h: Handle, message: str) -> RequestOutput:
    return RequestOutput(request_id=-1, prompt=h.prompt_ids, prompt_token_ids=h.prompt_ids, finish_reason="error",
                         error=message)
