"""The app on Ray Serve: a local Ray instance, 2 replicas, videos equal direct ``Pipeline`` calls.

Skipped, saying why, where ray[serve] is not installed (extra ``[ray]``) or a local Ray cannot start.
"""

from __future__ import annotations

import io
import json
import socket

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray Serve is not installed: pip install 'vdeploy[ray]'")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'vdeploy[ray]'")
pytest.importorskip("starlette", reason="the serving extra is not installed: pip install 'vdeploy[serve]'")

from runtime_fixtures import model_dir  # noqa: E402
from serve_fixtures import assert_close, request, wait_for  # noqa: E402
from vdeploy.runtime import Pipeline  # noqa: E402
from vdeploy.runtime.serve.ray_app import build_app, deployment  # noqa: E402


@pytest.fixture(scope="module")
def ray_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    except Exception as e:  # no shared memory, no ports, ...: Ray cannot start here
        pytest.skip(f"a local Ray instance cannot start here: {type(e).__name__}: {e}")
    try:
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_serve_the_videos_of_direct_pipeline_calls(ray_port):
    model = model_dir("uncond")
    app = deployment(model, replicas=2, backend="cpu", threads=1, max_batch=8,
                     ray_actor_options={"num_cpus": 0.5})
    serve.run(app, name="vdeploy", route_prefix="/")
    wait_for(lambda: request(ray_port, "GET", "/readyz")[0] == 200, timeout=120, what="a ready replica")
    pids = set()

    def both_replicas_answered():  # the proxy spreads requests; a replica still loading answers 503
        status, _, body = request(ray_port, "GET", "/readyz")
        if status == 200:
            pids.add(json.loads(body)["pid"])
        return len(pids) == 2

    wait_for(both_replicas_answered, timeout=120, what=f"2 ready replicas (saw {pids})")
    pipe = Pipeline.from_dir(model, backend="cpu", threads=1)
    for kwargs in (dict(seed=0, steps=4), dict(seed=1, steps=3, sampler="ddim", eta=0.5, batch_size=2)):
        status, headers, raw = request(ray_port, "POST", "/v1/videos", {**kwargs, "format": "npy"})
        assert status == 200 and headers["content-type"] == "application/x-npy", raw[:200]
        assert_close(np.load(io.BytesIO(raw)), pipe(**kwargs), str(kwargs))
    status, _, raw = request(ray_port, "POST", "/v1/videos", {"sampler": "euler"})
    assert status == 422 and json.loads(raw)["field"] == "sampler"


def test_build_app_reads_key_value_arguments():
    with pytest.raises(ValueError, match="build_app needs model_dir=DIR"):
        build_app({})
    with pytest.raises(ValueError, match="unknown service setting colour"):
        build_app({"model_dir": "m", "colour": "red"})
    app = build_app({"model_dir": "m", "replicas": "3", "max_batch": "4", "batching": "auto", "buckets": "1,2,4",
                     "autoscaling_config": '{"min_replicas": 1, "max_replicas": 4}'})
    assert type(app).__name__ == "Application"
