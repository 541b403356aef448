"""Cold start: a fresh process that imports ``vdeploy.runtime`` and loads the model directory, against one
that imports torch and loads the checkpoint (wall time from spawn, peak RSS). The children are the
module ``vdeploy.bench.cold_child`` run with ``python -m``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import load_average, progress


def child(side: str, argv: list[str], env: dict | None = None) -> dict:
    """Run one ``cold_child`` and return its timings (seconds) and memory (MiB).

    Bytecode caching is on in the child whatever this process has (``PYTHONDONTWRITEBYTECODE`` dropped): an
    installed package starts from compiled ``.pyc`` files, and without them every start of either side
    compiles vdeploy's own sources again. ``env`` may name a ``PYTHONPYCACHEPREFIX`` to keep them out of the
    source tree."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1", **(env or {}))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    spawned = time.time()
    proc = subprocess.run([sys.executable, "-m", "vdeploy.bench.cold_child", side, *argv],
                          capture_output=True, env=env, text=True, check=False)
    exited = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"cold-start child {side} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
    if not lines:
        raise RuntimeError(f"cold-start child {side} printed no BENCH line: {proc.stdout.strip()[-300:]}")
    data = json.loads(lines[-1][6:])
    return {
        "to_loaded_s": data["loaded"] - spawned,  # interpreter start + imports + load
        "interpreter_s": data["start"] - spawned,
        "import_s": data["imported"] - data["start"],
        "load_s": data["loaded"] - data["imported"],
        "first_call_s": data["first_call"] - data["loaded"],
        "to_first_call_s": data["first_call"] - spawned,  # ... + one denoiser call (OpenVINO: its compiled model)
        "process_s": exited - spawned,
        "rss_loaded_mib": data["rss_loaded_kb"] / 1024,
        "peak_rss_mib": data["peak_kb"] / 1024,
        "torch_imported": data.get("torch_imported"),
    }


def _summary(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if isinstance(rows[0][k], float)]
    out = {k: round(float(np.median([r[k] for r in rows])), 3) for k in keys}
    out["min_to_loaded_s"] = round(min(r["to_loaded_s"] for r in rows), 3)
    return out


def other_cpu_backends(backend: str) -> tuple[str, ...]:
    """The CPU runtime backends installed here besides ``backend`` (each gets its own cold-start rows)."""
    import importlib.util

    libraries = {"cpu": "onnxruntime", "openvino": "openvino"}
    return tuple(n for n, lib in libraries.items() if n != backend and importlib.util.find_spec(lib) is not None)


def measure_cold_start(model_dir: Path, ckpt: Path, repeats: int, threads: int, backend: str, device: str,
                       others: tuple[str, ...] = ()) -> dict:
    """Fresh processes, alternating sides; one untimed round first (page cache, ``.pyc`` files in a temporary
    ``PYTHONPYCACHEPREFIX``, the runtime's caches), then medians.

    ``backend`` is the runtime side the speedup is given for; ``others`` are further runtime backends timed
    the same way (``backends`` in the result holds every one). The runtime keeps onnxruntime's optimized graph
    and OpenVINO's compiled models in its cache after the first load on a machine; the ``first_load`` sides
    time that first load (an empty cache folder each run). ``VDEPLOY_AUTO_MEASURE=0`` in every child: the
    backend is named, so auto's measurement never runs."""
    names = [backend, *[o for o in others if o != backend]]
    with tempfile.TemporaryDirectory(prefix="vdeploy-pycache-") as pycache:
        return _measure(model_dir, ckpt, repeats, threads, backend, device, names, {"PYTHONPYCACHEPREFIX": pycache})


def _measure(model_dir: Path, ckpt: Path, repeats: int, threads: int, backend: str, device: str, names: list[str],
             base_env: dict) -> dict:
    sides = {"torch": ("torch", [str(ckpt), device, str(threads)], None)}
    for name in names:
        rt_args = [str(model_dir), name, str(threads)]
        sides[name] = ("runtime", rt_args, None)
        if name in ("cpu", "openvino"):
            sides[f"{name}_first_load"] = ("runtime", rt_args, "empty")
    env = {**base_env, "VDEPLOY_AUTO_MEASURE": "0"}
    for side, argv, cache in sides.values():  # an untimed round first: page cache, .pyc files, the graph caches
        if cache is None:
            child(side, argv, env)
    runs: dict[str, list] = {name: [] for name in sides}
    for r in range(repeats):
        progress(f"cold start {r + 1}/{repeats} (load {load_average()})")
        for name, (side, argv, cache) in sides.items():
            if cache == "empty":
                with tempfile.TemporaryDirectory(prefix="vdeploy-cache-") as empty:
                    runs[name].append(child(side, argv, {**env, "VDEPLOY_CACHE": empty}))
            else:
                runs[name].append(child(side, argv, env))

    tr = _summary(runs["torch"])
    per_backend = {}
    for name in names:
        s = _summary(runs[name])
        s["torch_imported"] = any(r["torch_imported"] for r in runs[name])
        s["speedup"] = round(tr["to_loaded_s"] / s["to_loaded_s"], 2)
        s["speedup_to_first_call"] = round(tr["to_first_call_s"] / s["to_first_call_s"], 2)
        if f"{name}_first_load" in runs:
            first = _summary(runs[f"{name}_first_load"])
            s["first_load"] = first | {"speedup": round(tr["to_loaded_s"] / first["to_loaded_s"], 2),
                                       "speedup_to_first_call": round(tr["to_first_call_s"]
                                                                      / first["to_first_call_s"], 2)}
        per_backend[name] = s
    rt = dict(per_backend[backend])
    extra = {"backends": per_backend}
    if "first_load" in rt:
        first = rt.pop("first_load")
        extra["runtime_first_load"] = first | {
            "what": "the runtime's first load on a machine: onnxruntime optimizes the graph (ORT_ENABLE_ALL), "
                    "OpenVINO compiles it at the first call; both cache the result; later loads open the cache",
        }
    rt.pop("speedup", None)
    rt.pop("speedup_to_first_call", None)
    return extra | {
        "runtime": rt | {"what": f"python -m vdeploy.bench.cold_child runtime DIR {backend}: import "
                                 f"vdeploy.runtime; Pipeline.from_dir(DIR, backend={backend!r}) (sha256 of every "
                                 "file verified)"},
        "torch": tr | {"what": "python -m vdeploy.bench.cold_child torch CKPT: import torch; "
                               "vdeploy.export.load_unet(CKPT)"},
        "speedup": round(tr["to_loaded_s"] / rt["to_loaded_s"], 2),
        "speedup_to_first_call": round(tr["to_first_call_s"] / rt["to_first_call_s"], 2),
        "rss_ratio": round(tr["rss_loaded_mib"] / rt["rss_loaded_mib"], 2),
        "repeats": repeats,
        "note": "to_loaded_s: from spawning the process to the model being loaded (interpreter start, "
                "imports, load); rss_loaded_mib: peak RSS at that point; first_call_s and peak_rss_mib "
                "include one denoiser call after it",
    }
