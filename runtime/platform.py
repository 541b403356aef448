"""One home for what export and runtime both need, torch-free: module imports that name the extra to
install, the machine (physical cores, GPU name, CPU fingerprint), onnxruntime session options, cache
folders and their keys, and the TensorRT shape profile.

``export/`` imports these instead of keeping its own copies, so a GPU name compared against a plan's is
always computed the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

DEFAULT_MAX_BATCH = 16  # TensorRT profiles (EP engines and native plans): batch 1..16


class BackendUnavailable(RuntimeError):
    """The backend asked for cannot run here; the message says what to install or use instead."""


def import_onnxruntime():
    """``onnxruntime`` (from either the ``onnxruntime`` or the ``onnxruntime-gpu`` wheel)."""
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailable(
            "onnxruntime is not installed: pip install 'vdeploy[cpu]' (or 'vdeploy[gpu]' for CUDA/TensorRT)"
        ) from None
    return onnxruntime


def import_tensorrt(with_cuda: bool = True):
    """``(tensorrt, cudart)``: the TensorRT and CUDA runtime Python bindings (``cudart`` None when not
    ``with_cuda``: building a plan needs TensorRT alone)."""
    try:
        import tensorrt
    except ImportError as e:
        raise BackendUnavailable(f"tensorrt is not installed: pip install 'vdeploy[tensorrt]' ({e})") from None
    return tensorrt, _import_cudart() if with_cuda else None


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
        "profile": {k: {w: list(v[w]) for w in ("min", "opt", "max")} for k, v in sorted((profile or {}).items())},
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


def tensorrt_version() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt.__version__


def ort_providers() -> list[str]:
    """onnxruntime's available execution providers, or [] when onnxruntime is not installed."""
    try:
        return list(import_onnxruntime().get_available_providers())
    except BackendUnavailable:
        return []


def ort_session_options(ort, threads: int | None = None, *, spin: bool = False, optimization: str = "all"):
    """onnxruntime options for speed: all graph optimizations (or ``optimization``), sequential execution,
    one intra-op thread per physical core, and no spin-waiting unless ``spin``.

    Spinning intra-op threads keep burning their cores after each call, which the numpy step, other
    pipeline threads and other processes then lack: off by default (the README's performance section has
    the measurement); ``spin=True`` can win for one caller alone on an idle machine.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or physical_cores()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.log_severity_level = 3  # errors only; ORT's warnings about EP fallbacks are logged by us
    return options



# precision -> the CUDA EP's TF32 switch: onnxruntime runs fp32 convolutions and matmuls in TF32 by default
# (measured on an H200: 2.3e-3 max abs from CPU fp32 with the default, 3.6e-6 with use_tf32=0)
CUDA_TF32 = {"fp32": False, "tf32": True, "fp16": False}


def cuda_provider_options(device_id: int = 0, precision: str = "fp32", *, cuda_graph: bool = False,
                          nhwc: bool = False) -> dict:
    """The onnxruntime CUDA execution provider's options for ``precision``, as plain data.

    ``fp32`` is IEEE fp32 (``use_tf32=0``); ``tf32`` lets convolutions and matmuls round their inputs to
    TF32 (10-bit mantissa, faster on tensor cores); ``fp16`` runs the fp16 graph, whose fp32-kept nodes
    get no TF32 either. cuDNN-frontend paths may ignore ``use_tf32``: ``NVIDIA_TF32_OVERRIDE=0`` in the
    environment before the process starts CUDA is the process-wide switch (``fp32_environment``).
    ``cuda_graph`` captures one CUDA graph per input shape (``OrtBackend`` then binds fixed device buffers
    and passes ``gpu_graph_id`` per shape). ``nhwc`` asks for channels-last convolutions (``prefer_nhwc``:
    onnxruntime's layout transformer moves Conv and the ops it can carry to NHWC, inserting transposes where
    a node cannot follow).
    """
    if precision not in CUDA_TF32:
        raise ValueError(f"the CUDA execution provider takes precision {', '.join(CUDA_TF32)}, got {precision!r}")
    options = {
        "device_id": int(device_id),
        # UNet3D-like graphs run 2-3x slower with the default HEURISTIC search (onnxruntime #12880, #22705)
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "do_copy_in_default_stream": True,
        "use_tf32": 1 if CUDA_TF32[precision] else 0,
    }
    if cuda_graph:
        options["enable_cuda_graph"] = 1
    if nhwc:
        options["prefer_nhwc"] = 1
    return options


def fp32_environment() -> dict[str, str]:
    """What to put in the environment of a process that must compute fp32 on CUDA everywhere (cuBLAS,
    cuDNN and its frontend, torch included): NVIDIA's process-wide TF32 switch, read when CUDA starts."""
    return {"NVIDIA_TF32_OVERRIDE": "0"}


