"""Where a batching server's time and memory go, per batch shape: the measurements behind README "Serving".

    python benchmarks/serve_shapes.py --model M --json shapes.json --md shapes.md

Two parts, on one model directory (default: a random-weight ``--config`` model, as ``serve_load.py``):

1. **onnxruntime per shape** (``--backend cpu`` only) under four arena settings (``default``: the runtime's
   session options; ``no-mem-pattern``: ``enable_mem_pattern=False``; ``no-arena``:
   ``enable_cpu_mem_arena=False``; ``shrink``: each run with ``memory.enable_memory_arena_shrinkage``): in a
   subprocess per setting, calls of batch 1, 2, 4, 8, each twice (the first meets the shape), with the
   process's RSS after each; then in one process, a session of each setting, ``--repeats`` rounds of every
   batch and setting interleaved, for the warm seconds per row (fastest and median).
2. **The batcher's call trace** in process: ``--clients`` threads each send ``--requests`` requests (dpmpp,
   ``--steps``) to a batching ``Batcher``, once with a bucket for every size 1..max batch and no cost
   preference (one call of exactly the active rows a step: the batcher before buckets), once with the
   default buckets warmed and timed: calls per batch size, distinct shapes, shape changes per second,
   seconds per call by batch (the first call of each shape apart: it meets the shape cold).

Numbers vary with the machine's load; run it on a quiet machine or read the medians.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ARENAS = ("default", "no-mem-pattern", "no-arena", "shrink")
SIZES = (1, 2, 4, 8)


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _session(model: Path, arena: str, threads: int | None):
    """An onnxruntime CPU session of the model's plain graph under ``arena``, its run options, and ``feeds(b)``."""
    import numpy as np

    from vdeploy.runtime.manifest import load
    from vdeploy.runtime.platform import import_onnxruntime, ort_session_options

    ort = import_onnxruntime()
    manifest = load(model, verify=False)
    graph = manifest.graphs[manifest.find_graph(guidance=False)]
    options = ort_session_options(ort, threads)
    run_options = None
    if arena == "no-mem-pattern":
        options.enable_mem_pattern = False
    elif arena == "no-arena":
        options.enable_cpu_mem_arena = False
    elif arena == "shrink":
        run_options = ort.RunOptions()
        run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    session = ort.InferenceSession(str(model / graph.file), sess_options=options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    c, f, h, w = manifest.video_shape
    roles = {i.name: i.role for i in graph.inputs}

    def feeds(b):
        out = {}
        for spec in session.get_inputs():
            role = roles.get(spec.name, spec.name)
            if role == "t":
                out[spec.name] = np.full((b,), 10, np.int64)
            elif role == "cond":
                out[spec.name] = rng.standard_normal((b, manifest.cond_dim), dtype=np.float32)
            elif role == "mask":
                out[spec.name] = np.zeros((b, f), np.float32)
            else:  # x, frames
                out[spec.name] = rng.standard_normal((b, c, f, h, w), dtype=np.float32)
        return out

    return session, run_options, feeds


def arena_rss(model: Path, arena: str, threads: int | None) -> dict:
    """Part 1's memory for one arena setting (a subprocess of its own: RSS is per process)."""
    session, run_options, feeds = _session(model, arena, threads)
    report = {"arena": arena, "rss_open_mib": round(rss_mib()), "first_calls": []}
    for b in SIZES:
        inputs = feeds(b)
        for which in ("first", "second"):
            start = time.perf_counter()
            session.run(None, inputs, run_options)
            report["first_calls"].append({"batch": b, "call": which, "s": round(time.perf_counter() - start, 3),
                                          "rss_mib": round(rss_mib())})
    return report


def arena_timing(model: Path, repeats: int, threads: int | None) -> dict:
    """Part 1's time: every setting's session in this process, rounds of every batch and setting interleaved."""
    sessions = {arena: _session(model, arena, threads) for arena in ARENAS}
    inputs = {b: sessions["default"][2](b) for b in SIZES}
    for session, run_options, _ in sessions.values():
        for b in SIZES:
            session.run(None, inputs[b], run_options)
    times = {(a, b): [] for a in ARENAS for b in SIZES}
    for r in range(repeats):
        for b in (SIZES if r % 2 == 0 else SIZES[::-1]):
            for arena in (ARENAS if r % 2 == 0 else ARENAS[::-1]):
                session, run_options, _ = sessions[arena]
                start = time.perf_counter()
                session.run(None, inputs[b], run_options)
                times[(arena, b)].append(time.perf_counter() - start)
    return {arena: {str(b): {"min": round(1e3 * min(times[(arena, b)]) / b, 1),
                             "median": round(1e3 * statistics.median(times[(arena, b)]) / b, 1)} for b in SIZES}
            for arena in ARENAS}


def trace_run(pipe, buckets, warm: bool, clients: int, requests: int, steps: int, max_batch: int) -> dict:
    """Part 2 for one bucket setting."""
    from vdeploy.runtime.serve import Batcher

    calls = []
    batcher = Batcher(pipe, max_batch=max_batch, batching="on", buckets=buckets, warm=warm,
                      on_call=lambda trace: calls.append((trace.batch, trace.denoise_s, trace.shape_changed)))
    count = iter(range(clients * requests))

    def client():
        for i in count:
            batcher.submit(seed=i, steps=steps, sampler="dpmpp").result(timeout=600)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    batcher.close()
    seen, cold, warm_calls = set(), {}, {}
    for batch, seconds, _ in calls:
        if batch not in seen:
            seen.add(batch)
            cold[batch] = seconds
        else:
            warm_calls.setdefault(batch, []).append(seconds)
    return {
        "buckets": ",".join(map(str, batcher.buckets)), "warmed": warm, "wall_s": round(wall, 2),
        "videos_per_min": round(60 * clients * requests / wall, 1), "calls": len(calls),
        "distinct_shapes": len(seen),
        "calls_by_batch": {b: sum(1 for c in calls if c[0] == b) for b in sorted(seen)},
        "shape_changes_per_s": round(sum(1 for c in calls if c[2]) / wall, 2),
        "first_call_ms_by_batch": {b: round(1e3 * cold[b], 1) for b in sorted(cold)},
        "warm_ms_per_call_by_batch": {b: round(1e3 * statistics.median(v), 1) for b, v in sorted(warm_calls.items())},
    }


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"Batch shapes, {report['date']}, {report['machine']}: model {s['model']}, backend {s['backend']}.", ""]
    if report["arenas"]:
        lines += ["| arena | RSS after batch 1 / 2 / 4 / 8 (MiB) | 1st / 2nd call s, batch 4 | batch 8 | "
                  "ms/row at 1 / 2 / 4 / 8 (fastest; median) |", "| --- | --- | --- | --- | --- |"]
        for a in report["arenas"]:
            rss = " / ".join(str(c["rss_mib"]) for c in a["first_calls"] if c["call"] == "second")
            pair = {b: " / ".join(str(c["s"]) for c in a["first_calls"] if c["batch"] == b) for b in (4, 8)}
            ms = " / ".join(str(a["ms_per_row"][str(b)]["min"]) for b in SIZES)
            med = " / ".join(str(a["ms_per_row"][str(b)]["median"]) for b in SIZES)
            lines.append(f"| {a['arena']} | {rss} | {pair[4]} | {pair[8]} | {ms}; {med} |")
        lines.append("")
    lines += ["| batcher | videos/min | calls | shapes | calls by batch | shape changes/s | first call ms by batch "
              "| warm ms/call by batch |", "| --- | ---: | ---: | ---: | --- | ---: | --- | --- |"]
    for t in report["traces"]:
        fmt = lambda d: " ".join(f"{k}:{v}" for k, v in d.items())  # noqa: E731
        name = f"buckets {t['buckets']}" + (" (warmed)" if t["warmed"] else " (one call of the active rows)")
        lines.append(f"| {name} | {t['videos_per_min']} | {t['calls']} | {t['distinct_shapes']} | "
                     f"{fmt(t['calls_by_batch'])} | {t['shape_changes_per_s']} | {fmt(t['first_call_ms_by_batch'])} | "
                     f"{fmt(t['warm_ms_per_call_by_batch'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a model directory (default: export a random --config model)")
    parser.add_argument("--config", default="small")
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per arena setting (default 5)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2, help="requests per client (default 2)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--skip", default="", help="arenas,trace: parts to leave out")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    parser.add_argument("--_arena", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._arena:
        print(json.dumps(arena_rss(args.model, args._arena, args.threads)))
        return 0
    skip = set(filter(None, args.skip.split(",")))
    with tempfile.TemporaryDirectory(prefix="vdeploy-serve-shapes-") as tmp:
        model = args.model
        if model is None:
            sys.path.insert(0, str(Path(__file__).parent))
            from serve_load import export_random_model

            print(f"exporting a random-weight {args.config} model ...", file=sys.stderr, flush=True)
            model = export_random_model(args.config, Path(tmp) / "model")
        arenas = []
        if "arenas" not in skip and args.backend == "cpu":
            for arena in ARENAS:
                cmd = [sys.executable, __file__, "--model", str(model), "--_arena", arena]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                arenas.append(json.loads(out.strip().splitlines()[-1]))
                print(f"arena {arena}: {arenas[-1]}", file=sys.stderr, flush=True)
            timing = arena_timing(model, args.repeats, args.threads)
            for entry in arenas:
                entry["ms_per_row"] = timing[entry["arena"]]
            print(f"arena timing: {timing}", file=sys.stderr, flush=True)
        traces = []
        if "trace" not in skip:
            from vdeploy.runtime import Pipeline

            pipe = Pipeline.from_dir(model, backend=args.backend, threads=args.threads)
            every = ",".join(str(b) for b in range(1, args.max_batch + 1))
            for buckets, warm in ((every, False), (None, True)):
                traces.append(trace_run(pipe, buckets, warm, args.clients, args.requests, args.steps, args.max_batch))
                print(f"trace: {traces[-1]}", file=sys.stderr, flush=True)
            pipe.close()
    report = {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "settings": {"model": str(args.model or f"random {args.config}"), "backend": args.backend,
                     "clients": args.clients, "requests": args.requests, "steps": args.steps},
        "arenas": arenas, "traces": traces,
    }
    table = markdown(report)
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
