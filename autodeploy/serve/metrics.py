"""``GET /metrics``: the server's Prometheus metrics (names as vLLM's, under ``autodeploy:``).

Gauges are read from the engine when scraped (no cost per step); counters and histograms are
updated by the engine thread as tokens arrive and requests end. Each server has a registry of its
own, so several servers in one process (tests) do not collide.
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

disable_created_metrics()  # no *_created series (as vLLM): the counters' start times say nothing here

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str, running: Callable[[], float], waiting: Callable[[], float],
                 kv_usage: Callable[[], float]):
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}

        def gauge(name: str, doc: str, read: Callable[[], float]) -> None:
            Gauge(name, doc, list(labels), registry=self.registry).labels(**labels).set_function(read)

        gauge("autodeploy:num_requests_running", "Requests in the running batch.", running)
        gauge("autodeploy:num_requests_waiting", "Requests waiting to be scheduled.", waiting)
        gauge("autodeploy:kv_cache_usage_perc", "Fraction of KV-cache pages in use (1 = all).", kv_usage)

        def counter(name: str, doc: str):
            return Counter(name, doc, list(labels), registry=self.registry).labels(**labels)

        def histogram(name: str, doc: str, buckets):
            return Histogram(name, doc, list(labels), buckets=buckets, registry=self.registry).labels(**labels)

        self.prompt_tokens = counter("autodeploy:prompt_tokens", "Prompt tokens admitted.")
        self.generation_tokens = counter("autodeploy:generation_tokens", "Tokens generated.")
        self.ttft = histogram("autodeploy:time_to_first_token_seconds", "Time to first token.", LATENCY_BUCKETS)
        self.tpot = histogram("autodeploy:time_per_output_token_seconds", "Time per output token after the first.",
                              TPOT_BUCKETS)
        self.e2e = histogram("autodeploy:e2e_request_latency_seconds", "Request latency, arrival to end.",
                             LATENCY_BUCKETS)

    def observe_finished(self, request: Any) -> None:
        """A request ended: its latencies (from its arrival at the HTTP server)."""
        m = request.metrics
        times = m.token_times
        if times:
            self.ttft.observe(times[0] - m.arrival_time)
            if len(times) > 1:
                self.tpot.observe((times[-1] - times[0]) / (len(times) - 1))
            self.e2e.observe((m.finished_time or times[-1]) - m.arrival_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)
