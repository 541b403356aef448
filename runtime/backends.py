"""The backends table: what can run a compiled denoiser graph, and how to open one.

One interface for every backend, the ``Backend`` protocol: ``name``, ``path``, ``inputs`` / ``outputs``
(``TensorSpec``s with numpy dtype names and shapes, symbolic dims as strings), ``run(feeds) ->
list[np.ndarray]`` with every input cast to the dtype the graph declares, safe to call from several threads at
once, and ``close()``.

``BACKENDS`` maps a name to a :class:`BackendSpec`: whether it can run here (and why not), how to open one
graph of a model directory with one :class:`BackendOptions`, and its place in ``auto``'s order. The
Pipeline, parity, the CLI's ``--backend`` choices and the benchmark all read it; adding a backend is one
entry here plus its own module. Modules are imported only when their backend is opened.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from .manifest import Engine, Manifest, ManifestError, TensorSpec
from .platform import (
    DEFAULT_MAX_BATCH,
    BackendUnavailable,
    gpu_name,
    import_onnxruntime,
    import_tensorrt,
    slug,
    tensorrt_version,
    trt_profile,
)

log = logging.getLogger("vdeploy.runtime")

__all__ = ["BACKENDS", "Backend", "BackendOptions", "BackendSpec", "BackendUnavailable", "auto_order",
           "matching_engine", "backend_spec", "graph_for", "open_graph", "precision_refused", "precisions"]


@runtime_checkable
class Backend(Protocol):
    """What ``BackendSpec.open`` returns: one graph, ready to run (every backend module's class is checked
    against this in tests/test_extension_points.py).

    Attributes:
        name: what runs it, for logs and reports (``"onnxruntime-cpu"``, ``"tensorrt"``, ...).
        path: the file it runs (the ONNX graph or the TensorRT plan).
        inputs, outputs: ``TensorSpec``s with numpy dtype names and shapes (symbolic dims as strings).
    """

    name: str
    path: Path
    inputs: Sequence[TensorSpec]
    outputs: Sequence[TensorSpec]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs for ``feeds`` (input name -> array, cast to the declared dtypes); thread-safe."""

    def close(self) -> None:
        """Release sessions, device memory, compiled models."""


@dataclass(frozen=True)
class BackendOptions:
    """Settings for opening a graph, one object through every layer.

    Args:
        precision: ``fp32``, ``fp16`` (the fp16 graph on onnxruntime CPU/CUDA, the fp16 flag on the
            TensorRT EP, an fp16 plan for native TensorRT) or ``bf16`` (OpenVINO's bfloat16 inference
            precision, where the CPU has it); each backend takes those in its ``BackendSpec.precisions``.
        threads: CPU intra-op threads (default: physical cores).
        device_id: the CUDA device.
        max_batch: the largest batch a TensorRT engine is built for.
        spin: onnxruntime CPU threads spin-wait between calls (lower latency for one caller on an idle
            machine, worse under load; off by default).
        cache: keep onnxruntime's CPU-optimized graph and OpenVINO's compiled models in the user cache
            (faster cold starts).
        cuda_graph: onnxruntime CUDA and native TensorRT capture and replay one CUDA graph per input shape
            (fixed device buffers; ``OrtBackend``, ``TensorRTBackend``). None (default): on for the first few
            shapes a backend sees and off past them or where the graph cannot be captured; True: every shape;
            False: off.
        nhwc: onnxruntime CUDA runs convolutions and the ops between them channels-last (the CUDA EP's
            ``prefer_nhwc``). Off by default: slower for this U-Net on an H200 at every precision (README, GPU);
            the benchmark keeps its rows.
    """

    precision: str = "fp32"
    threads: int | None = None
    device_id: int = 0
    max_batch: int = DEFAULT_MAX_BATCH
    spin: bool = False
    cache: bool = True
    cuda_graph: bool | None = None
    nhwc: bool = False

    def __post_init__(self):
        if self.precision not in precisions():
            raise ValueError(f"precision must be one of {', '.join(precisions())}, got {self.precision!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive integer, got {self.threads!r}")
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {self.max_batch!r}")


@dataclass(frozen=True)
class BackendSpec:
    """One entry of the backends table.

    Args:
        unavailable: ``(manifest, options) -> None`` if the backend can run this model here, else the
            reason (what to install, which plan is missing).
        open: ``(model_dir, manifest, graph name, options) -> backend``; raises ``BackendUnavailable``.
        auto_rank: its place in ``auto``'s order (lower first), None for never automatic.
        fp16_graph: ``precision="fp16"`` runs the exported fp16 graph (else the backend builds fp16 itself
            from the fp32 graph).
        summary: one line for ``--help`` and the docs.
        precisions: the ``BackendOptions.precision`` values it really runs (the benchmark times one row
            per precision listed here; ``--precision``'s choices and ``BackendOptions`` take their union).
        device: where it computes, ``"cpu"`` or ``"cuda"`` (the text encoder runs on CUDA beside a CUDA one).
    """

    unavailable: Callable[[Manifest, BackendOptions], str | None]
    open: Callable[[Path, Manifest, str, BackendOptions], object]
    auto_rank: int | None
    fp16_graph: bool
    summary: str
    precisions: tuple[str, ...] = ("fp32",)
    device: str = "cpu"


