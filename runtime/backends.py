"""Backends that run a compiled graph: onnxruntime (CPU, CUDA, TensorRT EP) and native TensorRT engines.

One interface: ``backend.inputs`` / ``backend.outputs`` (``TensorSpec``: name, numpy dtype, shape with
symbolic dims as strings) and ``backend.run(feeds) -> list[np.ndarray]``, with every input cast to the
dtype the graph declares (as optimum does). ``run`` is safe to call from several threads at once.

Modules are imported only when their backend is chosen: ``onnxruntime`` for the ORT kinds, ``tensorrt``
and ``cuda-python`` for native engines. A missing module is a ``BackendUnavailable`` that names the extra
to install. The CUDA, TensorRT-EP and native TensorRT paths are written against the documented APIs
(onnxruntime 1.17+, TensorRT 10, cuda-python 12) and were not run here (no GPU on the build machines).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("vdeploy.runtime")

KINDS = ("cpu", "cuda", "tensorrt-ep", "tensorrt")
_ORT_PROVIDER = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt-ep": "TensorrtExecutionProvider",
}
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


class BackendUnavailable(RuntimeError):
    """The backend asked for cannot run here; the message says what to install or use instead."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: symbolic dims are strings (or None when unnamed)."""

    name: str
    dtype: np.dtype
    shape: tuple


def import_onnxruntime():
    """``onnxruntime`` (from either the ``onnxruntime`` or the ``onnxruntime-gpu`` wheel)."""
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailable(
            "onnxruntime is not installed: pip install 'vdeploy[cpu]' (or 'vdeploy[gpu]' for CUDA/TensorRT)"
        ) from None
    return onnxruntime


def import_tensorrt():
    """``(tensorrt, cudart)``: the TensorRT and CUDA runtime Python bindings."""
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailable("tensorrt is not installed: pip install 'vdeploy[tensorrt]'") from None
    return tensorrt, _import_cudart()


def _import_cudart():
    try:  # cuda-python >= 12.6 (cuda-bindings)
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:  # older cuda-python
            from cuda import cudart
        except ImportError:
            raise BackendUnavailable(
                "cuda-python is not installed: pip install 'vdeploy[tensorrt]'"
            ) from None
    return cudart


