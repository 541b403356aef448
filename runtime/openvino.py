"""The OpenVINO backend: the exported ONNX graph compiled for the CPU, once per input shape.

OpenVINO compiles a graph reshaped to static shapes into faster code than a dynamic one, so the backend
keeps the ONNX graph as read and compiles a copy reshaped to the concrete shapes of each call (batch,
height, width...) the first time they are seen; compiled models are kept in memory per shape. A compiled
model serves several threads, an ``InferRequest`` does not: each thread gets its own request per shape.

Precision: OpenVINO on a CPU with AVX512_BF16/AMX silently runs bfloat16 unless told otherwise, so the
backend always sets ``INFERENCE_PRECISION_HINT``: ``f32`` by default (float32 parity with onnxruntime),
``bf16`` only when asked (``precision="bf16"``) and the CPU lists BF16 among its capabilities.

No on-disk cache of compiled blobs: compiling the small preset takes a fraction of a second per shape.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .manifest import TensorSpec
from .ort import cast
from .platform import BackendUnavailable, physical_cores

log = logging.getLogger("vdeploy.runtime")

PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}  # BackendOptions.precision -> INFERENCE_PRECISION_HINT


def import_openvino():
    """``openvino``, or BackendUnavailable naming the extra to install."""
    try:
        import openvino
    except ImportError as e:
        raise BackendUnavailable(f"openvino is not installed: pip install 'vdeploy[openvino]' ({e})") from None
    return openvino


def cpu_has_bf16(core) -> bool:
    """Whether OpenVINO's CPU plugin runs bfloat16 natively here (AVX512_BF16 or AMX)."""
    try:
        return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except RuntimeError:
        return False


class OpenVINOBackend:
    """An ONNX graph compiled by OpenVINO for the CPU with static shapes, one compiled model per shape.

    Args:
        path: the ``.onnx`` file (fp32 graph; bf16 is OpenVINO's own inference precision).
        precision: ``"fp32"`` (``INFERENCE_PRECISION_HINT=f32``) or ``"bf16"`` (where the CPU has it).
        threads: ``INFERENCE_NUM_THREADS`` (default: physical cores).

    Raises:
        BackendUnavailable: openvino is not installed, or bf16 was asked on a CPU without it.
        ValueError: an unknown precision.
    """

    def __init__(self, path: str | Path, *, precision: str = "fp32", threads: int | None = None):
        if precision not in PRECISION_HINTS:
            raise ValueError(f"OpenVINO precision must be one of {', '.join(PRECISION_HINTS)}, got {precision!r}")
        ov = import_openvino()
        self._ov = ov
        self.path = Path(path)
        self.kind = "openvino"
        self.name = "openvino-cpu"
        self.precision = precision
        self._core = ov.Core()
        if precision == "bf16" and not cpu_has_bf16(self._core):
            caps = ", ".join(self._core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
            raise BackendUnavailable(
                f"precision bf16: this CPU ({self._core.get_property('CPU', 'FULL_DEVICE_NAME')}) has no native "
                f"bfloat16 in OpenVINO (capabilities: {caps}); use precision='fp32'"
            )
        self.threads = threads or physical_cores()
        self.config = {
            "INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision],
            "INFERENCE_NUM_THREADS": self.threads,
            "NUM_STREAMS": 1,  # one call at a time uses every thread (latency); threads share the stream
            # unpinned threads, as onnxruntime's: a pinned thread cannot move off a core another process
            # (the numpy step, other pipelines) is busy on, and every barrier of the call waits for it
            "ENABLE_CPU_PINNING": False,
        }
        try:
            self._model = self._core.read_model(str(self.path))
        except RuntimeError as e:
            raise BackendUnavailable(f"OpenVINO {ov.__version__} cannot read {self.path}: {e}") from None
        self.inputs = [self._spec(port) for port in self._model.inputs]
        self.outputs = [self._spec(port) for port in self._model.outputs]
        self._compiled: dict[tuple, object] = {}
        self._compile_lock = threading.Lock()
        self._local = threading.local()
        self.compiles = 0  # how many shapes were compiled (the in-memory cache's misses)

    @staticmethod
    def _spec(port) -> TensorSpec:
        shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
        return TensorSpec(port.get_any_name(), np.dtype(port.get_element_type().to_dtype()).name, shape)

    def compiled_for(self, key: tuple):
        """The compiled model for ``key``, the input shapes in graph order (compiled under a lock on the first call)."""
        key = tuple(tuple(shape) for shape in key)
        compiled = self._compiled.get(key)
        if compiled is not None:
            return compiled
        with self._compile_lock:
            compiled = self._compiled.get(key)
            if compiled is None:
                model = self._model.clone()
                model.reshape({spec.name: self._ov.PartialShape(list(shape)) for spec, shape in zip(self.inputs, key)})
                compiled = self._core.compile_model(model, "CPU", self.config)
                self.compiles += 1
                log.info("OpenVINO: compiled %s for %s (%s)", self.path.name,
                         ", ".join(f"{s.name} {list(k)}" for s, k in zip(self.inputs, key)),
                         PRECISION_HINTS[self.precision])
                self._compiled[key] = compiled
        return compiled

    def _request(self, key: tuple):
        """This thread's infer request for the shape ``key`` (an InferRequest is not thread-safe)."""
        requests = getattr(self._local, "requests", None)
        if requests is None:
            requests = self._local.requests = {}
        request = requests.get(key)
        if request is None:
            request = requests[key] = self.compiled_for(key).create_infer_request()
        return request

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run the graph on ``feeds`` (cast to the declared dtypes); thread-safe."""
        feeds = {spec.name: cast(spec, feeds[spec.name]) for spec in self.inputs}
        request = self._request(tuple(feeds[spec.name].shape for spec in self.inputs))
        request.infer(feeds)
        return [np.array(request.get_output_tensor(i).data, dtype=spec.dtype, copy=True)
                for i, spec in enumerate(self.outputs)]

    def close(self) -> None:
        """Drop the compiled models (their memory goes once no thread's request holds them)."""
        with self._compile_lock:
            self._compiled.clear()
        self._local = threading.local()
