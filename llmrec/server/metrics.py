"""Prometheus metrics of one app, in its own `CollectorRegistry` (several apps may live in one process)."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Labelled by route, never by the raw path: a scan of random URLs must not grow one series per URL.
KNOWN_PATHS = frozenset(
    {"/recommend", "/recommend/batch", "/rerank", "/explain", "/items", "/health", "/ready", "/metrics",
     "/admin/reload", "/admin/save", "/docs", "/openapi.json"}
)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServerMetrics:
    """Request counts and latencies by endpoint, micro-batch sizes, shed requests and the catalogue size."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, catalogue_size: Callable[[], float], in_flight: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "llmrec_requests", "HTTP requests answered, by endpoint and status code.", ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "llmrec_request_latency_seconds", "Time from request to response, by endpoint.", ["endpoint"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            "llmrec_batch_size", "Users scored per recommend_batch call (micro-batches and /recommend/batch).",
            buckets=_BATCH_BUCKETS, registry=self.registry,
        )
        self.shed = Counter("llmrec_shed_requests", "Requests refused with 503 because max_in_flight were running.", registry=self.registry)
        self.reloads = Counter("llmrec_reloads", "Model reloads, by outcome.", ["outcome"], registry=self.registry)
        Gauge("llmrec_catalogue_items", "Items in the served catalogue.", registry=self.registry).set_function(catalogue_size)
        Gauge("llmrec_in_flight_requests", "Requests being served now.", registry=self.registry).set_function(in_flight)

    def observe(self, path: str, status: int, started: float) -> None:
        endpoint = path if path in KNOWN_PATHS else "other"
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint).observe(time.perf_counter() - started)

    def render(self) -> bytes:
        return generate_latest(self.registry)