def physical_cores() -> int:
    """Physical CPU cores available to this process (hyper-threads do not help convolutions)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        cores, core = set(), {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("physical id", "core id"):
                core[key] = value.strip()
            elif not key and core:
                cores.add((core.get("physical id"), core.get("core id")))
                core = {}
        if core:
            cores.add((core.get("physical id"), core.get("core id")))
        if cores:
            return max(1, min(logical, len(cores)))
    except OSError:
        pass
    return max(1, logical)


def gpu_name(device_id: int = 0) -> str | None:
    """The CUDA device's name, without torch: cuda-python, else the driver's /proc entry, else ``nvidia-smi``."""
    try:
        cudart = _import_cudart()
        err, props = cudart.cudaGetDeviceProperties(device_id)
        if err == cudart.cudaError_t.cudaSuccess:
            name = props.name
            return (name.decode() if isinstance(name, bytes) else str(name)).rstrip("\x00").strip()
    except (BackendUnavailable, AttributeError, RuntimeError):
        pass
    gpus = sorted(Path("/proc/driver/nvidia/gpus").glob("*/information"))
    if device_id < len(gpus):
        for line in gpus[device_id].read_text().splitlines():
            if line.startswith("Model:"):
                return line.split(":", 1)[1].strip()
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, f"--id={device_id}", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20, check=True,
            )
            return out.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    return None


def slug(text: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``: how GPU names are compared and filed."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cache_dir() -> Path:
    """The user cache for built engines: ``$VDEPLOY_CACHE``, ``$XDG_CACHE_HOME/vdeploy`` or ``~/.cache/vdeploy``."""
    if os.environ.get("VDEPLOY_CACHE"):
        return Path(os.environ["VDEPLOY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vdeploy"


def engine_cache_dir(stem: str, *, onnx_sha256: str, fp16: bool, profile, gpu, versions: dict) -> Path:
    """Where a built engine is cached: a folder keyed by everything that changes the engine.

    The key hashes the ONNX file's sha256, the precision, the shape profile, the GPU and the library
    versions; a change of any of them selects another folder, so a stale engine is never reused.
    """
    key = {
        "onnx_sha256": onnx_sha256,
        "fp16": bool(fp16),
        "profile": {k: [list(s) for s in v] for k, v in sorted((profile or {}).items())},
        "gpu": gpu,
        "versions": versions,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "ort-trt" / f"{stem}-{digest}"


def cpu_fingerprint() -> str:
    """What an onnxruntime CPU-optimized graph depends on besides the source graph and ORT's version:
    the architecture, the CPU model and its instruction-set flags (the NCHWc layout picks its block
    size from AVX2/AVX-512)."""
    import platform

    model, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = " ".join(sorted(value.split()))
    except OSError:
        pass
    return hashlib.sha256(f"{platform.machine()}|{model}|{flags}".encode()).hexdigest()[:16]


def optimized_graph_dir(path: Path, onnx_sha256: str, ort_version: str) -> Path:
    """The cache entry (a folder) of the onnxruntime CPU-optimized copy of a graph, keyed by what changes
    it: the source graph's sha256, onnxruntime's version and the CPU (see ``cpu_fingerprint``)."""
    key = hashlib.sha256(f"{onnx_sha256}|{ort_version}|{cpu_fingerprint()}".encode()).hexdigest()[:16]
    return cache_dir() / "ort-cpu" / f"{path.stem}-{key}"


def _cast(spec: TensorSpec, value) -> np.ndarray:
    return np.ascontiguousarray(value, dtype=spec.dtype)


class OrtBackend:
    """A graph in onnxruntime on the CPU, CUDA or the TensorRT execution provider.

    Args:
        path: the ``.onnx`` file.
        kind: ``"cpu"``, ``"cuda"`` or ``"tensorrt-ep"``.
        threads: intra-op threads on the CPU (default: physical cores).
        device_id: the CUDA device.
        fp16: let the TensorRT EP build fp16 kernels.
        profile: TensorRT EP shape profile ``{input: (min, opt, max)}`` of int tuples; needed for
            dynamic axes so one engine serves every batch size in range.
        onnx_sha256: the graph's sha256, part of the TensorRT EP engine-cache key (computed if None) and
            of the CPU optimized-graph cache key (no CPU cache without it).
        cache: on the CPU, keep onnxruntime's optimized graph in ``cache_dir()/ort-cpu`` and open that copy
            with graph optimizations off, its weights mapped from disk, next time: session creation of the
            small preset 0.10 s instead of 0.59 s (graph optimization is most of a cold start).
    """

    def __init__(
        self,
        path: str | Path,
        kind: str = "cpu",
        *,
        threads: int | None = None,
        device_id: int = 0,
        fp16: bool = False,
        profile: Mapping[str, tuple] | None = None,
        onnx_sha256: str | None = None,
        cache: bool = True,
    ):
        if kind not in _ORT_PROVIDER:
            raise ValueError(f"onnxruntime kind must be one of {', '.join(_ORT_PROVIDER)}, got {kind!r}")
        ort = import_onnxruntime()
        provider = _ORT_PROVIDER[kind]
        if provider not in ort.get_available_providers():
            extra = "vdeploy[gpu]" if kind == "cuda" else "vdeploy[gpu] and TensorRT"
            raise BackendUnavailable(
                f"onnxruntime here has no {provider} (it has {', '.join(ort.get_available_providers())}): "
                f"install {extra} on a machine with an NVIDIA GPU"
            )
        self.path = Path(path)
        self.kind = kind
        self._device_id = device_id
        options = self.session_options(ort, threads if kind == "cpu" else None)
        providers: list = []
        if kind == "tensorrt-ep":
            providers.append((provider, self._trt_ep_options(ort, fp16, profile, onnx_sha256)))
        if kind in ("cuda", "tensorrt-ep"):  # TensorRT EP hands unsupported nodes to CUDA
            providers.append(
                (
                    "CUDAExecutionProvider",
                    {
                        "device_id": device_id,
                        # UNet3D-like graphs run 2-3x slower with the default HEURISTIC search
                        # (onnxruntime #12880, #22705)
                        "cudnn_conv_algo_search": "EXHAUSTIVE",
                        "do_copy_in_default_stream": True,
                    },
                )
            )
        providers.append("CPUExecutionProvider")
        if kind == "cpu" and cache and onnx_sha256:
            self.session = self._cached_cpu_session(ort, options, providers, onnx_sha256)
        else:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        used = self.session.get_providers()[0]
        if used != provider:
            raise BackendUnavailable(f"onnxruntime could not start {provider} (it fell back to {used})")
        self.name = f"onnxruntime-{kind}"
        self.inputs = [
            TensorSpec(i.name, np.dtype(_ORT_DTYPES.get(i.type, np.float32)), tuple(i.shape))
            for i in self.session.get_inputs()
        ]
        self.outputs = [
            TensorSpec(o.name, np.dtype(_ORT_DTYPES.get(o.type, np.float32)), tuple(o.shape))
            for o in self.session.get_outputs()
        ]
        self._output_names = [o.name for o in self.outputs]

    def _cached_cpu_session(self, ort, options, providers, onnx_sha256: str):
        """A CPU session from the cached optimized graph, building and caching it on a miss.

        An entry is a folder: ``model.onnx`` (the graph), ``model.data`` (its weights, which onnxruntime
        maps from disk rather than parsing and copying them: session creation 0.10 s instead of 0.17 s
        for the small preset) and ``meta.json`` (source sha256 and the sha256 of both files). A hit
        checks both hashes on another thread while the session opens, so a damaged entry is never
        used: it is rebuilt. The folder is built under a temporary name and renamed into place.
        """
        from concurrent.futures import ThreadPoolExecutor

        entry = optimized_graph_dir(self.path, onnx_sha256, ort.__version__)
        try:
            meta = json.loads((entry / _CACHE_META).read_text())
            hit = meta.get("source_sha256") == onnx_sha256 and isinstance(meta.get("files"), dict)
        except (OSError, ValueError):
            hit = False
        if hit:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            with ThreadPoolExecutor(max_workers=1) as pool:
                intact = pool.submit(_files_match, entry, meta["files"])
                try:
                    session = ort.InferenceSession(str(entry / _CACHE_GRAPH), sess_options=options,
                                                   providers=providers)
                except Exception as e:  # noqa: BLE001 - onnxruntime's errors derive from Exception only
                    reason = str(e)
                else:
                    if intact.result():
                        return session
                    del session  # let go of the damaged entry's mapped weights before it is replaced
                    reason = "a file does not match its sha256"
            log.info("onnxruntime: rebuilding the cached optimized graph %s (%s)", entry, reason)
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.{threading.get_ident()}")
        try:
            tmp.mkdir(parents=True)
            options.optimized_model_filepath = str(tmp / _CACHE_GRAPH)
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                             _CACHE_DATA)
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                             "1024")
            session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
            files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
            (tmp / _CACHE_META).write_text(json.dumps({
                "source": str(self.path), "source_sha256": onnx_sha256, "onnxruntime": ort.__version__,
                "files": files,
            }))
            shutil.rmtree(entry, ignore_errors=True)  # a damaged entry
            try:
                tmp.rename(entry)
                log.info("onnxruntime: cached the optimized graph in %s", entry)
            except OSError:  # another process cached the same graph meanwhile: keep theirs
                pass
            return session
        except OSError as e:  # an unwritable cache only costs the next start its speed
            log.info("onnxruntime: cannot cache the optimized graph in %s (%s)", entry.parent, e)
            options.optimized_model_filepath = ""
            return ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def session_options(ort, threads: int | None = None):
        """Options for speed: all graph optimizations, sequential execution, one thread per physical core,
        and no spin-waiting.

        Spinning intra-op threads keep burning their cores after each call, which the numpy step, other
        pipeline threads and other processes then lack. Measured on the 2-core build machine under load
        (small preset U-Net, 8 rounds of 3 dpmpp steps): 971 ms a step with spinning, 501 ms without;
        on a quieter moment 298 vs 259 ms (median), with spinning's best case 208 vs 225 ms.
        """
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads or physical_cores()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only; ORT's warnings about EP fallbacks are logged by us
        return options

    def _trt_ep_options(self, ort, fp16, profile, onnx_sha256) -> dict:
        """TensorRT EP options with an engine cache keyed by what changes the engine."""
        folder = engine_cache_dir(
            self.path.stem,
            onnx_sha256=onnx_sha256 or _sha256(self.path),
            fp16=fp16,
            profile=profile,
            gpu=gpu_name(self._device_id),
            versions={"onnxruntime": ort.__version__, "tensorrt": _tensorrt_version()},
        )
        folder.mkdir(parents=True, exist_ok=True)
        if any(folder.glob("*.engine")):
            log.info("TensorRT EP: found cached engine in %s", folder)
        else:
            log.info("TensorRT EP: building an engine into %s (minutes, once)", folder)
        options = {
            "device_id": self._device_id,
            "trt_fp16_enable": bool(fp16),
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(folder),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(folder),
        }
        if profile:
            for i, which in enumerate(("min", "opt", "max")):
                options[f"trt_profile_{which}_shapes"] = ",".join(
                    f"{name}:{'x'.join(str(d) for d in shapes[i])}" for name, shapes in profile.items()
                )
        return options

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run the graph on ``feeds`` (cast to the declared dtypes); thread-safe."""
        feeds = {spec.name: _cast(spec, feeds[spec.name]) for spec in self.inputs}
        if self.kind == "cpu":
            return self.session.run(self._output_names, feeds)
        # IO binding: inputs copied to the device once, outputs allocated there, one copy back.
        binding = self.session.io_binding()  # one per call: a binding is not shared between threads
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name in self._output_names:
            binding.bind_output(name, "cuda", self._device_id)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()


