"""TensorRT engine build from an exported ONNX graph (TensorRT 10 Python API).

Written against TensorRT's documented Python API (``Builder``, ``OnnxParser``, ``IBuilderConfig``,
``IOptimizationProfile``, ``ITimingCache``); ``tensorrt`` is imported only when an engine is built, and a
missing module is one line (:class:`TensorRTUnavailable`). Shapes use trtexec's syntax
(``x:1x3x8x32x32,t:1``) for ``--min-shapes/--opt-shapes/--max-shapes``.

The engine file is named after what it was built for: ``denoiser.<gpu>.trt<version>.<precision>.plan``;
its manifest entry records the ONNX sha256, the profile, precision, GPU and TensorRT version, which are
exactly what decides whether a cached plan can be reused (a plan is never trusted by file name alone).
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .spec import ExportError, ExportSpec

log = logging.getLogger("vdeploy.export")

DEFAULT_WORKSPACE_MB = 4096
DEFAULT_MAX_BATCH = 4


class TensorRTUnavailable(ExportError):
    """``tensorrt`` does not import here (it installs from NVIDIA's index, with a CUDA GPU)."""


class TensorRTBuildError(RuntimeError):
    """The parser or the builder failed; the message carries TensorRT's errors."""


def import_tensorrt():
    """``import tensorrt``, or :class:`TensorRTUnavailable` with one line saying what to install."""
    try:
        import tensorrt as trt  # noqa: PLC0415
    except ImportError as e:
        raise TensorRTUnavailable(
            f"--tensorrt needs the tensorrt Python module (pip install 'vdeploy[tensorrt]' on a CUDA machine): {e}"
        ) from None
    return trt


def parse_shapes(text: str | None) -> dict[str, tuple[int, ...]]:
    """trtexec's shape syntax ``name:1x3x8x32x32,t:1`` -> ``{"x": (1, 3, 8, 32, 32), "t": (1,)}``."""
    if not text:
        return {}
    shapes = {}
    for item in text.split(","):
        name, sep, dims = item.strip().rpartition(":")
        if not sep or not name or not re.fullmatch(r"\d+(x\d+)*", dims):
            raise ExportError(f"bad shape '{item}': expected name:AxBxC (trtexec syntax), e.g. x:1x3x8x32x32")
        shapes[name] = tuple(int(d) for d in dims.split("x"))
    return shapes


@dataclass
class TensorRTOptions:
    """Engine build settings (trtexec's flags of the same names).

    Args:
        fp16: allow float16 kernels (``BuilderFlag.FP16``).
        min_shapes / opt_shapes / max_shapes: per-input shapes of the optimization profile; inputs not
            named get batch 1 / 1 / ``max_batch`` and the config's image size.
        max_batch: default max batch of the profile.
        workspace_mb: ``MemoryPoolType.WORKSPACE`` limit.
        timing_cache: file to read the timing cache from (if it exists) and write it back to.
    """

    fp16: bool = True
    min_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    opt_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    max_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    max_batch: int = DEFAULT_MAX_BATCH
    workspace_mb: int = DEFAULT_WORKSPACE_MB
    timing_cache: str | None = None


def profile_shapes(spec: ExportSpec, config: dict, options: TensorRTOptions) -> dict[str, dict[str, list[int]]]:
    """min/opt/max for every input with a dynamic axis: given shapes first, else batch 1/1/max_batch and
    the config's image size for height and width.

    Raises:
        ExportError: a shape for an unknown input, of the wrong rank, disagreeing with a static dimension,
            or not ordered min <= opt <= max.
    """
    dynamic = spec.dynamic_axes
    known = set(spec.input_names)
    for given in (options.min_shapes, options.opt_shapes, options.max_shapes):
        unknown = sorted(set(given) - known)
        if unknown:
            raise ExportError(f"shape given for unknown input(s) {', '.join(unknown)}; inputs: {', '.join(spec.input_names)}")
    size = config["image_size"]
    profile = {}
    for t in spec.inputs:
        if t.name not in dynamic:
            continue
        defaults = {}
        for which, batch in (("min", 1), ("opt", 1), ("max", options.max_batch)):
            defaults[which] = [
                batch if d == "batch" else size if d in ("height", "width") else d for d in t.shape
            ]
        entry = {}
        for which, given in (("min", options.min_shapes), ("opt", options.opt_shapes), ("max", options.max_shapes)):
            shape = list(given.get(t.name, defaults[which]))
            if len(shape) != len(t.shape):
                raise ExportError(f"{which} shape of '{t.name}' has rank {len(shape)}, the graph's has {len(t.shape)}")
            for got, want in zip(shape, t.shape):
                if isinstance(want, int) and got != want:
                    raise ExportError(f"{which} shape {shape} of '{t.name}' disagrees with its static shape {list(t.shape)}")
            entry[which] = shape
        if not all(a <= b <= c for a, b, c in zip(entry["min"], entry["opt"], entry["max"])):
            raise ExportError(f"profile of '{t.name}' is not min <= opt <= max: {entry}")
        profile[t.name] = entry
    return profile


def gpu_name() -> str:
    """The CUDA device's name (torch if it sees CUDA, else ``nvidia-smi``), or ``gpu``."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=True
            )
            if out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return "gpu"


def engine_file_name(graph: str, gpu: str, trt_version: str, precision: str) -> str:
    """``denoiser.nvidia-h100-80gb-hbm3.trt10.3.0.fp16.plan``: what the plan was built for, in its name."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") or "gpu"
    return f"{graph}.{slug}.trt{trt_version}.{precision}.plan"


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    spec: ExportSpec,
    config: dict,
    options: TensorRTOptions,
) -> dict:
    """Parse ``onnx_path``, build a serialized engine with one optimization profile, write ``plan_path``.

    Returns:
        The engine's manifest entry (without ``file``/``graph``/``onnx_sha256``, which the caller adds):
        ``gpu``, ``tensorrt_version``, ``precision``, ``profile``, ``workspace_mb``, ``build_seconds``.

    Raises:
        TensorRTUnavailable: ``tensorrt`` does not import.
        TensorRTBuildError: the ONNX parser or the builder failed (TensorRT's messages included).
    """
    trt = import_tensorrt()
    profile_dims = profile_shapes(spec, config, options)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTBuildError(f"TensorRT's ONNX parser rejected {Path(onnx_path).name}: {errors}")

    build_config = builder.create_builder_config()
    build_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if options.fp16:
        build_config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, dims in profile_dims.items():
        profile.set_shape(name, dims["min"], dims["opt"], dims["max"])
    build_config.add_optimization_profile(profile)

    cache_path = Path(options.timing_cache) if options.timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = build_config.create_timing_cache(cache_bytes)
    build_config.set_timing_cache(cache, ignore_mismatch=False)

    log.info("building the TensorRT engine (%s, profile %s); this takes minutes", "fp16" if options.fp16 else "fp32", profile_dims)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, build_config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise TensorRTBuildError(f"TensorRT could not build an engine from {Path(onnx_path).name} (see its log above)")
    Path(plan_path).write_bytes(bytes(serialized))
    if cache_path:
        cache_path.write_bytes(bytes(build_config.get_timing_cache().serialize()))
    log.info("built %s in %.1f s", Path(plan_path).name, seconds)
    return {
        "gpu": gpu_name(),
        "tensorrt_version": trt.__version__,
        "precision": "fp16" if options.fp16 else "fp32",
        "profile": profile_dims,
        "workspace_mb": options.workspace_mb,
        "build_seconds": round(seconds, 1),
    }
