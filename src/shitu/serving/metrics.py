"""Prometheus metrics of one server: HTTP traffic, model batches and the gallery's size."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.routing import Match

from shitu.serving.http import HttpMiddleware
from shitu.serving.library import Snapshot

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# The request scope's key for the status the HTTP layer under the app answered a request with
# that the app had begun (its chunked body turned out not to be valid HTTP): counted in place
# of the app's own, which never reached the client, so the request counts once.
ANSWERED_BELOW = "shitu.answered_below"


class Metrics:
    """The server's own registry (not the process-global one), rendered by `/metrics`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "shitu_http_requests",
            "HTTP requests answered, by route template and status code",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "shitu_http_request_duration_seconds",
            "Time from request to the end of the response",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "shitu_inference_batch_size",
            "Images per model call (recognize: whole photos; extract: images to embed)",
            ["kind"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "shitu_inference_batch_duration_seconds",
            "Time of one model call",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue = Gauge(
            "shitu_inference_queue_images",
            "Images waiting for the inference thread",
            registry=self.registry,
        )
        self.decoded_pixels = Gauge(
            "shitu_decoded_pixels",
            "Decoded image pixels the requests in progress hold (--max-megapixels-in-flight)",
            registry=self.registry,
        )
        self.gallery_images = Gauge(
            "shitu_gallery_images", "Images in the gallery library", registry=self.registry
        )
        self.gallery_labels = Gauge(
            "shitu_gallery_labels", "Labels in the gallery library", registry=self.registry
        )
        self.gallery_generation = Gauge(
            "shitu_gallery_generation", "Writes committed to the library", registry=self.registry
        )

    def count_unrouted(self, status: int) -> None:
        """Count an answer (`status`) that the HTTP layer gave below the app, which never
        saw the request: one that is not valid HTTP, or whose headers stopped coming. Its
        method and route are not known."""
        self.requests.labels("other", "unmatched", str(status)).inc()

    def observe_batch(self, kind: str, size: int, seconds: float) -> None:
        self.batch_size.labels(kind).observe(size)
        self.batch_seconds.labels(kind).observe(seconds)

    def follow(
        self,
        snapshot: Callable[[], Snapshot],
        waiting: Callable[[], int],
        decoded_pixels: Callable[[], int],
    ) -> None:
        """Read the gallery gauges, the queue length and the decoded pixels when scraped."""
        self.gallery_images.set_function(lambda: len(snapshot().by_id))
        self.gallery_labels.set_function(lambda: len(snapshot().by_label))
        self.gallery_generation.set_function(lambda: snapshot().stats.get("generation", 0))
        self.queue.set_function(waiting)
        self.decoded_pixels.set_function(decoded_pixels)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _route_template(scope: dict) -> str:
    """The path template of the route a request was for; also for one answered before
    routing (a body over the size limit gets its 413 there), found from the app's routes."""
    route = scope.get("route")
    if route is None:
        routes = getattr(getattr(scope.get("app"), "router", None), "routes", ())
        route = next((r for r in routes if r.matches(scope)[0] is Match.FULL), None)
    return getattr(route, "path", "unmatched")


class MetricsMiddleware(HttpMiddleware):
    """ASGI middleware counting every HTTP request by its route template (not its URL,
    which would make one time series per image id)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        super().__init__(app)
        self.metrics = metrics

    async def handle(self, scope: dict, receive: Callable, send: Callable) -> None:
        start = time.perf_counter()
        status = 500

        async def record_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            status = scope.get(ANSWERED_BELOW, status)
            route = _route_template(scope)
            # Clients choose the method: unknown ones share one series, not one each.
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - start)
