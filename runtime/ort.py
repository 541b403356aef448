"""onnxruntime backends: a graph on the CPU, CUDA or the TensorRT execution provider.

The CPU path caches onnxruntime's optimized graph per (source sha256, onnxruntime version, CPU) and opens
that copy unoptimized next time. The CUDA and TensorRT-EP paths are written against onnxruntime's
documented API (1.17+) and were not run on the CPU-only build machines.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .manifest import ManifestError, TensorSpec, sha256_file, verify_files
from .platform import (
    BackendUnavailable,
    cuda_provider_options,
    engine_cache_dir,
    gpu_name,
    import_onnxruntime,
    optimized_graph_dir,
    ort_session_options,
    tensorrt_version,
)

log = logging.getLogger("vdeploy.runtime")

ORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt-ep": "TensorrtExecutionProvider",
}
# cuda_graph=None (the default, "auto"): a CUDA graph for each of the first AUTO_GRAPH_SHAPES input shapes a
# backend sees (a sampling run has one shape; the server's batch buckets a few), later shapes run without one
# (gpu_graph_id -1), so a caller whose shapes keep changing does not capture and keep a graph per shape
AUTO_GRAPH_SHAPES = 4
# run config entry value that tells the CUDA EP not to capture or replay for this run
NO_GRAPH_ID = "-1"

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def cast(spec: TensorSpec, value) -> np.ndarray:
    """``value`` as a contiguous array of the dtype the graph declares (as optimum does)."""
    return np.ascontiguousarray(value, dtype=spec.dtype)


class OrtBackend:
    """A graph in onnxruntime on the CPU, CUDA or the TensorRT execution provider.

    Args:
        path: the ``.onnx`` file.
        kind: ``"cpu"``, ``"cuda"`` or ``"tensorrt-ep"``.
        threads: intra-op threads on the CPU (default: physical cores).
        device_id: the CUDA device.
        fp16: let the TensorRT EP build fp16 kernels.
        profile: TensorRT EP shape profile ``{input: {"min": [...], "opt": [...], "max": [...]}}``
            (``platform.trt_profile``); needed for dynamic axes so one engine serves every batch in range.
        onnx_sha256: the graph's sha256, part of the TensorRT EP engine-cache key (computed if None) and
            of the CPU optimized-graph cache key (no CPU cache without it).
        cache: on the CPU, keep onnxruntime's optimized graph in ``cache_dir()/ort-cpu`` and open that copy
            with graph optimizations off, its weights mapped from disk, next time (graph optimization is
            most of a cold start).
        spin: let the CPU intra-op threads spin-wait between calls (see ``ort_session_options``).
        precision: on CUDA, ``fp32`` (no TF32), ``tf32`` or ``fp16`` (``platform.cuda_provider_options``).
        cuda_graph: on CUDA, capture one CUDA graph per input shape and replay it: each shape gets fixed
            device buffers bound once (IO binding) and its own ``gpu_graph_id``; a call copies its inputs
            into them, replays, and copies the outputs back (``run``) or leaves them on the device
            (``run_bound``). None (default, auto): on, for the first ``AUTO_GRAPH_SHAPES`` shapes (later ones
            run without a graph), and off when onnxruntime cannot capture this graph (a node it placed off
            CUDA: the session is opened again without, and that is logged). True: every shape, and a graph
            that cannot be captured is an error. False: off. Ignored off CUDA.
        nhwc: on CUDA, channels-last convolutions (``platform.cuda_provider_options``).
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
        spin: bool = False,
        precision: str = "fp32",
        cuda_graph: bool | None = None,
        nhwc: bool = False,
    ):
        if kind not in ORT_PROVIDERS:
            raise ValueError(f"onnxruntime kind must be one of {', '.join(ORT_PROVIDERS)}, got {kind!r}")
        ort = import_onnxruntime()
        provider = ORT_PROVIDERS[kind]
        if provider not in ort.get_available_providers():
            extra = "vdeploy[gpu]" if kind == "cuda" else "vdeploy[gpu] and TensorRT"
            raise BackendUnavailable(
                f"onnxruntime here has no {provider} (it has {', '.join(ort.get_available_providers())}): "
                f"install {extra} on a machine with an NVIDIA GPU"
            )
        self.path = Path(path)
        self.kind = kind
        self._device_id = device_id
        self.nhwc = kind == "cuda" and nhwc
        options = ort_session_options(ort, threads if kind == "cpu" else None, spin=spin)
        trt_options = self._trt_ep_options(ort, fp16, profile, onnx_sha256) if kind == "tensorrt-ep" else None
        self.cuda_graph = kind == "cuda" and cuda_graph is not False
        self.graph_shapes = None if cuda_graph else AUTO_GRAPH_SHAPES  # None: a graph for every shape
        try:
            try:
                self.session = self._session(ort, options, kind, device_id, precision, trt_options, cache,
                                             onnx_sha256)
            except Exception as e:  # noqa: BLE001 - onnxruntime's errors derive from Exception only
                if not (self.cuda_graph and cuda_graph is None and type(e).__module__.startswith("onnxruntime")):
                    raise
                log.info("onnxruntime CUDA: no CUDA graph for %s (%s); running without", self.path,
                         " ".join(str(e).split())[:200])
                self.cuda_graph = False
                self.session = self._session(ort, options, kind, device_id, precision, trt_options, cache,
                                             onnx_sha256)
        except Exception as e:  # noqa: BLE001 - onnxruntime's errors derive from Exception only
            if not type(e).__module__.startswith("onnxruntime"):
                raise
            raise _session_error(self.path, kind, e) from None
        used = self.session.get_providers()[0]
        if used != provider:
            raise BackendUnavailable(f"onnxruntime could not start {provider} (it fell back to {used})")
        self.name = f"onnxruntime-{kind}"
        self.inputs = [
            TensorSpec(i.name, np.dtype(_ORT_DTYPES.get(i.type, np.float32)).name, tuple(i.shape))
            for i in self.session.get_inputs()
        ]
        self.outputs = [
            TensorSpec(o.name, np.dtype(_ORT_DTYPES.get(o.type, np.float32)).name, tuple(o.shape))
            for o in self.session.get_outputs()
        ]
        self._output_names = [o.name for o in self.outputs]
        self._ort = ort
        self._slots: dict[tuple, _GraphSlot] = {}
        self._slots_lock = threading.Lock()

    def _session(self, ort, options, kind, device_id, precision, trt_options, cache, onnx_sha256):
        """The onnxruntime session with this backend's providers (``self.cuda_graph`` decides the CUDA graph)."""
        providers: list = []
        if kind == "tensorrt-ep":
            providers.append((ORT_PROVIDERS[kind], trt_options))
        if kind in ("cuda", "tensorrt-ep"):  # TensorRT EP hands unsupported nodes to CUDA
            cuda_precision = precision if kind == "cuda" else "fp32"
            providers.append(("CUDAExecutionProvider",
                              cuda_provider_options(device_id, cuda_precision, cuda_graph=self.cuda_graph,
                                                    nhwc=self.nhwc)))
        providers.append("CPUExecutionProvider")
        if kind == "cpu" and cache and onnx_sha256:
            return self._cached_cpu_session(ort, options, providers, onnx_sha256)
        return ort.InferenceSession(str(self.path), sess_options=options, providers=providers)

    def _cached_cpu_session(self, ort, options, providers, onnx_sha256: str):
        """A CPU session from the cached optimized graph, building and caching it on a miss.

        An entry is a folder: ``model.onnx`` (the graph), ``model.data`` (its weights, which onnxruntime
        maps from disk rather than parsing and copying them) and ``meta.json`` (source sha256 and the sha256 of both files). A hit
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
            files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
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

    def _trt_ep_options(self, ort, fp16, profile, onnx_sha256) -> dict:
        """TensorRT EP options with an engine cache keyed by what changes the engine."""
        folder = engine_cache_dir(
            self.path.stem,
            onnx_sha256=onnx_sha256 or sha256_file(self.path),
            fp16=fp16,
            profile=profile,
            gpu=gpu_name(self._device_id),
            versions={"onnxruntime": ort.__version__, "tensorrt": tensorrt_version()},
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
            for which in ("min", "opt", "max"):
                options[f"trt_profile_{which}_shapes"] = ",".join(
                    f"{name}:{'x'.join(str(d) for d in shapes[which])}" for name, shapes in profile.items()
                )
        return options

    def close(self) -> None:
        """Let go of the session (its memory, mapped weights and device buffers); later runs fail."""
        self.session = None

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run the graph on ``feeds`` (cast to the declared dtypes); thread-safe."""
        feeds = {spec.name: cast(spec, feeds[spec.name]) for spec in self.inputs}
        if self.kind == "cpu":
            return self.session.run(self._output_names, feeds)
        if self.cuda_graph and self._graphed(feeds):
            slot = self.slot({name: value.shape for name, value in feeds.items()})
            with slot.lock:
                for name, value in feeds.items():
                    slot.inputs[name].update_inplace(value)
                self._replay(slot)
                return [slot.outputs[name].numpy() for name in self._output_names]
        # IO binding: inputs copied to the device once, outputs allocated there, one copy back.
        binding = self.session.io_binding()  # one per call: a binding is not shared between threads
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name in self._output_names:
            binding.bind_output(name, "cuda", self._device_id)
        if self.cuda_graph:  # a shape past the auto limit: this run neither captures nor replays
            run_options = self._ort.RunOptions()
            run_options.add_run_config_entry("gpu_graph_id", NO_GRAPH_ID)
            self.session.run_with_iobinding(binding, run_options)
        else:
            self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def _graphed(self, feeds: Mapping[str, np.ndarray]) -> bool:
        """Whether a call of these shapes runs on a CUDA graph: a shape seen before, or a new one within the limit."""
        key = tuple(tuple(feeds[spec.name].shape) for spec in self.inputs)
        with self._slots_lock:
            return key in self._slots or self.graph_shapes is None or self._graph_count() < self.graph_shapes

    def _graph_count(self) -> int:
        return sum(1 for slot in self._slots.values() if slot.graph_id >= 0)

    def slot(self, shapes: Mapping[str, tuple]) -> _GraphSlot:
        """The fixed device buffers (and CUDA graph id) of one input shape, made on first use (host buffers
        on the CPU kind, where the graph id means nothing). Past the auto limit of graphs (``AUTO_GRAPH_SHAPES``)
        a shape gets buffers without a graph (id -1: no capture, no replay)."""
        key = tuple(tuple(shapes[spec.name]) for spec in self.inputs)
        with self._slots_lock:
            slot = self._slots.get(key)
            if slot is None:
                count = self._graph_count()
                graphed = self.cuda_graph and (self.graph_shapes is None or count < self.graph_shapes)
                slot = _GraphSlot.make(self._ort, self.session, self.inputs, self.outputs, shapes,
                                       "cpu" if self.kind == "cpu" else "cuda", self._device_id,
                                       graph_id=count if graphed or not self.cuda_graph else -1)
                self._slots[key] = slot
            return slot

    def _replay(self, slot: _GraphSlot) -> None:
        self.session.run_with_iobinding(slot.binding, slot.run_options)

    def run_bound(self, slot: _GraphSlot) -> None:
        """Run on what the caller wrote into ``slot``'s device input buffers (``slot.pointers()``), leaving
        the outputs in its device output buffers: no host copy. The caller holds ``slot.lock`` and orders
        its own stream after onnxruntime's (``do_copy_in_default_stream``: the default stream)."""
        self._replay(slot)


