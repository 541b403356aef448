"""The OpenVINO backend: the exported ONNX graph compiled for the CPU, once per input shape.

OpenVINO compiles a graph reshaped to static shapes into faster code than a dynamic one, so the backend
keeps the ONNX graph as read and compiles a copy reshaped to the concrete shapes of each call (batch,
height, width...) the first time they are seen; compiled models are kept in memory per shape. A compiled
model serves several threads, an ``InferRequest`` does not: each thread gets its own request per shape.

Precision: OpenVINO on a CPU with AVX512_BF16/AMX silently runs bfloat16 unless told otherwise, so the
backend always sets ``INFERENCE_PRECISION_HINT``: ``f32`` by default (float32 parity with onnxruntime),
``bf16`` only when asked (``precision="bf16"``) and the CPU lists BF16 among its capabilities.

Compiled models are also cached on disk (``cache=True``, the default): ``compiled.export_model()`` into
``cache_dir()/openvino/<precision>-<key>/`` (a folder per OpenVINO version, CPU and precision), one blob
per graph sha256 and input shapes, with the blob's sha256 beside it. A hit is checked against that sha256
before ``import_model``; a damaged or unreadable blob is compiled afresh and rewritten. (Not OpenVINO's own
``CACHE_DIR``: measured with 2026.4, a blob with three flipped bytes was still imported from there.)
Importing the tiny test model takes about 1 s against 3-4 s to compile it here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .atomic import write_bytes
from .digests import read_with_sha256
from .manifest import TensorSpec, sha256_file
from .ort import cast
from .platform import BackendUnavailable, cache_dir, cpu_fingerprint, physical_cores

log = logging.getLogger("vdeploy.runtime")

PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}  # BackendOptions.precision -> INFERENCE_PRECISION_HINT


def import_openvino():
    """``openvino``, or BackendUnavailable naming the extra to install."""
    try:
        import openvino
    except ImportError as e:
        raise BackendUnavailable(f"openvino is not installed: pip install 'vdeploy[openvino]' ({e})") from None
    return openvino


_CORE = None
_CORE_LOCK = threading.Lock()


def shared_core():
    """The process's one ``openvino.Core``: created on first use, never released; every backend uses it.

    Why one, kept for good: OpenVINO's CPU plugin (one per ``Core``, created by its first CPU call) gives the
    thread that creates it a new signal stack (``sigaltstack``, sized for AMX state) and, when it is
    destroyed, unmaps that stack and puts back the one it found, on whatever thread destroys it. A plugin
    destroyed on another thread, or two plugins destroyed in the order they were created, leave a thread's
    signal stack on unmapped memory; the next signal with a Python handler (CPython installs every handler
    with ``SA_ONSTACK``) that reaches that thread kills the process with SIGSEGV (si_code SI_KERNEL).
    That was the SIGSEGV of issue 23: ``benchmarks/openvino_altstack.py`` reproduces it with OpenVINO
    alone, and ``tests/test_runtime_openvino.py`` checks that vdeploy's backends no longer leave a stack so.
    A plugin that is never destroyed never unmaps its stack, and a Core is thread-safe.

    Raises:
        BackendUnavailable: openvino is not installed.
    """
    global _CORE
    with _CORE_LOCK:
        if _CORE is None:
            _CORE = import_openvino().Core()
        return _CORE


def cpu_has_bf16(core=None) -> bool:
    """Whether OpenVINO's CPU plugin runs bfloat16 natively here (AVX512_BF16 or AMX); ``core``: the process's
    shared one by default."""
    core = shared_core() if core is None else core
    try:
        return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except RuntimeError:
        return False


def compiled_cache_dir(version: str, precision: str) -> Path:
    """The folder of compiled blobs for this OpenVINO version, CPU and precision."""
    key = hashlib.sha256(f"{version}|{cpu_fingerprint()}|{precision}".encode()).hexdigest()[:16]
    return cache_dir() / "openvino" / f"{precision}-{key}"


class OpenVINOBackend:
    """An ONNX graph compiled by OpenVINO for the CPU with static shapes, one compiled model per shape.

    Args:
        path: the ``.onnx`` file (fp32 graph; bf16 is OpenVINO's own inference precision).
        precision: ``"fp32"`` (``INFERENCE_PRECISION_HINT=f32``) or ``"bf16"`` (where the CPU has it).
        threads: ``INFERENCE_NUM_THREADS`` (default: physical cores).
        cache: keep compiled models in ``compiled_cache_dir`` for the next start.
        onnx_sha256: the graph's sha256 (part of every blob's key; computed when None and ``cache``).
        specs: the graph's ``(inputs, outputs)`` as the (verified) manifest lists them: the ONNX graph is then
            read only when a shape must be compiled, so a start whose compiled models are all in the disk
            cache never parses it (it is the slowest part of a cached start); None: read it now.

    Raises:
        BackendUnavailable: openvino is not installed, or bf16 was asked on a CPU without it.
        ValueError: an unknown precision.
    """

    def __init__(self, path: str | Path, *, precision: str = "fp32", threads: int | None = None, cache: bool = True,
                 onnx_sha256: str | None = None, specs: tuple | None = None):
        if precision not in PRECISION_HINTS:
            raise ValueError(f"OpenVINO precision must be one of {', '.join(PRECISION_HINTS)}, got {precision!r}")
        ov = import_openvino()
        self._ov = ov
        self.path = Path(path)
        self.kind = "openvino"
        self.name = "openvino-cpu"
        self.precision = precision
        self._core = shared_core()  # never a Core of its own (shared_core says why)
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
        self.cache_folder = compiled_cache_dir(ov.__version__, precision) if cache else None
        self._onnx_sha256 = (onnx_sha256 or sha256_file(self.path)) if cache else None
        self._model = None
        if specs is None or not self._onnx_sha256:
            model = self._read()
            self.inputs = [self._spec(port) for port in model.inputs]
            self.outputs = [self._spec(port) for port in model.outputs]
        else:  # symbolic dims as None, as OpenVINO reports them
            self.inputs, self.outputs = ([TensorSpec(t.name, t.dtype, tuple(d if isinstance(d, int) else None
                                                                            for d in t.shape)) for t in group]
                                         for group in specs)
        self._compiled: dict[tuple, object] = {}
        self._compile_lock = threading.Lock()
        self._local = threading.local()
        self.compiles = 0  # shapes compiled or imported (the in-memory cache's misses)
        self.cache_hits = 0  # of those, imported from the on-disk cache

    def _read(self):
        """The ONNX graph as OpenVINO reads it (once)."""
        if self._model is None:
            try:
                self._model = self._core.read_model(str(self.path))
            except RuntimeError as e:
                raise BackendUnavailable(f"OpenVINO {self._ov.__version__} cannot read {self.path}: {e}") from None
        return self._model

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
                compiled, hit = self._cached(key)
                self.compiles += 1
                self.cache_hits += hit
                log.info("OpenVINO: %s %s for %s (%s)", "found cached compiled" if hit else "compiled", self.path.name,
                         ", ".join(f"{s.name} {list(k)}" for s, k in zip(self.inputs, key)),
                         PRECISION_HINTS[self.precision])
                self._compiled[key] = compiled
        return compiled

    def blob_path(self, key: tuple) -> Path | None:
        """The cache entry of the shapes ``key``: ``<stem>-<digest>.blob`` (digest of graph sha256 and shapes)."""
        if self.cache_folder is None:
            return None
        digest = hashlib.sha256(json.dumps([self._onnx_sha256, [list(k) for k in key]]).encode()).hexdigest()[:16]
        return self.cache_folder / f"{self.path.stem}-{digest}.blob"

    def _cached(self, key: tuple):
        """``(compiled model, whether it came from the disk cache)``: a checked blob imported, else compiled
        (and its blob written with its sha256)."""
        blob = self.blob_path(key)
        if blob is not None:
            try:
                data, digest = read_with_sha256(blob)
                expected = blob.with_suffix(".sha256").read_text().strip()
            except OSError:
                data = expected = None
            if data is not None:
                if digest == expected:
                    try:
                        return self._core.import_model(data, "CPU", self.config), True
                    except RuntimeError as e:
                        reason = f"OpenVINO cannot import it: {e}"
                else:
                    reason = "it does not match its sha256"
                log.info("OpenVINO: recompiling the cached %s (%s)", blob, reason)
        model = self._read().clone()
        model.reshape({spec.name: self._ov.PartialShape(list(shape)) for spec, shape in zip(self.inputs, key)})
        compiled = self._core.compile_model(model, "CPU", self.config)
        if blob is not None:
            try:
                data = compiled.export_model()
                data = data.getvalue() if hasattr(data, "getvalue") else bytes(data)  # BytesIO in 2024+
                blob.parent.mkdir(parents=True, exist_ok=True)
                write_bytes(blob, data)  # the blob first: a reader checks it against the sha256 written next
                write_bytes(blob.with_suffix(".sha256"), hashlib.sha256(data).hexdigest().encode())
            except (OSError, RuntimeError) as e:  # an unwritable cache only costs the next start its speed
                log.info("OpenVINO: cannot cache the compiled model in %s (%s)", blob.parent, e)
        return compiled, False

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
