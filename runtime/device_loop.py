"""The device side of a sampling run: the latent, the samplers' history and the noise stay in GPU memory.

The samplers (``vdeploy.runtime.samplers``, ``steps``, ``frame_conditioning``) compute in the array namespace
of the starting sample (``steps.array_namespace``), so the same step machines run on device arrays. This
module holds what a device run adds, torch-free (CuPy is the expected device library, through the array API
standard and ``array_api_compat``):

* ``namespace(x)``: the array-API namespace of an array (``array_api_compat``; numpy, CuPy, array-api-strict).
* ``DeviceDenoiser``: a denoiser that takes and returns device arrays. It writes its inputs into an
  ``OrtBackend``'s fixed device buffers for that shape (``OrtBackend.slot``: IO binding, and with
  ``cuda_graph=True`` one CUDA graph per shape), runs without a host copy (``OrtBackend.run_bound``) and
  returns a device copy of the output buffer. How a device address becomes an array is a table entry
  (``BUFFER_VIEWS``: ``cupy``; ``numpy`` for host buffers, what the CPU tests use).
* ``NoisePrefetch``: per-step noise from the same numpy generator as the host path (the same numbers),
  drawn one step ahead on a thread and uploaded, so the draw overlaps the denoiser call.
* ``sample``: a ``Pipeline`` run on the device: the run the Pipeline prepares (the same plan, starting noise
  and generator), its step machine started from the uploaded noise, driven by a ``DeviceDenoiser``; one copy
  to the host at the end.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np

from .samplers import sampler_spec
from .steps import drive


def namespace(*arrays):
    """The array-API namespace of ``arrays`` (``array_api_compat.array_namespace``)."""
    from array_api_compat import array_namespace

    return array_namespace(*arrays)


def _host_view(pointer: int, shape: tuple, dtype) -> np.ndarray:
    """A numpy array over host memory at ``pointer`` (for buffers that live in host memory)."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape)) if shape else 1
    raw = (ctypes.c_byte * (count * dtype.itemsize)).from_address(pointer)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


def _cupy_view(pointer: int, shape: tuple, dtype):
    """A CuPy array over device memory at ``pointer``, owned elsewhere (an OrtValue's buffer)."""
    import cupy

    dtype = np.dtype(dtype)
    nbytes = (int(np.prod(shape)) if shape else 1) * dtype.itemsize
    memory = cupy.cuda.UnownedMemory(pointer, nbytes, owner=None)
    return cupy.ndarray(shape, dtype=dtype, memptr=cupy.cuda.MemoryPointer(memory, 0))


def _cupy_sync() -> None:
    import cupy

    cupy.cuda.Device().synchronize()


# how a buffer's address becomes an array of a library, and how to wait for that library's queued work
BUFFER_VIEWS: dict[str, tuple[Callable, Callable[[], None]]] = {
    "cupy": (_cupy_view, _cupy_sync),
    "numpy": (_host_view, lambda: None),
}


class DeviceDenoiser:
    """``denoise(x, t, cond, **inputs) -> eps`` on device arrays, through an ``OrtBackend``'s bound buffers.

    Args:
        backend: an ``OrtBackend`` (CUDA; ``cuda_graph=True`` replays a CUDA graph per shape).
        names: the graph's input name by role (``{"x": ..., "t": ..., "cond": ...}``) and ``"out"``, its
            output's name.
        library: a key of ``BUFFER_VIEWS`` (``"cupy"`` on a GPU).

    Each call copies the inputs device-to-device into the fixed buffers (``buffer[...] = value``, which also
    casts), waits for that copy (``synchronize``: onnxruntime runs on its own stream), runs, and returns a copy
    of the output buffer (the next call overwrites it). Calls of one shape are serialized by that shape's lock.
    A graph input of a role in ``names`` that a call does not give (a frame-conditioned graph's ``frames`` and
    ``mask`` in plain generation) is zero.
    """

    def __init__(self, backend, names: Mapping[str, str], library: str = "cupy"):
        self.backend, self.names = backend, dict(names)
        self._view, self._sync = BUFFER_VIEWS[library]
        self._specs = {spec.name: spec for spec in [*backend.inputs, *backend.outputs]}
        self._views: dict[int, dict] = {}
        self._lock = threading.Lock()

    def _buffers(self, slot) -> dict:
        with self._lock:
            views = self._views.get(id(slot))
            if views is None:
                pointers = slot.pointers()
                views = {name: self._view(pointers[name], tuple(value.shape()) if callable(value.shape)
                                          else tuple(value.shape), self._specs[name].dtype)
                         for name, value in {**slot.inputs, **slot.outputs}.items()}
                self._views[id(slot)] = views
            return views

    def __call__(self, x, t, cond=None, **inputs):
        feeds = {self.names["x"]: x, self.names["t"]: t}
        if cond is not None:
            feeds[self.names["cond"]] = cond
        for role, value in inputs.items():
            feeds[self.names[role]] = value
        missing = {}  # plain generation on a frame-conditioned graph: zero frames and mask
        if "frames" in self.names and self.names["frames"] not in feeds:
            shape = tuple(x.shape)
            missing = {self.names["frames"]: shape, self.names["mask"]: shape[:1] + shape[2:3]}
        shapes = {name: tuple(value.shape) for name, value in feeds.items()}
        slot = self.backend.slot({**shapes, **missing})
        views = self._buffers(slot)
        with slot.lock:
            for name, value in feeds.items():
                views[name][...] = value
            for name in missing:
                views[name][...] = 0
            self._sync()
            self.backend.run_bound(slot)
            out = views[self.names["out"]]
            return out.copy()