class _GraphSlot:
    """One input shape's fixed device buffers, their IO binding and its CUDA graph id (``gpu_graph_id``):
    a CUDA graph replays on the addresses it was captured with, so the buffers never move."""

    def __init__(self, inputs: dict, outputs: dict, binding, run_options, graph_id: int):
        self.inputs, self.outputs, self.binding = inputs, outputs, binding
        self.run_options, self.graph_id = run_options, graph_id
        self.lock = threading.Lock()

    @classmethod
    def make(cls, ort, session, input_specs, output_specs, shapes: Mapping[str, tuple], device: str,
             device_id: int, graph_id: int) -> _GraphSlot:
        sizes = symbolic_sizes(input_specs, shapes)
        inputs = {spec.name: ort.OrtValue.ortvalue_from_shape_and_type(
            list(shapes[spec.name]), np.dtype(spec.dtype).type, device, device_id) for spec in input_specs}
        def like(spec):
            same = [tuple(shapes[i.name]) for i in input_specs if len(i.shape) == len(spec.shape)]
            return max(same, key=lambda s: int(np.prod(s)), default=None)

        outputs = {spec.name: ort.OrtValue.ortvalue_from_shape_and_type(
            resolve_shape(spec, sizes, like(spec)), np.dtype(spec.dtype).type, device, device_id)
            for spec in output_specs}
        binding = session.io_binding()
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        for name, value in outputs.items():
            binding.bind_ortvalue_output(name, value)
        run_options = ort.RunOptions()
        run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        return cls(inputs, outputs, binding, run_options, graph_id)

    def pointers(self) -> dict[str, int]:
        """Device addresses of every bound buffer by name (inputs and outputs), for device-array writers."""
        return {name: value.data_ptr() for name, value in {**self.inputs, **self.outputs}.items()}


