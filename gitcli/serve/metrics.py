"""Prometheus metrics, in a registry of the app's own (two apps in one process, as in the
tests, never share or collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)

# from a one-token answer on a GPU to a long answer on a busy CPU
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gitcap_requests", "Answered requests by route and outcome",
                                ["route", "outcome"], registry=r)
        self.queue_depth = Gauge("gitcap_queue_depth", "Requests waiting for a row in the batch", registry=r)
        self.running = Gauge("gitcap_running_batch_size", "Rows decoding in the running batch", registry=r)
        self.latency = Histogram("gitcap_request_latency_seconds", "From a request's arrival to its last token",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("gitcap_time_to_first_token_seconds", "From a request's arrival to its first token",
                              ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.generated = Counter("gitcap_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("gitcap_prompt_tokens", "Image prefix and prompt positions prefilled",
                                     registry=r)

    def watch(self, queue_depth, running) -> None:
        """Read the gauges from the scheduler when scraped (no updates to forget)."""
        self.queue_depth.set_function(queue_depth)
        self.running.set_function(running)

    def render(self) -> bytes:
        return generate_latest(self.registry)
