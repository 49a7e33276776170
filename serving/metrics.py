"""Prometheus metrics of the server, in a registry of its own (several servers may share a process)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from mrl.serving.batcher import BatchStats

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServerMetrics:
    """Requests by status, latency, queue time, batch sizes, tokens and queue depth, per model."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mrl_requests",
            "Embed requests by model, transport (grpc, http) and outcome (ok, invalid_argument, queue_full, ...)",
            ["model", "transport", "outcome"],
            registry=r,
        )
        self.latency = Histogram(
            "mrl_request_latency_seconds",
            "Embed request latency inside the server",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "mrl_queue_time_seconds",
            "Time each text waited for its batch",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_time = Histogram(
            "mrl_inference_seconds",
            "Time each batch spent in the model",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram("mrl_batch_size", "Texts per batch", ["model"], buckets=_BATCH_BUCKETS, registry=r)
        self.batch_padded_tokens = Histogram(
            "mrl_batch_padded_tokens",
            "Padded tokens per batch (texts x longest)",
            ["model"],
            buckets=tuple(2**k for k in range(4, 18)),
            registry=r,
        )
        self.input_tokens = Counter("mrl_input_tokens", "Tokens embedded (before padding)", ["model"], registry=r)
        self.padded_tokens = Counter("mrl_padded_tokens", "Tokens computed, padding included", ["model"], registry=r)
        self.texts = Counter("mrl_texts", "Texts embedded", ["model"], registry=r)
        self.failed_texts = Counter("mrl_failed_texts", "Texts whose batch run raised", ["model"], registry=r)
        self.abandoned_texts = Counter(
            "mrl_abandoned_texts",
            "Texts computed whose caller had gone (cancelled, or past its deadline) when they were done",
            ["model"],
            registry=r,
        )
        self.queue_depth = Gauge("mrl_queue_depth", "Texts waiting for a batch", ["model"], registry=r)
        self.queue_tokens = Gauge("mrl_queue_tokens", "Tokens waiting for a batch", ["model"], registry=r)
        self.in_flight = Gauge("mrl_requests_in_flight", "Embed requests being handled", ["model"], registry=r)
        self.auth_denied = Counter(
            "mrl_auth_denied", "Calls refused for a missing or wrong bearer token", ["method"], registry=r
        )
        self.ready = Gauge("mrl_model_ready", "1 once a model is warm and serving", ["model"], registry=r)
        self.verified = Gauge(
            "mrl_model_verified",
            "1 once a model's acceptance test passed on this machine at warm-up; 0 before, where its artifact "
            "carries none, or where it failed and --serve-unverified serves it anyway",
            ["model"],
            registry=r,
        )
        self._http: Any = None
        self._thread: threading.Thread | None = None

    def batch_observer(self, model: str) -> Callable[[BatchStats], None]:
        """A batcher `on_batch` callback recording one model's batches."""
        queue_time = self.queue_time.labels(model)
        inference = self.inference_time.labels(model)
        size = self.batch_size.labels(model)
        padded = self.batch_padded_tokens.labels(model)
        tokens, padded_total = self.input_tokens.labels(model), self.padded_tokens.labels(model)
        texts, failed = self.texts.labels(model), self.failed_texts.labels(model)
        abandoned = self.abandoned_texts.labels(model)

        def observe(stats: BatchStats) -> None:
            for seconds in stats.queue_seconds:
                queue_time.observe(seconds)
            inference.observe(stats.run_seconds)
            size.observe(stats.size)
            padded.observe(stats.padded_tokens)
            tokens.inc(stats.tokens)
            padded_total.inc(stats.padded_tokens)
            texts.inc(stats.size - stats.failed - stats.abandoned)
            if stats.failed:
                failed.inc(stats.failed)
            if stats.abandoned:
                abandoned.inc(stats.abandoned)

        return observe

    def track_queue(self, model: str, depth: Callable[[], float], tokens: Callable[[], float]) -> None:
        """Read a model's queue depth and tokens at scrape time."""
        self.queue_depth.labels(model).set_function(depth)
        self.queue_tokens.labels(model).set_function(tokens)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint in a thread; returns the port it bound."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        bound = self._http.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def stop(self) -> None:
        """Stop the /metrics endpoint."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
