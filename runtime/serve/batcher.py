"""Step-level batching across requests: many sampling runs, one denoiser call per step boundary.

A diffusion request is a loop of denoiser calls whose timestep is a per-row input (``t`` is ``(b,)``), so
requests at *different* steps, with different samplers and step counts, can share one call: the same idea
as continuous batching in LLM servers. The :class:`Batcher` holds one :class:`~vdeploy.runtime.Pipeline`
and one worker thread that owns the denoiser. Each request is the pipeline's own run, a ``SamplerRun``
(``Pipeline.prepare``: the same noise from the seed, the same cond resolution, the same checks as a
``Pipeline.__call__``), whose step machine the worker steps; at every step boundary the worker

1. drops the requests that were cancelled (their future's ``cancel()``) or ran past their deadline, and
   admits queued ones while the rows fit in ``max_batch`` (a request never waits for a batch to fill: it
   joins at the next boundary);
2. stacks the active requests' pending ``StepRequest`` rows for the plain denoiser graph: a guided request
   as two rows per video, cond and null (also where the model directory has a fused ``--cfg`` graph: so
   guided, plain and frame-conditioned requests all share the same calls and the same few shapes);
3. covers the rows with calls of fixed batch sizes, the buckets (``buckets.cover``: the bucket calls of
   least measured cost), pads each call with copies of a real row, drops the padding rows' outputs, and
   sends each machine its rows (guidance combined by ``steps.combine_guidance``, as ``guided`` does); a
   finished machine's video resolves its future, and it leaves.

Rows count U-Net evaluations: a request of b videos is b rows, 2b with guidance. Before the worker starts,
the constructor warms each bucket's shape and times it (``buckets.warm_up``), which also decides
``batching="auto"``. With batching off the worker runs one request at a time through
``Pipeline.denoiser_for``, exactly the calls of a solo ``Pipeline.__call__`` (fused guidance included).

Per-request results equal a solo ``Pipeline.__call__`` with the same arguments to float32 round-off (the
convolutions see another batch size): the tests measure it. Every call is traced (:class:`CallTrace`: real
and padding rows, seconds in the denoiser and in the batcher around it) for the metrics. Numpy only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import numpy as np

from ..frame_conditioning import generation_inputs
from ..pipeline import Pipeline
from ..sampler_run import SamplerRun
from ..steps import StepRequest, combine_guidance
from .buckets import Warmup, batching_mode, bucket_sizes, cover, pad, warm_up

log = logging.getLogger("vdeploy.runtime.serve")


class QueueFull(Exception):
    """The batcher's queue holds ``max_queue`` requests: try again later (HTTP 429)."""


class Closed(Exception):
    """The batcher is shutting down: it takes no new work, and work it will not finish ends with this."""


class RequestTimeout(TimeoutError):
    """A request ran past its deadline; it left the batch at the step boundary after it."""


class Job(Future):
    """A submitted request: a ``concurrent.futures.Future`` of the video (float32 ``(b, c, f, h, w)`` in
    [0, 1]). ``cancel()`` works until the result is in (the request leaves at the next step boundary).

    Attributes:
        status: ``"queued"``, ``"running"``, ``"done"``, ``"failed"`` or ``"cancelled"``.
        steps, step: the run's step count and the steps done so far.
        rows: U-Net rows per step (b, 2b with guidance).
    """

    def __init__(self, run: SamplerRun, deadline: float | None):
        super().__init__()
        self.run = run
        self.deadline = deadline
        self.status = "queued"
        self.steps = run.steps
        self.step = 0
        self.rows = run.batch_size * (1 if run.guidance == "none" else 2)
        self.submitted = time.monotonic()

    def cancel(self) -> bool:
        done = super().cancel()
        if done:
            self.status = "cancelled"
        return done


@dataclass(frozen=True)
class CallTrace:
    """One denoiser call, as the worker made it (``on_call``'s argument).

    Attributes:
        rows: real U-Net rows (requests' rows; guidance counts two a video).
        padded: padding rows added to reach the bucket (0 with batching off).
        denoise_s: seconds in the denoiser (the backend's run, its casts and copies).
        batcher_s: the batcher's own seconds around it: its share (equal among the boundary's calls) of the
            boundary's stacking, padding, splitting, guidance arithmetic and sampler updates.
        shape_changed: the call's batch differs from the previous call's (a new shape for the backend).
    """

    rows: int
    padded: int
    denoise_s: float
    batcher_s: float
    shape_changed: bool

    @property
    def batch(self) -> int:
        """The call's batch size: the bucket (rows + padding)."""
        return self.rows + self.padded


