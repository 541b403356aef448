"""The device side of a sampling run: the latent stays in GPU memory between denoiser calls.

Three pieces, torch-free (CuPy is the expected device library, through the array API standard):

* ``namespace(x)``: the array-API namespace of an array (``array_api_compat``; numpy, CuPy, array-api-strict).
* ``DeviceDenoiser``: a denoiser that takes and returns device arrays. It writes its inputs into an
  ``OrtBackend``'s fixed device buffers for that shape (``OrtBackend.slot``: IO binding, and with
  ``cuda_graph=True`` one CUDA graph per shape), runs without a host copy (``OrtBackend.run_bound``) and
  returns a device copy of the output buffer. How a device address becomes an array is a table entry
  (``BUFFER_VIEWS``: ``cupy``; ``numpy`` for host buffers, what the CPU tests use).
* ``NoisePrefetch``: per-step noise from the same numpy generator as the host path (the same numbers),
  drawn one step ahead on a thread and uploaded, so the draw overlaps the denoiser call.

What is not here yet: the samplers themselves still compute in numpy; running their arithmetic on the
namespace of ``x`` is the remaining step of the device-resident loop (issue 20).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np


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

    Each call copies the inputs device-to-device into the fixed buffers (``buffer[...] = value``), waits for
    that copy (``synchronize``: onnxruntime runs on its own stream), runs, and returns a copy of the output
    buffer (the next call overwrites it). Calls of one shape are serialized by that shape's lock.
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
        slot = self.backend.slot({name: tuple(value.shape) for name, value in feeds.items()})
        views = self._buffers(slot)
        with slot.lock:
            for name, value in feeds.items():
                buffer = views[name]
                buffer[...] = value if value.dtype == buffer.dtype else value.astype(buffer.dtype)
            self._sync()
            self.backend.run_bound(slot)
            out = views[self.names["out"]]
            return out.copy()


class NoisePrefetch:
    """``draw(i)``: step ``i``'s noise, the same numbers as ``rng.standard_normal(shape, dtype=float32)`` in
    order, passed through ``upload`` (numpy -> device array); step ``i + 1``'s is drawn on a thread meanwhile.
    With ``steps``, nothing is drawn past step ``steps - 1``, so the generator ends where the host path's does."""

    def __init__(self, rng: np.random.Generator, shape: tuple, upload: Callable[[np.ndarray], object],
                 steps: int | None = None):
        self._rng, self._shape, self._upload, self._steps = rng, tuple(shape), upload, steps
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._i = 0
        self._next = self._pool.submit(self._draw) if steps is None or steps > 0 else None

    def _draw(self):
        return self._upload(self._rng.standard_normal(self._shape, dtype=np.float32))

    def __call__(self, i: int):
        if i != self._i or self._next is None:
            raise ValueError(f"noise is drawn in step order: asked for step {i}, next is {self._i}"
                             + (f" of {self._steps}" if self._steps is not None else ""))
        value = self._next.result()
        self._i += 1
        more = self._steps is None or self._i < self._steps
        self._next = self._pool.submit(self._draw) if more else None
        return value

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