def trt_profile(inputs, video_shape: tuple, *, max_batch: int = DEFAULT_MAX_BATCH, cond_dim: int | None = None,
                min_shapes: dict | None = None, opt_shapes: dict | None = None,
                max_shapes: dict | None = None) -> dict[str, dict[str, list[int]]]:
    """The one TensorRT optimization profile of a graph: ``{input: {"min": [...], "opt": [...], "max": [...]}}``
    for every input with a dynamic axis.

    Given shapes (trtexec's ``--min-shapes`` etc., by input name) win; otherwise batch runs 1/1/``max_batch``,
    height and width are the config's image size, the cond width is ``cond_dim``. Used for native plans
    (export) and TensorRT EP engines (runtime) alike.

    Args:
        inputs: the graph's input ``TensorSpec``s (``vdeploy.runtime.manifest``).
        video_shape: ``(channels, frames, height, width)`` of one video.

    Raises:
        ValueError: a shape for an unknown input, of the wrong rank, disagreeing with a static dimension,
            an axis that cannot be bounded, or not ordered min <= opt <= max.
    """
    given = {"min": dict(min_shapes or {}), "opt": dict(opt_shapes or {}), "max": dict(max_shapes or {})}
    names = [spec.name for spec in inputs]
    for which, shapes in given.items():
        unknown = sorted(set(shapes) - set(names))
        if unknown:
            raise ValueError(f"{which} shape given for unknown input(s) {', '.join(unknown)}; inputs: {', '.join(names)}")
    _, _, height, width = video_shape
    fixed = {"height": height, "width": width, "cond_dim": cond_dim}
    profile = {}
    for spec in inputs:
        if all(isinstance(d, int) for d in spec.shape):
            continue  # static inputs (cond_scale) need no profile
        entry = {}
        for which, batch in (("min", 1), ("opt", 1), ("max", max_batch)):
            if spec.name in given[which]:
                shape = list(given[which][spec.name])
            else:
                shape = []
                for axis, d in enumerate(spec.shape):
                    if isinstance(d, int):
                        shape.append(d)
                    elif axis == 0:
                        shape.append(batch)
                    elif spec.role in ("x", "frames") and axis in (3, 4):
                        shape.append(height if axis == 3 else width)
                    elif spec.role == "cond" and axis == 1 and cond_dim:
                        shape.append(cond_dim)
                    elif fixed.get(d):
                        shape.append(fixed[d])
                    else:
                        raise ValueError(f"cannot bound dynamic axis {axis} ({d!r}) of input {spec.name!r}: give its shapes")
            if len(shape) != len(spec.shape):
                raise ValueError(f"{which} shape of {spec.name!r} has rank {len(shape)}, the graph's has {len(spec.shape)}")
            for got, want in zip(shape, spec.shape):
                if isinstance(want, int) and got != want:
                    raise ValueError(f"{which} shape {shape} of {spec.name!r} disagrees with its static shape {list(spec.shape)}")
            entry[which] = shape
        if not all(a <= b <= c for a, b, c in zip(entry["min"], entry["opt"], entry["max"])):
            raise ValueError(f"profile of {spec.name!r} is not min <= opt <= max: {entry}")
        profile[spec.name] = entry
    return profile


def engine_file_name(graph: str, gpu: str | None, trt_version: str, precision: str) -> str:
    """``denoiser.nvidia-h100-80gb-hbm3.trt10.3.0.fp16.plan``: what the plan was built for, in its name."""
    return f"{graph}.{slug(gpu or '') or 'gpu'}.trt{trt_version}.{precision}.plan"