class NoisePrefetch:
    """``draw(i)``: step ``i``'s noise, the same numbers as ``rng.standard_normal(shape, dtype=float32)`` in
    order, passed through ``upload`` (numpy -> device array); step ``i + 1``'s is drawn on a thread meanwhile.
    Nothing is drawn before the first ask (a run that draws no noise leaves the generator alone) and, with
    ``steps``, nothing past step ``steps - 1``, so the generator ends where the host path's does."""

    def __init__(self, rng: np.random.Generator, shape: tuple, upload: Callable[[np.ndarray], object],
                 steps: int | None = None):
        self._rng, self._shape, self._upload, self._steps = rng, tuple(shape), upload, steps
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._i = 0
        self._next = None

    def _draw(self):
        return self._upload(self._rng.standard_normal(self._shape, dtype=np.float32))

    def __call__(self, i: int):
        if i != self._i or (self._steps is not None and i >= self._steps):
            raise ValueError(f"noise is drawn in step order: asked for step {i}, next is {self._i}"
                             + (f" of {self._steps}" if self._steps is not None else ""))
        value = self._next.result() if self._next is not None else self._draw()
        self._i += 1
        more = self._steps is None or self._i < self._steps
        self._next = self._pool.submit(self._draw) if more else None
        return value

    def __iter__(self):
        """The noise of every step from the next one on, in order (what a sampler's ``noise`` argument takes)."""
        i = self._i
        while self._steps is None or i < self._steps:
            yield self(i)
            i += 1

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def graph_names(graph) -> dict[str, str]:
    """A denoiser graph's input names by role (``x``, ``t``, and ``cond``, ``frames``, ``mask`` where it has them)
    and ``"out"``, its output's name: what ``DeviceDenoiser`` binds.

    Raises:
        ValueError: the graph has inputs of other roles (a text-token model's ``text_tokens``: not fed on the
            device yet).
    """
    roles = ("x", "t", "cond", "frames", "mask")
    other = [spec.name for spec in graph.inputs if getattr(spec, "role", None) not in (None, *roles)]
    if other:
        raise ValueError(f"the device loop feeds the inputs {', '.join(roles)}; this graph also has "
                         f"{', '.join(other)}: run it on the host loop (Pipeline)")
    names = {role: graph.input(role).name for role in roles if graph.input(role) is not None}
    names["out"] = graph.outputs[0].name
    return names


def sample(pipe, *, xp, denoise=None, library: str = "cupy", prefetch: bool = True, seed: int | None = None,
           noise=None, step_noise=None, frames_noise=None, **kwargs) -> np.ndarray:
    """``pipe(seed=seed, ...)`` with the sampling loop on the device: the same video as the host run.

    The run is the one ``pipe.prepare`` makes from these arguments (same plan, same starting noise from ``seed``,
    the same generator for the per-step noise); its step machine is started from that noise uploaded to
    ``xp`` and computes there (latent, multistep history, clipping, guidance, frame conditioning). Per-step
    noise comes from that generator, drawn a step ahead on a thread and uploaded (``NoisePrefetch``; with known
    frames, whose draws share the generator, it is drawn when needed). The video is copied to the host once.

    Args:
        pipe: a ``Pipeline``; ``denoise`` None: a ``DeviceDenoiser`` over ``pipe.backend`` (an ``OrtBackend``)
            with ``library``'s buffer views.
        xp: the device namespace (``array_api_compat.array_namespace`` of a CuPy array; array-api-strict in tests).
        denoise: a denoiser on ``xp`` arrays instead (guidance is added around it as the Pipeline does).
        prefetch: draw per-step noise a step ahead on a thread.
        seed, noise, step_noise, frames_noise, **kwargs: ``Pipeline.prepare``'s arguments (``callback`` gets device
            arrays). ``step_noise`` may hold device arrays: noise drawn on the device (e.g. from
            ``cupy.random.default_rng``) instead of the host generator, an explicit choice that gives other numbers
            than ``seed``'s.

    Guidance always calls the plain graph twice (``steps.guided``), also where the model directory has the fused
    ``--cfg`` graph (the host run's fused call agrees with two calls to float32 round-off, not bit for bit).

    Raises:
        ValueError: what ``Pipeline.prepare`` refuses.
    """
    from .sampler_run import finish
    from .steps import guided, to_host

    callback = kwargs.pop("callback", None)
    run = pipe.prepare(seed=seed, noise=noise, step_noise=step_noise, frames_noise=frames_noise, **kwargs)
    # the host run's starting noise and its generator (past that draw): the host machine is never driven
    x_T, rng = np.asarray(run.noise, dtype=np.float32), run.rng
    shape = tuple(x_T.shape)
    if denoise is None:
        denoise = DeviceDenoiser(pipe.backend, graph_names(pipe.graph), library=library)
    if run.guidance != "none":
        denoise = guided(denoise, pipe.null_cond, run.cond_scale)
    plan = run.plan
    if plan.kwargs.get("cond") is not None:
        plan = replace(plan, kwargs={**plan.kwargs, "cond": xp.asarray(plan.kwargs["cond"])})
    draws = sampler_spec(plan.sampler).draws_noise  # (ddim at eta 0 asks for none: nothing is drawn)
    prefetched = None
    if draws and step_noise is None and prefetch and plan.known_x0 is None:
        prefetched = step_noise = NoisePrefetch(rng, shape, xp.asarray, steps=plan.steps)
    try:
        machine = plan.machine(xp.asarray(x_T), pipe.betas, noise=step_noise, rng=rng, known_noise=frames_noise,
                               callback=callback)
        x0 = drive(machine, denoise)
    finally:
        if prefetched is not None:
            prefetched.close()
    return finish(to_host(x0))