def _sha256(path: Path) -> str:
    from .manifest import sha256_file

    return sha256_file(path)


_CACHE_GRAPH, _CACHE_DATA, _CACHE_META = "model.onnx", "model.data", "meta.json"


def _files_match(folder: Path, digests: dict) -> bool:
    """Whether ``folder`` holds exactly the files named in ``digests``, each with its sha256
    (hashed concurrently by the manifest's own check)."""
    from .manifest import ManifestError, verify_files

    try:
        if {p.name for p in folder.iterdir()} - {_CACHE_META} != set(digests):
            return False
        verify_files(folder, {"files": digests})
    except (OSError, ManifestError):
        return False
    return True


def _tensorrt_version() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt.__version__


class TensorRTBackend:
    """A serialized TensorRT engine (``.plan``) run with the TensorRT 10 name-based API.

    Input shapes are set per call (``set_input_shape``), device buffers are reused while shapes stay
    the same, and inference is ``execute_async_v3`` on a CUDA stream. An execution context is not
    thread-safe, so each thread gets its own context, stream and buffers.

    Args:
        path: the ``.plan`` file, built for this GPU and this TensorRT version.
        device_id: the CUDA device.
    """

    def __init__(self, path: str | Path, *, device_id: int = 0):
        trt, cudart = import_tensorrt()
        self._trt, self._cudart = trt, cudart
        self.path = Path(path)
        self.kind = "tensorrt"
        self.name = "tensorrt"
        self._device_id = device_id
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
                np.dtype(trt.nptype(self.engine.get_tensor_dtype(name))),
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
            state = {"context": context, "stream": self._check(self._cudart.cudaStreamCreate()), "buffers": {}}
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
        host = {spec.name: _cast(spec, feeds[spec.name]) for spec in self.inputs}
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

    def close(self) -> None:
        """Free every thread's device buffers and streams."""
        with self._states_lock:
            for state in self._all_states:
                for ptr, _ in state["buffers"].values():
                    self._cudart.cudaFree(ptr)
                self._cudart.cudaStreamDestroy(state["stream"])
            self._all_states.clear()


