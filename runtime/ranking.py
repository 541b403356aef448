"""``auto``'s order among the CPU backends, by measurement: a short warm-up of each, cached.

Where more than one CPU backend can run a model's graph (onnxruntime CPU and OpenVINO), which is faster
depends on the graph, the CPU and the library versions. The first load of a graph on a machine therefore
times each of them on it: one untimed call, then ``ROUNDS`` rounds of one call each, interleaved across the
backends (so a burst of other work on a shared machine hits every backend alike), batch 1 at the model's
size; the lowest median wins. The result is kept in ``cache_dir()/ranking/<key>.json``, the key hashing
the graph's sha256, the CPU (``cpu_fingerprint``), the versions of every candidate's library, the
precision and the thread count, like the compiled-model caches; every later load reads it (a few
hundred bytes) instead of measuring. An unreadable or foreign cache file is measured afresh and rewritten.
The entry keeps the 1-minute load average of the measurement: a CPU busy with other work favours
onnxruntime's non-spinning pool, so delete the entry to measure again on a quieter machine.

GPU backends are not measured: they keep their ``auto_rank`` order ahead of the CPU ones. The
measurement is skipped (the table's ``auto_rank`` order kept) when ``VDEPLOY_AUTO_MEASURE=0``, or when
the options leave a single CPU candidate. A backend that fails while measured goes last, with its reason.
Every decision is logged with its numbers and where they came from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from .atomic import write_text
from .platform import cache_dir, cpu_fingerprint

log = logging.getLogger("vdeploy.runtime")

ROUNDS = 5  # timed calls per backend (interleaved); the median decides
FORMAT = 1  # of the cache files; part of the key
LIBRARIES = {"cpu": ("onnxruntime",), "openvino": ("openvino",)}  # whose versions key a backend's timing


def library_versions(names) -> dict[str, str | None]:
    """The installed version of each candidate's libraries (read from the package metadata, no import)."""
    out = {}
    for name in names:
        for dist in LIBRARIES.get(name, (name,)):
            try:
                out[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                out[dist] = None
    return out


def ranking_key(graph_sha256: str, names, precision: str, threads: int | None) -> dict:
    """Everything a measured order depends on."""
    return {"format": FORMAT, "graph_sha256": graph_sha256, "cpu": cpu_fingerprint(),
            "candidates": sorted(names), "versions": library_versions(sorted(names)), "precision": precision,
            "threads": threads}


def cache_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "ranking" / f"{digest}.json"


def warmup_feeds(graph, video_shape: tuple, seed: int = 0) -> dict[str, np.ndarray]:
    """Batch-1 inputs of ``graph`` at the model's size: symbolic axis 0 is the batch, a symbolic axis of a
    5-D input takes the video's size at that axis; floats are standard normal, integers a mid timestep."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in graph.inputs:
        shape = [d if isinstance(d, int) else 1 if i == 0 else video_shape[i - 1] if len(spec.shape) == 5 else 1
                 for i, d in enumerate(spec.shape)]
        if np.issubdtype(np.dtype(spec.dtype), np.integer):
            feeds[spec.name] = np.full(shape, 10, dtype=spec.dtype)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feeds


def measure(names, model_dir: Path, manifest, graph_name: str, options, open_graph, *, rounds: int = ROUNDS) -> dict:
    """``{name: median ms per call or the error text}``: each backend opened on ``graph_name`` by
    ``open_graph(name, model_dir, manifest, graph_name, options)``, one untimed call, then ``rounds``
    interleaved timed calls; every backend closed again."""
    feeds = warmup_feeds(manifest.graphs[graph_name], manifest.video_shape)
    opened, times, result = {}, {}, {}
    try:
        for name in names:
            try:
                backend = opened[name] = open_graph(name, model_dir, manifest, graph_name, options)
                backend.run(feeds)
                times[name] = []
            except Exception as e:  # noqa: BLE001 (any failure puts the backend last, with its reason)
                result[name] = f"{type(e).__name__}: {e}"
        for _ in range(rounds):
            for name in times:
                start = time.perf_counter()
                opened[name].run(feeds)
                times[name].append(time.perf_counter() - start)
    finally:
        for backend in opened.values():
            backend.close()
    for name, ts in times.items():
        result[name] = round(float(np.median(ts)) * 1e3, 3)
    return result


def _load() -> float | None:
    """The 1-minute load average as measured (other work on the CPU skews the comparison; kept with it)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _read(path: Path, key: dict) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key or not isinstance(data.get("ms"), dict):
        return None
    return data


def rank(candidates: list[str], model_dir: Path, manifest, options, *, graph_for, device_of,
         open_graph) -> tuple[list[str], str | None]:
    """``candidates`` (already in table order) with the CPU ones reordered by measured speed, and why (None
    when nothing was measured). ``graph_for(name)`` names the graph a backend would run, ``device_of(name)``
    its device, ``open_graph`` opens one (``backends.open_graph``): the backends table is passed in, so this
    module imports nothing of it."""
    cpu = [n for n in candidates if device_of(n) == "cpu"]
    if len(cpu) < 2 or os.environ.get("VDEPLOY_AUTO_MEASURE", "1") == "0":
        return candidates, None
    graphs = {n: graph_for(n) for n in cpu}
    if len(set(graphs.values())) != 1 or None in graphs.values():  # different graphs: not one comparison
        return candidates, None
    graph_name = graphs[cpu[0]]
    sha = manifest.files.get(manifest.graphs[graph_name].file)
    if sha is None:
        return candidates, None
    key = ranking_key(sha, cpu, options.precision, options.threads)
    path = cache_path(key)
    data = _read(path, key)
    source = f"cached {path}"
    if data is None:
        started = time.perf_counter()
        data = {"key": key, "ms": measure(cpu, Path(model_dir), manifest, graph_name, options, open_graph),
                "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_1min": _load()}
        source = f"measured now in {time.perf_counter() - started:.1f} s, cached in {path}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text(path, json.dumps(data, indent=1) + "\n")
        except OSError as e:  # an unwritable cache only costs the next load a measurement
            source += f" (not written: {e})"
    ms = data["ms"]

    def cost(name):
        value = ms.get(name)
        return (0, value) if isinstance(value, (int, float)) else (1, 0.0)  # failed or unmeasured: last

    ordered_cpu = sorted(cpu, key=cost)  # stable: ties keep the table order
    it = iter(ordered_cpu)
    ordered = [next(it) if n in cpu else n for n in candidates]
    timings = ", ".join(f"{n} {ms[n]} ms" if isinstance(ms.get(n), (int, float)) else f"{n} failed ({ms.get(n)})"
                        for n in ordered_cpu)
    load = data.get("load_1min")
    why = (f"auto: {ordered_cpu[0]} first among the CPU backends, batch-1 call of {graph_name}: {timings} "
           f"({source}; 1-minute load {load} then; delete the file to measure again)")
    return ordered, why
