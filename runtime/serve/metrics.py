"""Prometheus metrics of one service, in a registry of its own (several apps may share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 600)
OUTCOMES = ("ok", "accepted", "invalid", "rejected", "timeout", "cancelled", "disconnected", "failed", "unavailable")


class Metrics:
    """``vdeploy_queue_depth``, ``vdeploy_active_requests``, ``vdeploy_batch_rows`` (rows per denoiser call),
    ``vdeploy_step_seconds`` (one step boundary: every call of it), ``vdeploy_denoiser_call_seconds``,
    ``vdeploy_request_seconds`` (submitted to video, sync requests) and ``vdeploy_requests_total{status}``."""

    def __init__(self, service):
        self.registry = CollectorRegistry()
        r = self.registry

        def read(attr):
            return lambda: getattr(service.batcher, attr, 0) if service.batcher is not None else 0

        Gauge("vdeploy_queue_depth", "Requests waiting to join the batch", registry=r).set_function(read("queue_depth"))
        Gauge("vdeploy_active_requests", "Requests in the running batch", registry=r).set_function(read("active"))
        self.rows = Histogram("vdeploy_batch_rows", "U-Net rows per denoiser call", buckets=ROW_BUCKETS, registry=r)
        self.step = Histogram("vdeploy_step_seconds", "Seconds of one step boundary (all its denoiser calls)",
                              buckets=STEP_BUCKETS, registry=r)
        self.call = Histogram("vdeploy_denoiser_call_seconds", "Seconds of one denoiser call",
                              buckets=STEP_BUCKETS, registry=r)
        self.request = Histogram("vdeploy_request_seconds", "Seconds from submission to the video (sync requests)",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("vdeploy_requests", "POST /v1/videos requests by outcome", ["status"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)

    def on_call(self, rows: int, seconds: float) -> None:
        self.rows.observe(rows)
        self.call.observe(seconds)

    def on_step(self, seconds: float, active: int) -> None:
        self.step.observe(seconds)

    def count(self, outcome: str) -> None:
        self.requests.labels(outcome).inc()

    def latency(self, seconds: float) -> None:
        self.request.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
