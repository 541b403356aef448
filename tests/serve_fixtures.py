"""Shared pieces of the serving tests: the tiny conditioned runtime model with a fused ``--cfg`` graph (a session
fixture), the batched-vs-solo check, and small HTTP helpers (stdlib http.client, 127.0.0.1 only).

    from serve_fixtures import assert_close, fused_model_dir, request  # noqa: F401  (fused_model_dir: a fixture)

Tolerance of ``assert_close``: batching changes the batch dimension of the convolutions, so eps agrees to
float32 round-off (~1e-7), not bit for bit. On the videos (in [0, 1]) that is 0.6-3.4e-6 max for most
runs (measured: dpmpp/ddim, 2-8 steps, 4 requests of 2 rows), but a sampler's first step on the fixtures'
50-step cosine schedule computes ``x0 = (x - sigma eps) / alpha`` with alpha ~ 3e-3, which magnifies eps's
round-off ~300x on the pixels that x0's clip does not absorb: one 3-step request measured 1.2e-3 on 18 of
its 768 values (2.3%). The check: 95% of the values within 1e-5 and all within 5e-3 (a misrouted row is
off by ~0.1-1 almost everywhere).
"""

from __future__ import annotations

import http.client
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from runtime_fixtures import COND_DIM, config, tiny_unet, torch_threads, write_model_dir


@pytest.fixture(scope="session")
def fused_model_dir(tmp_path_factory) -> Path:
    """``runtime_fixtures.model_dir("cond")``'s model (text encoder, null embedding) plus ``denoiser_cfg.onnx``."""
    with torch_threads(1):
        return write_model_dir(tmp_path_factory.mktemp("fused") / "m", tiny_unet(COND_DIM), config(COND_DIM),
                               fused_cfg=True, text_encoder=True)


ATOL, MAX_DIFF = 1e-5, 5e-3


def assert_close(video, solo, what=""):
    assert video.shape == solo.shape and video.dtype == np.float32, what
    diff = np.abs(video - solo)
    assert np.percentile(diff, 95) <= ATOL and diff.max() <= MAX_DIFF, (
        f"{what}: |batched - solo| 95th percentile {np.percentile(diff, 95):.3g}, max {diff.max():.3g}")
    return float(diff.max())


def wait_for(predicate, timeout=30.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def request(port, method, path, body=None, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def metric(port, name) -> float:
    text = request(port, "GET", "/metrics")[2].decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))
