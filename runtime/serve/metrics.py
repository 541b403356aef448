"""Prometheus metrics of one service, in a registry of its own (several apps may share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
PAD_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
OVERHEAD_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 600)
OUTCOMES = ("ok", "accepted", "invalid", "rejected", "timeout", "cancelled", "disconnected", "failed", "unavailable")


class Metrics:
    """``vdeploy_queue_depth``, ``vdeploy_active_requests``, ``vdeploy_batch_rows`` (real rows per denoiser
    call), ``vdeploy_batch_padded_rows`` (padding rows per call), ``vdeploy_denoiser_call_seconds{batch}``
    (seconds in the denoiser per call, by the call's batch size: its shape), ``vdeploy_batcher_seconds``
    (the batcher's own seconds around each call), ``vdeploy_shape_changes_total`` (calls whose batch differs
    from the previous call's), ``vdeploy_step_seconds`` (one step boundary: every call of it),
    ``vdeploy_request_seconds`` (submitted to video, sync requests), ``vdeploy_requests_total{status}``, and
    from warm-up ``vdeploy_batching`` (1 on, 0 off), ``vdeploy_warmup_seconds`` and
    ``vdeploy_warmup_row_seconds{batch}`` (measured seconds per row of each bucket)."""

    def __init__(self, service):
        self.registry = CollectorRegistry()
        r = self.registry

        def read(attr):
            return lambda: getattr(service.batcher, attr, 0) if service.batcher is not None else 0

        Gauge("vdeploy_queue_depth", "Requests waiting to join the batch", registry=r).set_function(read("queue_depth"))
        Gauge("vdeploy_active_requests", "Requests in the running batch", registry=r).set_function(read("active"))
        self.rows = Histogram("vdeploy_batch_rows", "U-Net rows per denoiser call", buckets=ROW_BUCKETS, registry=r)
        self.padded = Histogram("vdeploy_batch_padded_rows", "Padding rows per denoiser call (up to its bucket)",
                                buckets=PAD_BUCKETS, registry=r)
        self.around = Histogram("vdeploy_batcher_seconds", "Seconds of the batcher's own work around one denoiser "
                                "call (stacking, padding, splitting, sampler updates)", buckets=OVERHEAD_BUCKETS,
                                registry=r)
        self.changes = Counter("vdeploy_shape_changes", "Denoiser calls whose batch size differs from the previous "
                               "call's", registry=r)
        self.step = Histogram("vdeploy_step_seconds", "Seconds of one step boundary (all its denoiser calls)",
                              buckets=STEP_BUCKETS, registry=r)
        self.call = Histogram("vdeploy_denoiser_call_seconds", "Seconds of one denoiser call, by its batch size",
                              ["batch"], buckets=STEP_BUCKETS, registry=r)
        Gauge("vdeploy_batching", "1 when step-level batching is on (the warm-up's decision under auto)",
              registry=r).set_function(lambda: float(getattr(service.batcher, "batching", 0) or 0))
        Gauge("vdeploy_warmup_seconds", "Seconds the batch shapes' warm-up took", registry=r).set_function(
            lambda: service.batcher.warmup.wall if service.batcher is not None else 0.0)
        self.row_cost = Gauge("vdeploy_warmup_row_seconds", "Warm-up's measured seconds per row, by batch size",
                              ["batch"], registry=r)
        self.request = Histogram("vdeploy_request_seconds", "Seconds from submission to the video (sync requests)",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("vdeploy_requests", "POST /v1/videos requests by outcome", ["status"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)

    def warmed(self, batcher) -> None:
        """Record what ``batcher``'s warm-up measured (after it is built)."""
        for size, seconds in batcher.warmup.per_row().items():
            self.row_cost.labels(str(size)).set(seconds)

    def on_call(self, trace) -> None:
        """A :class:`~.batcher.CallTrace`."""
        self.rows.observe(trace.rows)
        self.padded.observe(trace.padded)
        self.call.labels(str(trace.batch)).observe(trace.denoise_s)
        self.around.observe(trace.batcher_s)
        if trace.shape_changed:
            self.changes.inc()

    def on_step(self, seconds: float, active: int) -> None:
        self.step.observe(seconds)

    def count(self, outcome: str) -> None:
        self.requests.labels(outcome).inc()

    def latency(self, seconds: float) -> None:
        self.request.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