# ----------------------------------------------------------- onnxruntime ----


def _ort_unavailable(kind: str):
    from .ort import ORT_PROVIDERS

    def unavailable(manifest: Manifest, options: BackendOptions) -> str | None:
        try:
            ort = import_onnxruntime()
        except BackendUnavailable as e:
            return str(e)
        provider = ORT_PROVIDERS[kind]
        if provider not in ort.get_available_providers():
            extra = "vdeploy[gpu]" if kind == "cuda" else "vdeploy[gpu] and TensorRT"
            return (f"onnxruntime here has no {provider} (it has {', '.join(ort.get_available_providers())}): "
                    f"install {extra} on a machine with an NVIDIA GPU")
        return None

    return unavailable


def _ort_open(kind: str):
    def open_ort(model_dir: Path, manifest: Manifest, graph_name: str, options: BackendOptions):
        from .onnx_external import graph_digest
        from .ort import OrtBackend

        graph = manifest.graphs[graph_name]
        profile = None
        if kind == "tensorrt-ep":
            try:
                profile = trt_profile(graph.inputs, manifest.video_shape, max_batch=options.max_batch,
                                      cond_dim=manifest.cond_dim)
            except ValueError as e:
                raise ManifestError(f"{model_dir}: graph {graph_name!r}: {e}") from None
        return OrtBackend(
            model_dir / graph.file, kind, threads=options.threads if kind == "cpu" else None,
            device_id=options.device_id, fp16=options.precision == "fp16", profile=profile,
            onnx_sha256=graph_digest(model_dir, graph.file, manifest.files), cache=options.cache, spin=options.spin,
            precision=options.precision, cuda_graph=options.cuda_graph, nhwc=options.nhwc,
        )

    return open_ort


# -------------------------------------------------------- native TensorRT ----


def matching_engine(engines, graph: str, device_id: int = 0, precision: str | None = None) -> Engine | None:
    """The manifest's plan of ``graph`` built for this GPU and this TensorRT version, if any.

    Among several, one of ``precision`` is preferred; a plan's precision is fixed when it is built.
    """
    candidates = [e for e in engines if e.graph == graph]
    if not candidates:
        return None
    version, name = tensorrt_version(), gpu_name(device_id)
    if version is None or name is None:
        return None
    fits = [e for e in candidates if e.tensorrt_version == version and slug(e.gpu) == slug(name)]
    fits.sort(key=lambda e: e.precision != precision)
    return fits[0] if fits else None


def _trt_unavailable(manifest: Manifest, options: BackendOptions) -> str | None:
    try:
        import_tensorrt()
    except BackendUnavailable as e:
        return str(e)
    if matching_engine(manifest.engines, "denoiser", options.device_id, options.precision) is None:
        listed = ", ".join(f"{e.file} ({e.gpu}, TensorRT {e.tensorrt_version})" for e in manifest.engines)
        return ("no TensorRT plan of this model for this GPU and TensorRT version"
                + (f" (it has: {listed})" if listed else "")
                + "; build one with `vdeploy export --tensorrt` or use backend='tensorrt-ep'")
    return None


def _trt_open(model_dir: Path, manifest: Manifest, graph_name: str, options: BackendOptions):
    from .tensorrt import TensorRTBackend

    import_tensorrt()  # names the extra to install when the bindings are missing
    entry = matching_engine(manifest.engines, graph_name, options.device_id, options.precision)
    if entry is None:
        raise BackendUnavailable(f"no TensorRT plan of graph {graph_name!r} for this GPU and TensorRT version "
                                 f"in {model_dir}; build one with `vdeploy export --tensorrt`")
    if entry.precision != options.precision:
        log.info("TensorRT: no %s plan of %r for this GPU; using the %s plan",
                 options.precision, graph_name, entry.precision)
    return TensorRTBackend(model_dir / entry.file, device_id=options.device_id, cuda_graph=options.cuda_graph)


# --------------------------------------------------------------- OpenVINO ----


def _openvino_unavailable(manifest: Manifest, options: BackendOptions) -> str | None:
    import importlib.util

    from .openvino import cpu_has_bf16, import_openvino

    if options.precision == "fp32" and importlib.util.find_spec("openvino") is not None:
        return None  # installed: not imported until opened (0.1-0.2 s of a cold start that picks another)
    try:
        import_openvino()
    except BackendUnavailable as e:
        return str(e)
    if options.precision == "bf16" and not cpu_has_bf16():
        return "this CPU has no native bfloat16 in OpenVINO (no BF16 in its OPTIMIZATION_CAPABILITIES): use fp32"
    return None


def _openvino_open(model_dir: Path, manifest: Manifest, graph_name: str, options: BackendOptions):
    from .openvino import OpenVINOBackend

    return OpenVINOBackend(model_dir / manifest.graphs[graph_name].file, precision=options.precision,
                           threads=options.threads, cache=options.cache,
                           onnx_sha256=manifest.files.get(manifest.graphs[graph_name].file),
                           specs=(manifest.graphs[graph_name].inputs, manifest.graphs[graph_name].outputs))


