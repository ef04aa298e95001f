"""Prometheus metrics, one registry per app (tests build many apps in one process).

Requests and latency are labelled by the route template (``/individuals/{individual_id}``), never
the raw path, so label cardinality stays bounded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _IndexSizes(Collector):
    def __init__(self, sizes: Callable[[], dict[str, int]]) -> None:
        self._sizes = sizes

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "animalid_index_vectors", "Vectors in the serving index", labels=["species"]
        )
        for species, size in sorted(self._sizes().items()):
            family.add_metric([species], size)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "animalid_http_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "animalid_http_request_duration_seconds",
            "HTTP request latency by route",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inference = Histogram(
            "animalid_inference_seconds",
            "Model work by species and operation (embed, gradcam)",
            ["species", "operation"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.search = Histogram(
            "animalid_search_seconds",
            "Index search time by species",
            ["species"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

        self.orphans_removed = Counter(
            "animalid_orphan_files_removed",
            "Stored image files removed because no database row points at them (left by a crash)",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "animalid_batch_items",
            "Items per batched call by species and operation (embed: images per forward pass, "
            "search: queries per index search)",
            ["species", "operation"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )

    def observe_batch(self, species: str, operation: str, size: int) -> None:
        self.batch_size.labels(species, operation).observe(size)

    def watch_index_sizes(self, sizes: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_IndexSizes(sizes))

    @contextmanager
    def time_inference(self, species: str, operation: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.inference.labels(species, operation).observe(time.perf_counter() - start)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts and times every HTTP request by its matched route template."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(template, method, str(status)).inc()
            self.metrics.latency.labels(template, method).observe(time.perf_counter() - start)
