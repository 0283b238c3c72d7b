"""Prometheus metrics of one server (prometheus_client, on a registry of its own so several servers
in one process, as in tests, do not share counters)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dare_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("dare_request_seconds", "time from a decoding request's arrival to its answer "
                                 "(the end of its stream)", ["endpoint"], registry=r)
        self.queue_depth = Gauge("dare_queue_depth", "rows (prompt x n) waiting for a batch", registry=r)
        self.batch_size = Histogram("dare_batch_size", "rows decoded together per batch", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.max_batch_size = Gauge("dare_batch_size_max", "largest batch decoded so far", registry=r)
        self.nfe = Counter("dare_nfe", "model forwards (network function evaluations)", registry=r)
        self.generated_tokens = Counter("dare_generated_tokens", "answer tokens generated", registry=r)
        self.decode_seconds = Counter("dare_decode_seconds", "seconds the worker spent decoding batches", registry=r)
        self.tokens_per_second = Gauge("dare_tokens_per_second", "answer tokens per second of the last batch",
                                       registry=r)
        self.cancelled_batches = Counter("dare_cancelled_batches", "batches stopped because every client left "
                                         "or the server shut down", registry=r)
        self.isolated_batches = Counter("dare_isolated_batches", "batches that failed and were decoded again one "
                                        "row at a time, so that only a failing request gets an error", registry=r)
        self.refused_connections = Counter("dare_refused_connections", "connections answered 503 and closed "
                                           "because --max-connections were open", registry=r)
        self._largest = 0

    def record_batch(self, size: int, nfe: int, tokens: int, seconds: float) -> None:
        self.nfe.inc(nfe)
        self.generated_tokens.inc(tokens)
        self.decode_seconds.inc(seconds)
        self.tokens_per_second.set(tokens / seconds if seconds > 0 else 0.0)
        self._largest = max(self._largest, size)
        self.max_batch_size.set(self._largest)

    def render(self) -> bytes:
        return generate_latest(self.registry)