def symbolic_sizes(specs, shapes: Mapping[str, tuple]) -> dict[str, int]:
    """``{symbolic dim name: size}`` read off the actual input shapes (``"batch" -> 4``)."""
    sizes: dict[str, int] = {}
    for spec in specs:
        for dim, size in zip(spec.shape, shapes[spec.name]):
            if not isinstance(dim, int):
                sizes.setdefault(str(dim), int(size))
    return sizes


def resolve_shape(spec: TensorSpec, sizes: Mapping[str, int], like: tuple | None = None) -> list[int]:
    """An output's concrete shape from its declared one and the inputs' symbolic sizes; a dim no input
    names comes from ``like`` (the shape of the input of the same rank, as the denoiser's eps has x's).

    Raises:
        ValueError: a symbolic output dim no input names (no fixed buffer can be made: use cuda_graph=False).
    """
    shape = []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int):
            shape.append(dim)
        elif str(dim) in sizes:
            shape.append(sizes[str(dim)])
        elif axis < len(like or ()):  # an unnamed dim: the denoiser's output has its x input's shape
            shape.append(int(like[axis]))
        else:
            raise ValueError(f"output {spec.name!r} has dim {dim!r} that no input names: cannot preallocate it "
                             "for a CUDA graph (open with cuda_graph=False)")
    return shape


