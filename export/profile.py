"""Where an exported graph spends its time: onnxruntime's profiler, summed by op type and by model part.

    python -m vdeploy.export.profile MODEL_DIR [--graph denoiser] [--batch 1] [--threads 2] [--runs 10]

Op types are ORT's kernels after its graph optimizations (``FusedMatMul``, ``ReorderInput`` of the
NCHWc layout, ...); model parts come from the node names the tracer gives (``/unet/downs.0.3/...``):
``temporal_attn``, ``linear_attn``, ``spatial_attn``, ``resnet``, ``up/down``, ``layout`` (NCHWc
reorders), ``other``. Per-node times are medians over the profiled runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

_PARTS = (
    ("temporal_attn", re.compile(r"temporal_attn|/(downs|ups)\.\d+\.3/")),
    ("spatial_attn", re.compile(r"mid_spatial_attn")),
    ("linear_attn", re.compile(r"/(downs|ups)\.\d+\.2/")),
    ("up/down", re.compile(r"/(downs|ups)\.\d+\.4/")),
    ("resnet", re.compile(r"block\d|res_conv|mid_block|final_conv|/(downs|ups)\.\d+\.[01]/")),
    ("time_mlp", re.compile(r"time_mlp")),
    ("layout", re.compile(r"^Reorder")),
)


def model_part(node_name: str) -> str:
    for part, pattern in _PARTS:
        if pattern.search(node_name):
            return part
    return "other"


def profile_graph(path: str | Path, feed: dict[str, np.ndarray], *, threads: int = 2, runs: int = 10,
                  warmup: int = 2) -> dict:
    """Profile ``runs`` calls of ``path`` on ``feed`` (onnxruntime CPU, ``threads`` intra-op threads).

    Returns:
        ``{"run_ms": median per-call time, "by_op": {op: share}, "by_part": {part: share},
        "top_nodes": [(node, op, ms), ...]}``; shares are fractions of the summed kernel time.
    """
    import onnxruntime as ort

    from vdeploy.runtime.platform import ort_session_options

    so = ort_session_options(ort, threads)
    so.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        so.profile_file_prefix = os.path.join(tmp, "ort")
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        for _ in range(runs + warmup):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_node: dict[str, list[float]] = defaultdict(list)
    op_of: dict[str, str] = {}
    run_ms = []
    for e in events:
        if e.get("name") == "model_run":
            run_ms.append(e["dur"] / 1e3)
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            name = e["name"][: -len("_kernel_time")]
            per_node[name].append(e["dur"] / 1e3)
            op_of[name] = e["args"].get("op_name", "?")
    medians = {n: float(np.median(v[warmup:] or v)) for n, v in per_node.items()}
    total = sum(medians.values()) or 1.0
    by_op: dict[str, float] = defaultdict(float)
    by_part: dict[str, float] = defaultdict(float)
    for name, ms in medians.items():
        by_op[op_of[name]] += ms / total
        by_part[model_part(name)] += ms / total
    top = sorted(medians.items(), key=lambda kv: -kv[1])[:15]
    return {
        "run_ms": float(np.median(run_ms[warmup:] or run_ms)),
        "kernel_ms": total,
        "by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
        "by_part": dict(sorted(by_part.items(), key=lambda kv: -kv[1])),
        "top_nodes": [(n, op_of[n], round(ms, 3)) for n, ms in top],
    }


def _feed(model_dir: Path, graph: dict, config: dict, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    size = config["image_size"]
    feed = {}
    for spec in graph["inputs"]:
        shape = [batch if d == "batch" else size if isinstance(d, str) else d for d in spec["shape"]]
        if spec["dtype"] == "int64":
            feed[spec["name"]] = rng.integers(0, config["timesteps"], size=shape, dtype=np.int64)
        else:
            feed[spec["name"]] = rng.standard_normal(shape, dtype=np.float32)
    return feed


def main(argv: list[str] | None = None) -> None:
    from vdeploy.runtime.manifest import load

    parser = argparse.ArgumentParser(description="onnxruntime op profile of an exported graph")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--graph", default="denoiser")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    manifest = load(args.model_dir)
    graph = manifest["graphs"][args.graph]
    result = profile_graph(args.model_dir / graph["file"], _feed(args.model_dir, graph, manifest["config"], args.batch),
                           threads=args.threads, runs=args.runs)
    print(f"{graph['file']}: {result['run_ms']:.1f} ms per call (profiled), batch {args.batch}, {args.threads} threads")
    print("by op:   " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in list(result["by_op"].items())[:12]))
    print("by part: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in result["by_part"].items()))
    for name, op, ms in result["top_nodes"][:10]:
        print(f"  {ms:7.2f} ms  {op:14s} {name}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
