"""What ``nin serve`` has done, for Prometheus (``GET /metrics``).

A :class:`Metrics` owns its own ``CollectorRegistry``, so two apps in one process (tests) never share or
clash over counters:

* ``nin_requests_total{route,status}``: requests answered, by route and HTTP status;
* ``nin_request_seconds{route}``: how long each took, body and queue included (histogram);
* ``nin_batch_images``: images per forward pass (histogram): how well requests are being batched;
* ``nin_forward_seconds``: how long each forward pass took (histogram);
* ``nin_queue_images``: images waiting for a forward pass now (gauge);
* ``nin_requests_incoming``: requests being read or decoded now, on their way to the queue (gauge).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
IMAGES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class Metrics:
    """The server's counters, histograms and gauge, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("nin_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=self.registry)
        self.seconds = Histogram("nin_request_seconds", "Time to answer a request, by route", ["route"],
                                 buckets=SECONDS, registry=self.registry)
        self.batch = Histogram("nin_batch_images", "Images in one forward pass", buckets=IMAGES,
                               registry=self.registry)
        self.forward = Histogram("nin_forward_seconds", "Time of one forward pass", buckets=SECONDS,
                                 registry=self.registry)
        self.queue = Gauge("nin_queue_images", "Images waiting for a forward pass", registry=self.registry)
        self.incoming = Gauge("nin_requests_incoming", "Requests being read or decoded, on their way to the queue",
                              registry=self.registry)

    def answered(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.seconds.labels(route=route).observe(seconds)

    def text(self) -> tuple[bytes, str]:
        """The Prometheus text format of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