_CACHE_GRAPH, _CACHE_DATA, _CACHE_META = "model.onnx", "model.data", "meta.json"

# onnxruntime's errors for a file it cannot parse or a graph it cannot build: the file is at fault
_BAD_GRAPH_ERRORS = ("InvalidProtobuf", "InvalidGraph", "InvalidArgument", "NoSuchFile", "NoModel", "Fail",
                     "NotImplemented")


def _session_error(path: Path, kind: str, error: Exception) -> Exception:
    """What a failed session creation means: a corrupt graph (ManifestError naming the file), or on a GPU
    kind an execution provider that cannot start (BackendUnavailable, so ``auto`` tries the next one)."""
    message = " ".join(str(error).split())
    if len(message) > 300:
        message = message[:297] + "..."
    bad_file = type(error).__name__ in _BAD_GRAPH_ERRORS
    if kind != "cpu" and not bad_file:
        return BackendUnavailable(f"onnxruntime could not open {path} with {ORT_PROVIDERS[kind]}: {message}")
    return ManifestError(f"onnxruntime cannot load {path} ({type(error).__name__}: {message}): "
                         "a corrupt file or not an ONNX graph; re-export the model directory")


def _files_match(folder: Path, digests: dict) -> bool:
    """Whether ``folder`` holds exactly the files named in ``digests``, each with its sha256
    (hashed concurrently by the manifest's own check)."""
    try:
        if {p.name for p in folder.iterdir()} - {_CACHE_META} != set(digests):
            return False
        verify_files(folder, digests)
    except (OSError, ManifestError):
        return False
    return True