# ------------------------------------------------------------------ table ----


BACKENDS: dict[str, BackendSpec] = {
    "tensorrt": BackendSpec(_trt_unavailable, _trt_open, 0, False,
                            "a native TensorRT plan built for this GPU (vdeploy export --tensorrt)",
                            ("fp32", "fp16"), "cuda"),
    "tensorrt-ep": BackendSpec(_ort_unavailable("tensorrt-ep"), _ort_open("tensorrt-ep"), 1, False,
                               "onnxruntime's TensorRT execution provider (engines cached per GPU)",
                               ("fp32", "fp16"), "cuda"),
    # fp32 is IEEE fp32 (use_tf32=0); tf32 is the CUDA EP's default, an explicit choice here
    "cuda": BackendSpec(_ort_unavailable("cuda"), _ort_open("cuda"), 2, True, "onnxruntime CUDA",
                        ("fp32", "tf32", "fp16"), "cuda"),
    # `auto` times it against onnxruntime CPU on each graph and takes the faster (runtime/ranking.py, cached);
    # this rank (after onnxruntime: the faster cold start) is the order when that is off (VDEPLOY_AUTO_MEASURE=0)
    "openvino": BackendSpec(_openvino_unavailable, _openvino_open, 10, False,
                            "OpenVINO on the CPU, compiled per input shape (f32; bf16 where the CPU has it)",
                            ("fp32", "bf16")),
    "cpu": BackendSpec(_ort_unavailable("cpu"), _ort_open("cpu"), 9, True, "onnxruntime CPU", ("fp32", "fp16")),
}


def precisions() -> tuple[str, ...]:
    """Every precision some backend runs (the union of ``BackendSpec.precisions``, in table order)."""
    return tuple(dict.fromkeys(p for spec in BACKENDS.values() for p in spec.precisions))


def backend_spec(name: str) -> BackendSpec:
    """The table entry of ``name``, or a ValueError naming the backends there are."""
    try:
        return BACKENDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}, got {name!r}") from None


def precision_refused(name: str, options: BackendOptions) -> str | None:
    """Why backend ``name`` does not take ``options.precision`` (naming the backends that do), or None."""
    if options.precision in BACKENDS[name].precisions:
        return None
    takers = [n for n, spec in BACKENDS.items() if options.precision in spec.precisions]
    return (f"backend {name!r} does not take precision {options.precision!r} (it takes "
            f"{', '.join(BACKENDS[name].precisions)}); {options.precision} runs on: {', '.join(takers)}")


def auto_order(manifest: Manifest, options: BackendOptions,
               model_dir: Path | None = None) -> tuple[list[str], list[str]]:
    """``auto``'s candidates, fastest first, and why the others cannot run here.

    A candidate may still fail to start (onnxruntime-gpu lists the TensorRT EP even where the TensorRT
    libraries are missing); ``auto`` then falls through to the next one. With ``model_dir``, the CPU
    candidates are ordered by a measured warm-up cached per graph, CPU and versions (``runtime/ranking.py``).
    """
    ranked = sorted((spec.auto_rank, name) for name, spec in BACKENDS.items() if spec.auto_rank is not None)
    candidates, skipped = [], []
    for _, name in ranked:
        reason = precision_refused(name, options) or BACKENDS[name].unavailable(manifest, options)
        if reason is None:
            candidates.append(name)
        else:
            skipped.append(f"{name}: {reason}")
    if model_dir is not None:
        from .ranking import rank

        candidates, why = rank(candidates, Path(model_dir), manifest, options,
                               graph_for=lambda name: graph_for(name, manifest, options),
                               device_of=lambda name: BACKENDS[name].device, open_graph=open_graph)
        if why:
            log.info("%s", why)
    return candidates, skipped


def graph_for(name: str, manifest: Manifest, options: BackendOptions, *, guidance: bool = False) -> str | None:
    """Which graph backend ``name`` runs for this precision (and guidance), or None when there is none.

    Raises:
        ValueError: the backend does not take ``options.precision`` (the message names those that do).
    """
    refused = precision_refused(name, options)
    if refused:
        raise ValueError(refused)
    precision = "fp16" if BACKENDS[name].fp16_graph and options.precision == "fp16" else "fp32"
    return manifest.find_graph(guidance=guidance, precision=precision)


def open_graph(name: str, model_dir: Path, manifest: Manifest, graph_name: str, options: BackendOptions):
    """Open ``graph_name`` on backend ``name``, checking it has the inputs the manifest lists."""
    backend = BACKENDS[name].open(Path(model_dir), manifest, graph_name, options)
    graph = manifest.graphs[graph_name]
    listed = [(spec.name, len(spec.shape)) for spec in graph.inputs]
    actual = [(spec.name, len(spec.shape)) for spec in backend.inputs]
    if sorted(listed) != sorted(actual):
        close = getattr(backend, "close", None)
        if close:
            close()
        raise ManifestError(f"{model_dir}: graph {graph_name!r} has inputs {actual}, but the manifest lists {listed}")
    return backend
