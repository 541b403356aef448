"""vdeploy.runtime.serve: the serving stack around one ``Pipeline``, torch-free.

- ``batcher``: :class:`Batcher`, step-level batching across requests (numpy only);
- ``app``: the ASGI app (Starlette on uvicorn), ``POST /v1/videos``, health, readiness and metrics
  (extra ``[serve]``);
- ``limits``, ``auth``, ``middleware``: what a client may send (body size, nesting, timeouts, uvicorn's
  limits), the optional API key, request ids and server faults (the app's front door);
- ``ray_app``: the same app as a Ray Serve deployment (extra ``[ray]``).

Only the batcher is imported here; the app's modules import their web stack when they are imported.
"""

from .batcher import Batcher, CallTrace, Closed, Job, QueueFull, RequestTimeout

__all__ = ["Batcher", "CallTrace", "Closed", "Job", "QueueFull", "RequestTimeout"]
