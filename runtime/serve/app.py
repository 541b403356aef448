"""The HTTP service: a Starlette ASGI app around one ``Pipeline`` and its :class:`~.batcher.Batcher`.

Routes:

- ``POST /v1/videos``: a JSON body (``requests.FIELDS``) -> the video bytes (gif, mp4 or npy); with
  ``"async": true`` -> 202 and ``{"id": ...}``; ``GET /v1/videos/{id}`` then answers the status as JSON
  until the video is ready, and the video after; ``DELETE /v1/videos/{id}`` cancels it.
- ``GET /healthz`` (the process answers), ``GET /readyz`` (the model is loaded and the server is not
  draining), ``GET /metrics`` (Prometheus text).

Errors are JSON ``{"error": ..., "field": ...}``: 422 for a bad body (the field named), 413 past the body
limit, 415 for a body not sent as ``application/json``, 408 for a body that stops arriving, 401 without the
API key (when one is set), 429 with ``Retry-After`` when the queue is full, 503 while loading or shutting
down, 504 past the request timeout, 404 for an unknown job; 500 only for a server fault (logged once with the
request id); never a traceback. Every response carries ``X-Request-Id``. The body's bounds are
``limits.py``'s, the key ``auth.py``'s, request ids and faults ``middleware.py``'s. A client that disconnects cancels its request, which leaves
the batch at the next step boundary. Starlette rather than FastAPI: the request schema is checked by
``requests.parse`` with the CLI's messages (FastAPI's pydantic errors would be a second wording), and
Starlette is the smaller dependency (FastAPI is Starlette plus pydantic and more).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import limits
from .auth import ApiKey
from .batcher import Batcher, Closed, Job, QueueFull, RequestTimeout
from .metrics import Metrics
from .middleware import FrontDoor, request_id
from .requests import FORMATS, FRAME_FIELDS, MAX_PROMPT_CHARS, Invalid, parse

log = logging.getLogger("vdeploy.runtime.serve")
MAX_JOBS = 256  # async jobs kept (finished ones are dropped oldest first)


class Service:
    """The state behind the app: the pipeline (loaded on a thread at startup), the batcher, async jobs.

    Args:
        model_dir: the model directory; or give ``pipe``, an opened Pipeline.
        backend, threads: as ``Pipeline.from_dir`` takes them.
        max_batch, max_queue, batching, buckets: the batcher's (see :class:`Batcher`); batching ``"auto"`` by
            default (decided by the warm-up's measurement; afterwards ``batching`` holds the decision, a bool).
        timeout: seconds a request may take from submission (None: no limit).
        max_videos: videos one request may ask for.
        grace: seconds a SIGTERM drain may take before the rest is refused with 503.
        max_body: bytes a request body may have (None: the largest legal request's, ``limits.default_max_body``,
            set when the model has loaded).
        client_timeout: seconds a request's head may take to arrive, and the longest pause in its body.
        api_key: the key every endpoint but ``/healthz`` then needs (``auth.py``; None: no key).
        metrics_open: with a key, ``/metrics`` answers without it.
    """

    def __init__(self, model_dir=None, *, pipe=None, backend: str = "auto", threads: int | None = None,
                 max_batch: int = 8, max_queue: int = 64, batching: bool | str = "auto", buckets=None,
                 timeout: float | None = 600.0, max_videos: int = 16, grace: float = 30.0,
                 max_body: int | None = None, client_timeout: float = limits.CLIENT_TIMEOUT,
                 api_key: str | None = None, metrics_open: bool = False):
        if (model_dir is None) == (pipe is None):
            raise ValueError("give either model_dir or pipe")
        self.model_dir = model_dir
        self.backend, self.threads = backend, threads
        self.max_batch, self.max_queue, self.batching, self.buckets = max_batch, max_queue, batching, buckets
        self.timeout, self.max_videos, self.grace = timeout, max_videos, grace
        self.max_body, self.client_timeout = max_body, client_timeout
        self.api_key = ApiKey(api_key, metrics_open=metrics_open)
        self.metrics = Metrics(self)
        self.pipe = pipe
        self.batcher: Batcher | None = None
        self.load_error: str | None = None
        self.draining = False
        self.jobs: OrderedDict[str, tuple[Job, str, float]] = OrderedDict()
        self._drain_thread: threading.Thread | None = None
        self._loaded = threading.Event()

    # ---------------------------------------------------------------- lifecycle ----

    def load(self) -> None:
        """Open the pipeline (unless given) and start the batcher; errors are kept for ``/readyz``."""
        try:
            if self.pipe is None:
                from ..pipeline import Pipeline

                self.pipe = Pipeline.from_dir(self.model_dir, backend=self.backend, threads=self.threads)
            self._bound_body()
            batcher = Batcher(self.pipe, max_batch=self.max_batch, max_queue=self.max_queue, batching=self.batching,
                              buckets=self.buckets, on_call=self.metrics.on_call, on_step=self.metrics.on_step)
            self.metrics.warmed(batcher)  # /readyz turns ready below, after the warm-up of the batch shapes
            self.batching, self.batcher = batcher.batching, batcher
            log.info("serving %s on %s (batching %s: %s; buckets %s; warm-up %.1f s; max batch %d rows, queue %d)",
                     self.pipe.model_dir, self.pipe.backend_name, "on" if self.batching else "off",
                     batcher.warmup.why, ",".join(map(str, batcher.buckets)), batcher.warmup.wall, self.max_batch,
                     self.max_queue)
        except Exception as e:  # ManifestError, BackendUnavailable, ...: the process stays up, not ready
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("cannot load the model: %s", self.load_error)
        finally:
            self._loaded.set()

    def begin_shutdown(self) -> None:
        """SIGTERM: refuse new work (503), finish what is queued and running within ``grace`` seconds, then
        end the rest with 503. Returns at once; the drain runs on a thread."""
        if self.draining:
            return
        self.draining = True
        log.info("shutting down: draining in-flight requests (at most %.0f s)", self.grace)
        if self.batcher is not None:
            self._drain_thread = threading.Thread(
                target=self.batcher.close, kwargs={"drain": True, "timeout": self.grace}, daemon=True)
            self._drain_thread.start()

    def close(self) -> None:
        """The app's shutdown: stop the batcher (what is left ends with Closed) and release the pipeline."""
        self.draining = True
        self._loaded.wait(timeout=60)
        if self._drain_thread is not None:
            self._drain_thread.join(self.grace + 5)
        if self.batcher is not None:
            self.batcher.close(drain=False)
        if self.pipe is not None and self.model_dir is not None:
            self.pipe.close()

    def ready(self) -> tuple[bool, str]:
        if self.load_error:
            return False, f"the model failed to load: {self.load_error}"
        if self.batcher is None:
            return False, "loading the model"
        if self.draining:
            return False, "shutting down"
        return True, "ready"

    # ---------------------------------------------------------------- requests ----

    def _bound_body(self) -> None:
        """``max_body`` from the loaded model when not given: the largest legal request (``limits``)."""
        if self.max_body is None:
            self.max_body = limits.default_max_body(self.pipe.shape, self.pipe.cond_width, self.max_videos,
                                                    MAX_PROMPT_CHARS)

    def submit_body(self, raw: bytes | bytearray) -> tuple[Job, str, float, bool]:
        """:meth:`submit` of a raw body: JSON read under ``limits.load_json``'s bounds (on the caller's thread:
        the app calls it off the event loop). Raises BodyError or :meth:`submit`'s errors."""
        return self.submit(limits.load_json(raw))

    def submit(self, body) -> tuple[Job, str, float, bool]:
        ready, why = self.ready()
        if not ready:
            raise Closed(why)
        try:
            request = parse(body, self.pipe, max_videos=self.max_videos)
        except Invalid:
            raise
        except Exception as e:  # a value the checks did not foresee: still the client's input, so a 422
            log.warning("request %s: checking the body raised %s (answered 422)", request_id(), type(e).__name__,
                        exc_info=True)
            raise Invalid(None, f"the body could not be checked: {type(e).__name__}: {str(e)[:200]}") from None
        try:
            job = self.batcher.submit(timeout=self.timeout, **request.kwargs)
        except ValueError as e:  # a check of Pipeline.prepare the parser does not repeat (the known frames' shape...)
            message = str(e)
            field = next((f for f in FRAME_FIELDS if f in request.kwargs and f in message), None)
            if field is None and "frames" in request.kwargs and "frame" in message:
                field = "frames"
            raise Invalid(field, message) from None
        if request.run_async:
            self._keep(job, request.format, request.fps)
        return job, request.format, request.fps, request.run_async

    def _keep(self, job: Job, fmt: str, fps: float) -> None:
        job.id = uuid.uuid4().hex
        self.jobs[job.id] = (job, fmt, fps)
        while len(self.jobs) > MAX_JOBS:
            oldest = next((k for k, (j, _, _) in self.jobs.items() if j.done()), None)
            if oldest is None:
                break
            del self.jobs[oldest]


def encode(video: np.ndarray, fmt: str, fps: float) -> bytes:
    """The video (``(b, c, f, h, w)`` in [0, 1]) as file bytes: GIF, MP4 (a batch as a grid) or ``.npy``."""
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, video, allow_pickle=False)
        return buf.getvalue()
    from ..video import save_gif, save_mp4

    with tempfile.TemporaryDirectory(prefix="vdeploy-serve-") as tmp:
        path = Path(tmp) / f"video.{fmt}"
        (save_gif if fmt == "gif" else save_mp4)(video, path, fps=fps)
        return path.read_bytes()


