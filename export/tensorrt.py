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
import time
from dataclasses import dataclass, field
from pathlib import Path

from .spec import ExportError, ExportSpec

log = logging.getLogger("vdeploy.export")

DEFAULT_WORKSPACE_MB = 4096


class TensorRTUnavailable(ExportError):
    """``tensorrt`` does not import here (it installs from NVIDIA's index, with a CUDA GPU)."""


class TensorRTBuildError(RuntimeError):
    """The parser or the builder failed; the message carries TensorRT's errors."""


def import_tensorrt():
    """``import tensorrt``, or :class:`TensorRTUnavailable` with one line saying what to install."""
    from vdeploy.runtime.platform import BackendUnavailable
    from vdeploy.runtime.platform import import_tensorrt as import_bindings

    try:
        return import_bindings(with_cuda=False)[0]
    except BackendUnavailable as e:
        raise TensorRTUnavailable(f"--tensorrt needs the tensorrt Python module on a CUDA machine: {e}") from None


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
    max_batch: int = 16  # vdeploy.runtime.platform.DEFAULT_MAX_BATCH
    workspace_mb: int = DEFAULT_WORKSPACE_MB
    timing_cache: str | None = None


def profile_shapes(spec: ExportSpec, config: dict, options: TensorRTOptions) -> dict[str, dict[str, list[int]]]:
    """The plan's optimization profile: ``vdeploy.runtime.platform.trt_profile`` (the one place TensorRT
    profiles come from, for plans and EP engines alike) with the ``--min/--opt/--max-shapes`` given.

    Raises:
        ExportError: a shape for an unknown input, of the wrong rank, disagreeing with a static dimension,
            or not ordered min <= opt <= max.
    """
    from vdeploy.runtime.platform import trt_profile

    size = config["image_size"]
    cond = next((t for t in spec.inputs if t.role == "cond"), None)
    try:
        return trt_profile(spec.inputs, (config["channels"], config["num_frames"], size, size),
                           max_batch=options.max_batch, cond_dim=cond.shape[1] if cond else None,
                           min_shapes=options.min_shapes, opt_shapes=options.opt_shapes, max_shapes=options.max_shapes)
    except ValueError as e:
        raise ExportError(str(e)) from None


def gpu_name() -> str:
    """The CUDA device's name as the runtime reads it (so a plan's name matches at load), or ``gpu``."""
    from vdeploy.runtime.platform import gpu_name as runtime_gpu_name

    return runtime_gpu_name(0) or "gpu"


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
