"""Ahead-of-time graph variants and the measurement that decides whether one is kept.

* :func:`slim`: ``onnxslim`` (constant folding, shape-op elimination, dead-node removal); the output
  keeps standard ONNX ops only, so TensorRT and every onnxruntime provider still read it.
* :func:`ort_offline`: onnxruntime's own offline optimization (``ORT_ENABLE_EXTENDED``); the output may
  contain ``com.microsoft`` fused ops, so it only serves onnxruntime.
* :func:`measure_latency`: per-call latency of several graphs measured interleaved (round-robin), so
  a noisy shared machine slows every candidate alike; median and min per graph.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from .checks import ort_session

log = logging.getLogger("vdeploy.export")

# a variant must beat the plain graph by this much (median latency) to be kept
MIN_GAIN = 0.05


def slim(src: str | Path, dst: str | Path) -> Path:
    """``onnxslim`` of ``src`` written to ``dst`` (standard ops only)."""
    import onnxslim

    model = onnxslim.slim(str(src))
    import onnx

    onnx.save(model, str(dst))
    return Path(dst)


def ort_offline(src: str | Path, dst: str | Path, threads: int = 2) -> Path:
    """onnxruntime's extended (hardware-independent) graph optimizations, saved to ``dst``."""
    import onnxruntime as ort

    from vdeploy.runtime.platform import ort_session_options

    so = ort_session_options(ort, threads, optimization="extended")
    so.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return Path(dst)


def measure_latency(
    graphs: dict[str, str | Path], feed: dict[str, np.ndarray], *, threads: int = 2, warmup: int = 2, repeats: int = 9
) -> dict[str, dict[str, float]]:
    """Per-call onnxruntime CPU latency of each graph on ``feed``, measured round-robin.

    Returns:
        ``{name: {"median_ms": ..., "min_ms": ...}}``.
    """
    sessions = {name: ort_session(path, threads=threads) for name, path in graphs.items()}
    for _ in range(warmup):
        for s in sessions.values():
            s.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feed)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: {"median_ms": float(np.median(v)), "min_ms": float(np.min(v))} for name, v in times.items()}


def choose(latency: dict[str, dict[str, float]], baseline: str = "plain", min_gain: float = MIN_GAIN) -> str:
    """The fastest graph by median latency, if it beats ``baseline`` by at least ``min_gain``; else baseline."""
    best = min(latency, key=lambda k: latency[k]["median_ms"])
    if best != baseline and latency[best]["median_ms"] <= (1 - min_gain) * latency[baseline]["median_ms"]:
        return best
    return baseline
