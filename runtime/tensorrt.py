"""The native TensorRT backend: a serialized engine (``.plan``) run with TensorRT 10's name-based API.

Written against the documented TensorRT 10 and cuda-python 12 APIs; not run on the CPU-only build
machines (``tensorrt`` cannot be installed there). Tests exercise it against fakes of both modules.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .manifest import TensorSpec
from .ort import AUTO_GRAPH_SHAPES, cast
from .platform import BackendUnavailable, import_tensorrt

log = logging.getLogger("vdeploy.runtime")


class _CaptureFailed(RuntimeError):
    """A CUDA graph of a shape could not be captured (its buffers are freed)."""


class TensorRTBackend:
    """A serialized TensorRT engine (``.plan``) run with the TensorRT 10 name-based API.

    Input shapes are set per call (``set_input_shape``), device buffers are reused while shapes stay
    the same, and inference is ``execute_async_v3`` on a CUDA stream. An execution context is not
    thread-safe, so each thread gets its own context, stream and buffers.

    With ``cuda_graph``, each input shape gets its own device buffers and a CUDA graph captured from one
    ``execute_async_v3`` after a warm-up enqueue (TensorRT's documented recipe: the first enqueue after a
    shape change does deferred updates that must not be captured); later calls of that shape copy their
    inputs in, ``cudaGraphLaunch`` the graph and copy the outputs back.

    Args:
        path: the ``.plan`` file, built for this GPU and this TensorRT version.
        device_id: the CUDA device.
        cuda_graph: capture and replay a CUDA graph per input shape. None (default, auto): for the first
            ``AUTO_GRAPH_SHAPES`` shapes of a thread's context, later shapes run plainly; True: every shape;
            False: never.
    """

    def __init__(self, path: str | Path, *, device_id: int = 0, cuda_graph: bool | None = None):
        trt, cudart = import_tensorrt()
        self._trt, self._cudart = trt, cudart
        self.path = Path(path)
        self.kind = "tensorrt"
        self.name = "tensorrt"
        self._device_id = device_id
        self.cuda_graph = cuda_graph is not False
        self.graph_shapes = None if cuda_graph else AUTO_GRAPH_SHAPES  # None: a graph for every shape
        self._check(cudart.cudaSetDevice(device_id))
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise BackendUnavailable(
                f"TensorRT {trt.__version__} could not load {self.path}: built for another GPU or TensorRT "
                "version; rebuild it with `vdeploy export --tensorrt`"
            )
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        specs = {
            name: TensorSpec(
                name,
                np.dtype(trt.nptype(self.engine.get_tensor_dtype(name))).name,
                tuple(d if d >= 0 else None for d in self.engine.get_tensor_shape(name)),
            )
            for name in names
        }
        is_input = {name: self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT for name in names}
        self.inputs = [specs[n] for n in names if is_input[n]]
        self.outputs = [specs[n] for n in names if not is_input[n]]
        self._local = threading.local()
        self._all_states: list[dict] = []
        self._states_lock = threading.Lock()

    def _check(self, result):
        """cuda-python calls return ``(err, *values)``: raise on an error, return the values."""
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self._cudart.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA error {err} in the TensorRT backend")
        return values[0] if len(values) == 1 else values

    def _state(self) -> dict:
        state = getattr(self._local, "state", None)
        if state is None:
            self._check(self._cudart.cudaSetDevice(self._device_id))  # the current device is per thread
            context = self.engine.create_execution_context()
            if context is None:
                raise RuntimeError(f"TensorRT could not create an execution context for {self.path}")
            state = {"context": context, "stream": self._check(self._cudart.cudaStreamCreate()), "buffers": {},
                     "graphs": {}}
            self._local.state = state
            with self._states_lock:
                self._all_states.append(state)
        return state

    def _buffer(self, state: dict, name: str, nbytes: int) -> int:
        ptr, size = state["buffers"].get(name, (None, 0))
        if size < nbytes:
            if ptr is not None:
                self._check(self._cudart.cudaFree(ptr))
            ptr = self._check(self._cudart.cudaMalloc(max(nbytes, 1)))
            state["buffers"][name] = (ptr, nbytes)
        return ptr

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run the engine on ``feeds`` (cast to the engine's dtypes); thread-safe (a context per thread)."""
        cudart = self._cudart
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        state = self._state()
        context, stream = state["context"], state["stream"]
        host = {spec.name: cast(spec, feeds[spec.name]) for spec in self.inputs}
        if self.cuda_graph and not state.get("no_graphs"):
            key = tuple(host[spec.name].shape for spec in self.inputs)
            if key in state["graphs"] or self.graph_shapes is None or len(state["graphs"]) < self.graph_shapes:
                try:
                    return self._run_graph(state, host)
                except _CaptureFailed as e:
                    if self.graph_shapes is None:  # asked for explicitly
                        raise RuntimeError(f"TensorRT: cannot capture a CUDA graph of {self.path}: {e}") from None
                    log.info("TensorRT: no CUDA graph for %s (%s); running without", self.path, e)
                    state["no_graphs"] = True
        for spec in self.inputs:
            value = host[spec.name]
            if not context.set_input_shape(spec.name, value.shape):
                profile = self.engine.get_tensor_profile_shape(spec.name, 0)
                raise ValueError(
                    f"input {spec.name} of shape {value.shape} is outside the engine's profile "
                    f"(min, opt, max) = {tuple(tuple(p) for p in profile)}"
                )
            ptr = self._buffer(state, spec.name, value.nbytes)
            self._check(cudart.cudaMemcpyAsync(ptr, value.ctypes.data, value.nbytes, h2d, stream))
            context.set_tensor_address(spec.name, ptr)
        results = []
        for spec in self.outputs:
            out = np.empty(tuple(context.get_tensor_shape(spec.name)), dtype=spec.dtype)
            context.set_tensor_address(spec.name, self._buffer(state, spec.name, out.nbytes))
            results.append(out)
        if not context.execute_async_v3(int(stream)):  # the cudaStream_t handle as an integer
            raise RuntimeError(f"TensorRT execution of {self.path} failed")
        for spec, out in zip(self.outputs, results):
            ptr = state["buffers"][spec.name][0]
            self._check(cudart.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes, d2h, stream))
        self._check(cudart.cudaStreamSynchronize(stream))
        return results

    def _set_shapes(self, context, host: Mapping[str, np.ndarray]) -> None:
        for spec in self.inputs:
            if not context.set_input_shape(spec.name, host[spec.name].shape):
                profile = self.engine.get_tensor_profile_shape(spec.name, 0)
                raise ValueError(
                    f"input {spec.name} of shape {host[spec.name].shape} is outside the engine's profile "
                    f"(min, opt, max) = {tuple(tuple(p) for p in profile)}"
                )

    def _capture(self, state: dict, host: Mapping[str, np.ndarray]) -> dict:
        """One shape's fixed buffers and its instantiated CUDA graph (captured on this thread's stream)."""
        cudart, context, stream = self._cudart, state["context"], state["stream"]
        self._set_shapes(context, host)
        shapes = {spec.name: tuple(host[spec.name].shape) for spec in self.inputs}
        shapes.update({spec.name: tuple(context.get_tensor_shape(spec.name)) for spec in self.outputs})
        buffers = {}
        for spec in [*self.inputs, *self.outputs]:
            nbytes = int(np.prod(shapes[spec.name])) * np.dtype(spec.dtype).itemsize
            buffers[spec.name] = self._check(cudart.cudaMalloc(max(nbytes, 1)))
            context.set_tensor_address(spec.name, buffers[spec.name])
        if not context.execute_async_v3(int(stream)):  # warm-up: TensorRT's deferred per-shape updates
            raise RuntimeError(f"TensorRT execution of {self.path} failed")
        self._check(cudart.cudaStreamSynchronize(stream))
        graph = None
        try:
            self._check(cudart.cudaStreamBeginCapture(stream,
                                                      cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
            ok = context.execute_async_v3(int(stream))
            graph = self._check(cudart.cudaStreamEndCapture(stream))
            if not ok:
                raise RuntimeError("execute_async_v3 failed while capturing")
            graph_exec = self._check(cudart.cudaGraphInstantiate(graph, 0))
        except Exception as e:  # noqa: BLE001 - a graph that cannot be captured: the caller decides
            if graph is not None:
                cudart.cudaGraphDestroy(graph)
            for ptr in buffers.values():
                cudart.cudaFree(ptr)
            raise _CaptureFailed(f"{type(e).__name__}: {e}") from None
        return {"buffers": buffers, "shapes": shapes, "graph": graph, "exec": graph_exec}

    def _run_graph(self, state: dict, host: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        cudart, stream = self._cudart, state["stream"]
        key = tuple(host[spec.name].shape for spec in self.inputs)
        slot = state["graphs"].get(key)
        if slot is None:
            slot = state["graphs"][key] = self._capture(state, host)
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for spec in self.inputs:
            value = host[spec.name]
            self._check(cudart.cudaMemcpyAsync(slot["buffers"][spec.name], value.ctypes.data, value.nbytes, h2d,
                                               stream))
        self._check(cudart.cudaGraphLaunch(slot["exec"], stream))
        results = []
        for spec in self.outputs:
            out = np.empty(slot["shapes"][spec.name], dtype=spec.dtype)
            self._check(cudart.cudaMemcpyAsync(out.ctypes.data, slot["buffers"][spec.name], out.nbytes, d2h, stream))
            results.append(out)
        self._check(cudart.cudaStreamSynchronize(stream))
        return results

    def close(self) -> None:
        """Free every thread's device buffers, CUDA graphs and streams."""
        with self._states_lock:
            for state in self._all_states:
                for slot in state.get("graphs", {}).values():
                    self._cudart.cudaGraphExecDestroy(slot["exec"])
                    self._cudart.cudaGraphDestroy(slot["graph"])
                    for ptr in slot["buffers"].values():
                        self._cudart.cudaFree(ptr)
                for ptr, _ in state["buffers"].values():
                    self._cudart.cudaFree(ptr)
                self._cudart.cudaStreamDestroy(state["stream"])
            self._all_states.clear()