def ort_providers() -> list[str]:
    """onnxruntime's available execution providers, or [] when onnxruntime is not installed."""
    try:
        return list(import_onnxruntime().get_available_providers())
    except BackendUnavailable:
        return []


def matching_engine(engines: list[dict], graph: str, device_id: int = 0, precision: str | None = None) -> dict | None:
    """The manifest's engine entry for ``graph`` built for this GPU and this TensorRT version, if any.

    Among several, one of ``precision`` is preferred; a plan's precision is fixed when it is built.
    """
    candidates = [e for e in engines if e.get("graph") == graph]
    if not candidates:
        return None
    version = _tensorrt_version()
    name = gpu_name(device_id)
    if version is None or name is None:
        return None
    fits = [e for e in candidates if e.get("tensorrt_version") == version and slug(str(e.get("gpu", ""))) == slug(name)]
    fits.sort(key=lambda e: e.get("precision") != precision)
    return fits[0] if fits else None


def auto_kinds(engines: list[dict], graph: str, device_id: int = 0) -> list[str]:
    """The kinds to try, fastest first: a matching native TensorRT plan > TensorRT EP > CUDA > CPU.

    A kind listed here may still fail to start (onnxruntime-gpu lists the TensorRT EP even where the
    TensorRT libraries are missing); ``backend="auto"`` then falls through to the next one.
    """
    kinds = []
    if matching_engine(engines, graph, device_id) is not None:
        kinds.append("tensorrt")
    providers = ort_providers()
    if not providers and not kinds:
        import_onnxruntime()  # raises, naming the extra to install
    kinds += [kind for kind in ("tensorrt-ep", "cuda", "cpu") if _ORT_PROVIDER[kind] in providers]
    return kinds
