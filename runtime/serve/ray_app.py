"""The serving app on Ray Serve (extra ``[ray]``): replicas of the same Starlette app, each one Pipeline + Batcher.

Three ways in:

- ``serve run vdeploy.runtime.serve.ray_app:app`` with ``VDEPLOY_MODEL_DIR=model/`` in the environment
  (and optionally ``VDEPLOY_REPLICAS``, ``VDEPLOY_MAX_BATCH``, ``VDEPLOY_BACKEND``);
- ``serve run vdeploy.runtime.serve.ray_app:build_app model_dir=model/ replicas=2`` (Ray Serve's application
  builder: the ``key=value`` arguments arrive as a dict; ``autoscaling_config`` may be given as JSON);
- ``vdeploy serve --model model/ --ray --replicas 2`` (:func:`run`), or :func:`deployment` from Python.

Each replica builds its app with ``serve.ingress(builder)``: the builder runs on the replica, so the model
directory is opened there (a path every node can read), and the app's lifespan (model load, batcher start,
drain) runs as under uvicorn. Ray Serve's proxy routes requests among the replicas; the batching happens
inside each. Torch-free.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

SERVICE_KEYS = ("backend", "threads", "max_batch", "max_queue", "batching", "buckets", "timeout", "max_videos",
                "grace", "max_body", "client_timeout", "api_key", "metrics_open")


def deployment(model_dir, *, replicas: int = 1, autoscaling_config: dict | None = None,
               ray_actor_options: dict | None = None, name: str = "vdeploy", **service_kwargs):
    """The bound Ray Serve application: ``replicas`` copies of the app on ``model_dir``.

    Args:
        model_dir: the model directory (read on every replica).
        replicas: ``num_replicas`` (ignored when ``autoscaling_config`` is given).
        autoscaling_config: passed to ``serve.deployment`` as is (``min_replicas``, ``max_replicas``,
            ``target_ongoing_requests``, ...).
        ray_actor_options: passed as is (``{"num_cpus": 1}``, ``{"num_gpus": 1}``, ...).
        **service_kwargs: ``Service``'s settings (backend, threads, max_batch, max_queue, batching, timeout,
            max_videos, grace).
    """
    from ray import serve

    unknown = sorted(set(service_kwargs) - set(SERVICE_KEYS))
    if unknown:
        raise ValueError(f"unknown service setting {', '.join(unknown)} (the settings: {', '.join(SERVICE_KEYS)})")
    model_dir = str(Path(model_dir).resolve())

    def build():
        from vdeploy.runtime.serve.app import Service, create_app

        return create_app(Service(model_dir, **service_kwargs))

    options: dict = {"name": name}
    if autoscaling_config is not None:
        options["autoscaling_config"] = dict(autoscaling_config)
    else:
        options["num_replicas"] = int(replicas)
    if ray_actor_options is not None:
        options["ray_actor_options"] = dict(ray_actor_options)
    return serve.deployment(serve.ingress(build)(), **options).bind()


def build_app(args: dict):
    """Ray Serve application builder: ``serve run vdeploy.runtime.serve.ray_app:build_app model_dir=DIR [k=v ...]``.

    Keys: ``model_dir`` (required), ``replicas``, ``autoscaling_config`` and ``ray_actor_options`` (JSON
    objects), and the service settings of :func:`deployment` (numbers and booleans as text).
    """
    args = dict(args)
    if "model_dir" not in args:
        raise ValueError("build_app needs model_dir=DIR")
    model_dir = args.pop("model_dir")
    kwargs = {}
    for key in ("autoscaling_config", "ray_actor_options"):
        if key in args:
            value = args.pop(key)
            kwargs[key] = json.loads(value) if isinstance(value, str) else value
    replicas = int(args.pop("replicas", 1))
    return deployment(model_dir, replicas=replicas, **kwargs, **{k: _value(v) for k, v in args.items()})


def _value(text):
    """``key=value`` text as the setting's type: true/false, integers, floats, else the text."""
    if not isinstance(text, str):
        return text
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def __getattr__(name):  # ``serve run vdeploy.runtime.serve.ray_app:app``: built from the environment on access
    if name != "app":
        raise AttributeError(name)
    if "VDEPLOY_MODEL_DIR" not in os.environ:
        raise RuntimeError("vdeploy.runtime.serve.ray_app:app reads the model directory from VDEPLOY_MODEL_DIR")
    settings = {key: _value(os.environ[f"VDEPLOY_{key.upper()}"]) for key in SERVICE_KEYS
                if f"VDEPLOY_{key.upper()}" in os.environ}
    return deployment(os.environ["VDEPLOY_MODEL_DIR"], replicas=int(os.environ.get("VDEPLOY_REPLICAS", 1)),
                      **settings)


def run(model_dir, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
        autoscaling_config: dict | None = None, **service_kwargs) -> None:
    """``vdeploy serve --ray``: start (or join, with ``RAY_ADDRESS``) a Ray cluster, deploy, serve until SIGTERM or
    SIGINT, then shut Serve down (Ray Serve drains each replica: ``graceful_shutdown_timeout_s``)."""
    import ray
    from ray import serve

    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.run(deployment(model_dir, replicas=replicas, autoscaling_config=autoscaling_config, **service_kwargs),
                  name="vdeploy", route_prefix="/")
        print(f"vdeploy on Ray Serve: http://{host}:{port}/v1/videos ({replicas} replica(s))", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
