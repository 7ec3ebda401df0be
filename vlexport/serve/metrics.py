"""Prometheus metrics, one registry per app (so that two servers in one process, as in tests, do not mix)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self, max_batch: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("vlexport_requests", "Chat completion requests answered, by model and HTTP status",
                                ["model", "status"], registry=r)
        self.prompt_tokens = Counter("vlexport_prompt_tokens", "Prompt tokens of finished requests (image included)",
                                     ["model"], registry=r)
        self.completion_tokens = Counter("vlexport_completion_tokens", "Tokens generated for finished requests",
                                         ["model"], registry=r)
        self.dropped = Counter("vlexport_requests_dropped", "Requests that left before finishing, by reason "
                               "(cancelled, timeout, queue_full, server_shutdown, internal_error)", ["reason"], registry=r)
        self.queue_depth = Gauge("vlexport_queue_depth", "Requests waiting for a decode row", registry=r)
        self.active_rows = Gauge("vlexport_active_rows", "Requests decoding now", registry=r)
        self.latency = Histogram("vlexport_request_latency_seconds", "Arrival to last token, finished requests",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("vlexport_time_to_first_token_seconds", "Arrival to first token",
                                     ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.prefill_seconds = Histogram("vlexport_prefill_seconds", "One request's vision + prompt prefill",
                                         buckets=STEP_BUCKETS, registry=r)
        self.step_seconds = Histogram("vlexport_decode_step_seconds", "One batched decode step of one task group",
                                      buckets=STEP_BUCKETS, registry=r)
        self.batch_rows = Histogram("vlexport_decode_step_rows", "Rows in a decode step",
                                    buckets=tuple(range(1, max_batch + 1)), registry=r)

    def finished(self, model: str, prompt: int, completion: int, latency_s: float, first_token_s: float) -> None:
        self.prompt_tokens.labels(model=model).inc(prompt)
        self.completion_tokens.labels(model=model).inc(completion)
        self.latency.labels(model=model).observe(latency_s)
        self.first_token.labels(model=model).observe(first_token_s)

    def text(self) -> bytes:
        return generate_latest(self.registry)