@dataclass
class _Active:
    job: Job
    request: StepRequest
    denoise: Callable | None = None  # unbatched mode: the solo run's own denoiser
    extra: dict = field(default_factory=dict)


class Batcher:
    """Runs many requests' step machines together on one pipeline (see the module docstring).

    Args:
        pipe: the loaded pipeline; the batcher's worker thread is the only caller of its denoiser.
        max_batch: the most U-Net rows active at once, and the largest bucket (a larger single request runs
            alone, over several calls).
        max_queue: requests waiting to join beyond those active; one more raises :class:`QueueFull`.
        batching: ``"auto"`` (on where warm-up measures the cost per row falling with the batch), ``"on"``,
            ``"off"`` (one request at a time, as a solo ``Pipeline.__call__`` would); True/False: on/off.
        buckets: the batch sizes calls are padded to (``buckets.bucket_sizes``; default 1, 2, 4, ... up to
            ``max_batch``). The backend sees no other batch size while batching is on.
        warm: warm and time the buckets before the worker starts (False: no warm-up; ``auto`` then means
            on, and every bucket is taken to cost its rows).
        on_call: ``on_call(trace)`` with a :class:`CallTrace` after every step boundary, once per call of it.
        on_step: ``on_step(seconds, active)`` after every step boundary's calls (metrics).

    Attributes:
        batching: the decision, a bool; ``mode``: what was asked; ``buckets``: the sizes; ``warmup``: what
            warm-up measured (``buckets.Warmup``: seconds per bucket, the decision's reason, its wall time).
    """

    def __init__(self, pipe: Pipeline, *, max_batch: int = 8, max_queue: int = 64, batching: str | bool = "auto",
                 buckets: str | tuple[int, ...] | None = None, warm: bool = True,
                 on_call: Callable[[CallTrace], None] | None = None,
                 on_step: Callable[[float, int], None] | None = None):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be a non-negative integer, got {max_queue!r}")
        self.pipe = pipe
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.mode = batching_mode(batching)
        self.buckets = bucket_sizes(buckets, max_batch)
        self._on_call = on_call
        self._on_step = on_step
        self._plain = pipe.denoiser()
        self._null = pipe.null_cond
        if warm:
            self.warmup = warm_up(self._warm_call, self.buckets, self.mode)
        else:
            self.warmup = Warmup(self.mode != "off", {s: float(s) for s in self.buckets}, "not warmed")
        self.batching = self.warmup.batching
        self._plans: dict[int, list[int]] = {}
        self._last_batch = 0
        self._cv = threading.Condition()
        self._queue: deque[Job] = deque()
        self._active: list[_Active] = []
        self._closing = False
        self._drain = True
        self._step_seconds = 0.0  # the last boundary's duration, for Retry-After estimates
        self._thread = threading.Thread(target=self._loop, name="vdeploy-batcher", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- the caller's side ----

    def submit(self, *, timeout: float | None = None, **kwargs) -> Job:
        """Queue one request: ``kwargs`` as ``Pipeline.__call__`` takes them (less ``progress``/``callback``).

        Bad arguments raise ValueError here (``Pipeline.prepare`` checks them), before anything is queued.

        Args:
            timeout: seconds from now; past it the request leaves at the next boundary with RequestTimeout.

        Raises:
            QueueFull: ``max_queue`` requests are waiting.
            Closed: the batcher is shutting down.
        """
        for name in ("progress", "callback"):
            if name in kwargs:
                raise ValueError(f"the batcher takes no `{name}`")
        self._admissible()
        run = self.pipe.prepare(**kwargs)
        return self.submit_prepared(run, timeout=timeout)

    def submit_prepared(self, run: SamplerRun, *, timeout: float | None = None) -> Job:
        """Queue a run made by ``pipe.prepare`` (see :meth:`submit`)."""
        job = Job(run, None if timeout is None else time.monotonic() + timeout)
        with self._cv:
            self._admissible()
            self._queue.append(job)
            self._cv.notify()
        return job

    def _admissible(self) -> None:
        if self._closing:
            raise Closed("the server is shutting down")
        if len(self._queue) >= self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")

    @property
    def queue_depth(self) -> int:
        """Requests waiting to join."""
        return len(self._queue)

    @property
    def active(self) -> int:
        """Requests in the running batch."""
        return len(self._active)

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about one request's time through the batch (at least 1)."""
        steps = [a.job.steps - a.job.step for a in list(self._active)] or [1]
        return max(1, round(min(steps) * self._step_seconds))

    def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new work; finish what is queued and running (``drain``) or end it with :class:`Closed`.

        A drain still running after ``timeout`` seconds ends the rest with Closed. Returns when the worker
        has stopped.
        """
        with self._cv:
            self._closing = True
            self._drain = drain
            self._cv.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cv:
                self._drain = False
                self._cv.notify()
            self._thread.join()

    # ---------------------------------------------------------------- the worker ----

    def _loop(self) -> None:
        while True:
            self._drop_finished_or_expired()  # cancelled and expired requests free their rows before admission
            with self._cv:
                while not self._queue and not self._active and not self._closing:
                    self._cv.wait()
                if self._closing and not self._drain:
                    self._abort_all()
                    return
                if self._closing and not self._queue and not self._active:
                    return
                joining = self._admit()
            for job in joining:
                self._start(job)
            if not self._active:
                continue
            start = time.perf_counter()
            calls: list[tuple[int, int, float]] = []  # (rows, padding, denoiser seconds) of this boundary
            try:
                if self.batching:
                    self._batched_step(calls)
                else:
                    self._solo_step(self._active[0], calls)
            except Exception:  # a bug here must not kill the worker: fail the batch, keep serving
                log.exception("batcher step failed")
                for entry in self._active:
                    _fail(entry.job, RuntimeError("the denoiser step failed (see the server log)"))
            seconds = time.perf_counter() - start
            self._step_seconds = seconds
            self._trace(calls, seconds)
            if self._on_step is not None:
                self._on_step(seconds, len(self._active))
            self._active = [a for a in self._active if not a.job.done()]

    def _admit(self) -> list[Job]:
        """Pop the queued jobs that join at this boundary (called under the lock)."""
        rows = sum(a.job.rows for a in self._active)
        joining = []
        while self._queue:
            job = self._queue[0]
            if job.cancelled() or _expired(job):
                self._queue.popleft()
                if not job.cancelled():
                    _fail(job, RequestTimeout("the request timed out while queued"))
                continue
            if self._active or joining:
                if not self.batching or rows + job.rows > self.max_batch:
                    break
            self._queue.popleft()
            joining.append(job)
            rows += job.rows
        return joining

    def _start(self, job: Job) -> None:
        try:
            request = next(job.run.machine)
        except Exception as e:
            _fail(job, e)
            return
        job.status = "running"
        denoise = None
        if not self.batching:
            denoise = self.pipe.denoiser_for(job.run.cond_scale)[0]
        self._active.append(_Active(job, request, denoise))

    def _drop_finished_or_expired(self) -> None:
        keep = []
        for entry in self._active:
            job = entry.job
            if job.cancelled():
                job.run.machine.close()
                continue
            if _expired(job):
                job.run.machine.close()
                _fail(job, RequestTimeout(f"the request timed out after {job.step} of {job.steps} steps"))
                continue
            keep.append(entry)
        self._active = keep

    def _abort_all(self) -> None:
        for job in list(self._queue) + [a.job for a in self._active]:
            job.run.machine.close()
            _fail(job, Closed("the server shut down before this request finished"))
        self._queue.clear()
        self._active = []

    def _warm_call(self, rows: int) -> None:
        """One call of the plain denoiser on ``rows`` rows of noise at a middle timestep (warm-up)."""
        pipe = self.pipe
        x = np.random.default_rng(0).standard_normal((rows, *pipe.shape), dtype=np.float32)
        t = np.full((rows,), len(pipe.betas) // 2, dtype=np.int64)
        cond = None
        if pipe.cond_dim is not None:  # rows of cond_width: a token model's packed rows (runtime.cond_row)
            null = self._null if self._null is not None else np.zeros(pipe.cond_width, np.float32)
            cond = np.broadcast_to(np.asarray(null, np.float32).reshape(1, -1), (rows, pipe.cond_width))
        self._plain(x, t, cond, **(generation_inputs(x) if pipe.frame_conditioned else {}))

    def _solo_step(self, entry: _Active, calls: list) -> None:
        r = entry.request
        start = time.perf_counter()
        eps = entry.denoise(r.x, r.t, r.cond, **(r.inputs or {}))
        calls.append((entry.job.rows, 0, time.perf_counter() - start))
        self._advance(entry, eps)

    def _plan(self, rows: int) -> list[int]:
        """The bucket sizes of the calls that hold ``rows`` rows (cached per row count)."""
        plan = self._plans.get(rows)
        if plan is None:
            plan = self._plans[rows] = cover(rows, self.warmup.seconds)
        return plan

    def _batched_step(self, calls: list) -> None:
        """One boundary: every active request's rows stacked, run as bucket calls, handed back."""
        entries = self._active
        xs, ts, conds, extras = [], [], [], []
        framed = any(entry.request.inputs for entry in entries)
        for entry in entries:
            r = entry.request
            copies = 1 if entry.job.run.guidance == "none" else 2  # the null rows of guidance, after the cond rows
            for copy in range(copies):
                xs.append(r.x)
                ts.append(r.t)
                conds.append(r.cond if copy == 0 else np.broadcast_to(self._null, r.cond.shape))
                if framed:  # a frame-conditioned model's inputs; zeros (generation) for rows without
                    extras.append(r.inputs or generation_inputs(r.x))
        feeds = {"x": _cat(xs), "t": _cat(ts)}
        if conds[0] is not None:
            feeds["cond"] = _cat(conds)
        if framed:
            feeds.update({role: _cat([e[role] for e in extras]) for role in ("frames", "mask")})
        n = feeds["x"].shape[0]
        outs, at = [], 0
        try:
            for size in self._plan(n):
                real = min(size, n - at)
                part = {name: pad(value[at : at + real], size) for name, value in feeds.items()}
                start = time.perf_counter()
                eps = self._plain(part.pop("x"), part.pop("t"), part.pop("cond", None), **part)
                calls.append((real, size - real, time.perf_counter() - start))
                outs.append(eps[:real])
                at += real
        except Exception as e:
            log.exception("denoiser call of %d rows failed", n)
            for entry in entries:
                entry.job.run.machine.close()
                _fail(entry.job, RuntimeError(f"the denoiser failed: {e}"))
            return
        eps = _cat(outs)
        at = 0
        for entry in entries:
            b, run = entry.request.x.shape[0], entry.job.run
            if run.guidance != "none":
                cond_eps, null_eps = eps[at : at + b], eps[at + b : at + 2 * b]
                out = combine_guidance(cond_eps, null_eps, run.cond_scale)
                at += 2 * b
            else:
                out = eps[at : at + b]
                at += b
            self._advance(entry, out)

    def _trace(self, calls: list[tuple[int, int, float]], seconds: float) -> None:
        """``on_call`` for each call of a boundary that took ``seconds``; the rest of it is the batcher's."""
        if not calls:
            return
        around = max(0.0, seconds - sum(c[2] for c in calls)) / len(calls)
        for rows, padding, denoise_s in calls:
            batch = rows + padding
            changed, self._last_batch = batch != self._last_batch, batch
            if self._on_call is not None:
                self._on_call(CallTrace(rows, padding, denoise_s, around, changed))

    def _advance(self, entry: _Active, eps: np.ndarray) -> None:
        job = entry.job
        try:
            entry.request = job.run.machine.send(eps)
            job.step += 1
        except StopIteration as done:
            job.step += 1
            video = job.run.finish(done.value)
            try:
                job.set_result(video)
                job.status = "done"
            except InvalidStateError:  # cancelled meanwhile
                pass
        except Exception as e:
            _fail(job, e)


def _expired(job: Job) -> bool:
    return job.deadline is not None and time.monotonic() > job.deadline


def _fail(job: Job, error: BaseException) -> None:
    try:
        job.set_exception(error)
        job.status = "failed"
    except InvalidStateError:  # cancelled or finished meanwhile
        pass


def _cat(arrays: list) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