def _error(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status, headers=headers)


async def _read_request(service: Service, request: Request):
    """``POST /v1/videos``'s body checked and submitted: ``service.submit``'s answer, or the error response.

    Before a byte of the body is read: 503 unless ready, 415 unless ``application/json``, 413 from
    ``Content-Length``; while reading: 413 past ``max_body``, 408 on a stalled upload, nothing (499) when the
    client leaves. The JSON is read and checked on a worker thread (the event loop keeps answering). Refusals
    before the body was read close the connection (its unread body is not drained).
    """
    close = {"Connection": "close"}
    ready, why = service.ready()
    if not ready:
        service.metrics.count("unavailable")
        return _error(503, why, headers={"Retry-After": "5", **close})
    try:
        limits.check_content_type(request.headers.get("content-type"))
        raw = await limits.read_body(request.receive, request.headers, service.max_body, service.client_timeout)
    except limits.BodyError as e:
        service.metrics.count("invalid")
        return _error(e.status, e.message, headers=close)
    except limits.ClientGone:
        service.metrics.count("disconnected")
        return Response(status_code=499)
    try:
        return await asyncio.to_thread(service.submit_body, raw)
    except limits.BodyError as e:
        service.metrics.count("invalid")
        return _error(e.status, e.message)
    except Invalid as e:
        service.metrics.count("invalid")
        return _error(422, e.message, e.field)
    except QueueFull as e:
        service.metrics.count("rejected")
        return _error(429, str(e), headers={"Retry-After": str(service.batcher.retry_after())})
    except Closed as e:
        service.metrics.count("unavailable")
        return _error(503, str(e), headers={"Retry-After": "5"})


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own refusals (404 unknown path, 405 method) in the app's JSON shape."""
    return _error(exc.status_code, exc.detail, headers=exc.headers)


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read: the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(service: Service) -> Starlette:
    """The Starlette app around ``service`` (the model loads on a thread at startup; ``/readyz`` says when)."""

    async def post_video(request: Request) -> Response:
        submitted = await _read_request(service, request)
        if isinstance(submitted, Response):
            return submitted
        job, fmt, fps, run_async = submitted
        if run_async:
            service.metrics.count("accepted")
            return JSONResponse({"id": job.id, "status": job.status, "steps": job.steps}, status_code=202,
                                headers={"Location": f"/v1/videos/{job.id}"})
        waiter = asyncio.wrap_future(job)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if waiter not in done:  # the client left: its rows leave the batch at the next step boundary
            job.cancel()
            service.metrics.count("disconnected")
            return Response(status_code=499)
        waiter.exception()  # retrieved here (asyncio would log it); _video_response reads the job itself
        return await _video_response(job, fmt, fps)

    async def _video_response(job: Job, fmt: str, fps: float) -> Response:
        try:
            video = job.result()
        except RequestTimeout as e:
            service.metrics.count("timeout")
            return _error(504, f"{e} (the server's timeout is {service.timeout:g} s)")
        except Closed as e:
            service.metrics.count("unavailable")
            return _error(503, str(e), headers={"Retry-After": "5"})
        except Exception as e:
            service.metrics.count("failed")
            log.error("request %s failed: sampling raised %s", request_id(), type(e).__name__, exc_info=e)
            return _error(500, f"sampling failed: {e} (request id {request_id()})")
        try:
            data = await asyncio.to_thread(encode, video, fmt, fps)
        except (OSError, RuntimeError, ValueError) as e:
            service.metrics.count("failed")
            log.error("request %s failed: encoding %s raised %s", request_id(), fmt, type(e).__name__, exc_info=e)
            return _error(500, f"cannot encode the video as {fmt}: {e} (request id {request_id()})")
        service.metrics.count("ok")
        service.metrics.latency(time.monotonic() - job.submitted)
        return Response(data, media_type=FORMATS[fmt], headers={"X-Steps": str(job.steps)})

    async def get_video(request: Request) -> Response:
        entry = service.jobs.get(request.path_params["id"])
        if entry is None:
            return _error(404, f"no job {request.path_params['id']!r} (unknown, or dropped after {MAX_JOBS} newer ones)")
        job, fmt, fps = entry
        if job.cancelled():
            return JSONResponse({"id": job.id, "status": "cancelled", "step": job.step, "steps": job.steps})
        if not job.done():
            return JSONResponse({"id": job.id, "status": job.status, "step": job.step, "steps": job.steps})
        if job.exception() is not None:
            status = {RequestTimeout: "timeout", Closed: "unavailable"}.get(type(job.exception()), "failed")
            return JSONResponse({"id": job.id, "status": status, "error": str(job.exception()),
                                 "step": job.step, "steps": job.steps})
        return await _video_response(job, fmt, fps)

    async def delete_video(request: Request) -> Response:
        entry = service.jobs.get(request.path_params["id"])
        if entry is None:
            return _error(404, f"no job {request.path_params['id']!r}")
        job = entry[0]
        cancelled = job.cancel()
        if cancelled:
            service.metrics.count("cancelled")
        return JSONResponse({"id": job.id, "status": "cancelled" if cancelled or job.cancelled() else job.status})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        ready, why = service.ready()
        body = {"status": why}
        if ready:
            body.update(model=str(service.pipe.model_dir), backend=service.pipe.backend_name,
                        batching=service.batching, max_batch=service.max_batch, pid=os.getpid())
        return JSONResponse(body, status_code=200 if ready else 503)

    async def metrics(request: Request) -> Response:
        data, content_type = service.metrics.render()
        return Response(data, media_type=content_type)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=service.load, name="vdeploy-load", daemon=True).start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.close)

    app = Starlette(routes=[
        Route("/v1/videos", post_video, methods=["POST"]),
        Route("/v1/videos/{id}", get_video, methods=["GET"]),
        Route("/v1/videos/{id}", delete_video, methods=["DELETE"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], lifespan=lifespan, middleware=[Middleware(FrontDoor, api_key=service.api_key)],
        exception_handlers={HTTPException: _http_error})
    app.state.service = service
    return app


def serve(service: Service, host: str = "127.0.0.1", port: int = 8000, *, sockets=None, log_level: str = "info"):
    """Run the app on uvicorn until SIGTERM/SIGINT: then stop listening, drain (``service.grace`` seconds;
    new requests 503), end what is left with 503 and exit normally (the process's status 0)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            service.begin_shutdown()
            if self.should_exit and sig == 2:  # a second Ctrl-C: quit now
                self.force_exit = True
            self.should_exit = True  # not re-raised after the drain: a SIGTERM'd server exits 0

    if not service.api_key.required and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without an API key: anyone who can reach the port can use it "
                    "(--api-key-file FILE, and a TLS proxy in front: README, Serving)", host)
    config = uvicorn.Config(create_app(service), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=int(service.grace) + 5, access_log=False,
                            **limits.uvicorn_limits(service.max_queue, service.max_batch, service.client_timeout))
    server = Server(config)
    server.run(sockets=sockets)
    return server
