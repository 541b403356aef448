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
    """Run one ``cold_child`` and return its timings (seconds) and memory (MiB)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1", **(env or {}))
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


def measure_cold_start(model_dir: Path, ckpt: Path, repeats: int, threads: int, backend: str, device: str) -> dict:
    """Fresh processes, alternating sides; one untimed round first (page cache) when repeating, then medians.

    The runtime keeps onnxruntime's optimized graph in its cache after the first load on a machine; the
    ``runtime_first_load`` side times that first load (an empty cache folder each run)."""
    rt_args = [str(model_dir), backend, str(threads)]
    sides = {"runtime": ("runtime", rt_args), "torch": ("torch", [str(ckpt), device, str(threads)])}
    if backend == "cpu":
        sides["runtime_first_load"] = ("runtime", rt_args)
    if repeats > 1:  # an untimed round first: page cache, .pyc files, the runtime's graph cache
        for name, (side, argv) in sides.items():
            if name != "runtime_first_load":
                child(side, argv)
    runs: dict[str, list] = {name: [] for name in sides}
    for r in range(repeats):
        progress(f"cold start {r + 1}/{repeats} (load {load_average()})")
        for name, (side, argv) in sides.items():
            if name == "runtime_first_load":
                with tempfile.TemporaryDirectory(prefix="vdeploy-cache-") as empty:
                    runs[name].append(child(side, argv, {"VDEPLOY_CACHE": empty}))
            else:
                runs[name].append(child(side, argv))

    rt, tr = _summary(runs["runtime"]), _summary(runs["torch"])
    rt["torch_imported"] = any(r["torch_imported"] for r in runs["runtime"])
    extra = {}
    if "runtime_first_load" in runs:
        first = _summary(runs["runtime_first_load"])
        extra["runtime_first_load"] = first | {
            "what": "the runtime's first load on a machine: onnxruntime optimizes the graph (ORT_ENABLE_ALL) "
                    "and the runtime caches it; later loads open the cached graph",
            "speedup": round(tr["to_loaded_s"] / first["to_loaded_s"], 2),
        }
    return extra | {
        "runtime": rt | {"what": f"python -m vdeploy.bench.cold_child runtime DIR {backend}: import "
                                 f"vdeploy.runtime; Pipeline.from_dir(DIR, backend={backend!r}) (sha256 of every "
                                 "file verified)"},
        "torch": tr | {"what": "python -m vdeploy.bench.cold_child torch CKPT: import torch; "
                               "vdeploy.export.load_unet(CKPT)"},
        "speedup": round(tr["to_loaded_s"] / rt["to_loaded_s"], 2),
        "rss_ratio": round(tr["rss_loaded_mib"] / rt["rss_loaded_mib"], 2),
        "repeats": repeats,
        "note": "to_loaded_s: from spawning the process to the model being loaded (interpreter start, "
                "imports, load); rss_loaded_mib: peak RSS at that point; first_call_s and peak_rss_mib "
                "include one denoiser call after it",
    }
