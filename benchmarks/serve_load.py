"""Load benchmark of ``vdeploy serve``: throughput, latency, errors and RSS at several concurrencies,
step-level batching on vs off, in one run.

    python benchmarks/serve_load.py --json bench-out/serve.json --md bench-out/serve.md
    python benchmarks/serve_load.py --model demo/model --steps 25 --concurrency 1,2,4,8
    python benchmarks/serve_load.py --backend cuda --max-batch 16          # on a GPU machine

Without ``--model`` it exports a random-weight model of ``--config`` (default ``small``: dim 32, mults
1,2,4,8, 8 frames, 32 px) with ``vdeploy.export.export_unet`` (needs the [train,export] extras; the weights
do not change the speed). For each mode it starts ``vdeploy serve`` as a subprocess on a free 127.0.0.1
port (both at once: an idle server costs no CPU), warms each up at every concurrency level, then at each
concurrency c keeps c clients busy until ``--requests`` x c requests are answered (stdlib ``http.client``,
one thread per client), in ``--rounds`` rounds that alternate the modes, so load from other processes that
drifts during the run hits both alike. Reported per (mode, c), the round with the best throughput (all
rounds are in the JSON): videos/min, p50/p95 latency, errors (non-200 answers), the server's RSS (VmRSS
after the level, and its peak VmHWM), and the mean rows per denoiser call from ``/metrics``.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def export_random_model(preset: str, out: Path) -> Path:
    import torch

    from vdeploy import config as vconfig
    from vdeploy.export import export_unet
    from vdeploy.model import Unet3D

    torch.manual_seed(0)
    config = vconfig.load(preset)
    unet = Unet3D(**vconfig.unet_kwargs(config))
    export_unet(unet, config, out, source={"checkpoint": f"random {preset}", "step": 0}, optimize="none")
    return out


def post(port: int, body: dict, timeout: float = 600) -> tuple[int, float]:
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/videos", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        status = response.status
    except OSError:
        status = -1
    finally:
        conn.close()
    return status, time.perf_counter() - start


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    except OSError:
        return -1, b""
    finally:
        conn.close()


def metric(port: int, name: str) -> float:
    text = get(port, "/metrics")[1].decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else float("nan")


def rss_mib(pid: int) -> tuple[float, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields.get("VmRSS", float("nan")), fields.get("VmHWM", float("nan"))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, model: Path, batching: bool, log) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "vdeploy.cli", "serve", "--model", str(model), "--port", str(port),
           "--backend", args.backend, "--max-batch", str(args.max_batch), "--max-queue", str(max(args.levels) * 2),
           "--batching" if batching else "--no-batching", "--quiet"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    end = time.monotonic() + 300
    while get(port, "/readyz")[0] != 200:
        if server.poll() is not None or time.monotonic() > end:
            server.kill()
            raise SystemExit(f"vdeploy serve did not become ready (exit {server.poll()}); see the log")
        time.sleep(0.2)
    return server, port


def fire(port: int, body: dict, clients: int, total: int) -> tuple[list[float], int, float]:
    """``clients`` threads send ``total`` requests between them; returns latencies of the 200s, errors, wall."""
    latencies, errors, lock = [], 0, threading.Lock()
    count = iter(range(total))

    def client():
        nonlocal errors
        for i in count:
            status, seconds = post(port, {**body, "seed": i})
            with lock:
                if status == 200:
                    latencies.append(seconds)
                else:
                    errors += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors, time.perf_counter() - start


def measure(args, server, port: int, batching: bool, c: int, round_: int) -> dict:
    body = {"steps": args.steps, "sampler": args.sampler, "format": "npy"}
    calls0, rows0 = metric(port, "vdeploy_batch_rows_count"), metric(port, "vdeploy_batch_rows_sum")
    latencies, errors, wall = fire(port, body, c, args.requests * c)
    calls = metric(port, "vdeploy_batch_rows_count") - calls0
    rss, peak = rss_mib(server.pid)
    row = {
        "batching": batching, "concurrency": c, "round": round_, "requests": args.requests * c,
        "ok": len(latencies), "errors": errors, "seconds": round(wall, 2),
        "videos_per_min": round(60 * len(latencies) / wall, 1),
        "p50_s": round(percentile(latencies, 0.5), 3) if latencies else None,
        "p95_s": round(percentile(latencies, 0.95), 3) if latencies else None,
        "rows_per_call": round((metric(port, "vdeploy_batch_rows_sum") - rows0) / calls, 2) if calls else None,
        "rss_mib": round(rss), "peak_rss_mib": round(peak),
    }
    print(f"round {round_} batching {'on ' if batching else 'off'} c={c}: {row['videos_per_min']} videos/min, "
          f"p50 {row['p50_s']} s, p95 {row['p95_s']} s, errors {errors}, rows/call {row['rows_per_call']}, "
          f"RSS {row['rss_mib']} MiB", file=sys.stderr, flush=True)
    return row


def run(args, model: Path, log) -> list[dict]:
    """Both servers up at once (an idle one costs no CPU); every level measured in rounds that alternate the
    modes (on, off, off, on, ...), so a load that drifts on a shared machine hits both alike."""
    modes = [mode == "on" for mode in args.modes.split(",")]
    servers = {}
    try:
        for batching in modes:
            servers[batching] = start_server(args, model, batching, log)
        warm = {"steps": args.steps, "sampler": args.sampler, "format": "npy", "seed": 0}
        for batching, (_, port) in servers.items():  # every batch size the levels will see (graph caches, arenas)
            for c in args.levels:
                fire(port, warm, c, c)
        rows = []
        for c in args.levels:
            for round_ in range(args.rounds):
                for batching in (modes if round_ % 2 == 0 else modes[::-1]):
                    server, port = servers[batching]
                    rows.append(measure(args, server, port, batching, c, round_))
        return rows
    finally:
        for batching, (server, _) in servers.items():
            server.terminate()
            try:
                code = server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                code = "killed"
            print(f"vdeploy serve (batching {'on' if batching else 'off'}) exited {code} after SIGTERM", file=sys.stderr)


def best_rounds(rows: list[dict]) -> list[dict]:
    """Per (mode, concurrency) the round with the highest throughput (the least disturbed by other load)."""
    best = {}
    for row in rows:
        key = (row["batching"], row["concurrency"])
        if key not in best or row["videos_per_min"] > best[key]["videos_per_min"]:
            best[key] = row
    return [best[k] for k in sorted(best, key=lambda k: (not k[0], k[1]))]


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"`vdeploy serve` load, {report['date']}, {report['machine']}: model {s['model']} ({s['config']}), "
        f"{s['sampler']} {s['steps']} steps a request, backend {s['backend']}, max batch {s['max_batch']} rows, "
        f"{s['requests']} x c requests per level; best of {s['rounds']} alternating rounds.",
        "",
        "| batching | concurrency | videos/min | p50 s | p95 s | errors | rows/call | RSS MiB (peak) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["best"]:
        lines.append(f"| {'on' if r['batching'] else 'off'} | {r['concurrency']} | {r['videos_per_min']} | {r['p50_s']} | "
                     f"{r['p95_s']} | {r['errors']} | {r['rows_per_call']} | {r['rss_mib']} ({r['peak_rss_mib']}) |")
    on = {r["concurrency"]: r for r in report["best"] if r["batching"]}
    off = {r["concurrency"]: r for r in report["best"] if not r["batching"]}
    ratios = [f"c={c}: {on[c]['videos_per_min'] / off[c]['videos_per_min']:.2f}x"
              for c in sorted(on) if c in off and off[c]["videos_per_min"]]
    if ratios:
        lines += ["", "Throughput, batching on / off: " + ", ".join(ratios) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a model directory (default: export a random --config model)")
    parser.add_argument("--config", default="small", help="preset of the random model (default: small)")
    parser.add_argument("--steps", type=int, default=4, help="denoiser steps a request (default: 4)")
    parser.add_argument("--sampler", default="dpmpp")
    parser.add_argument("--concurrency", default="1,2,4,8", help="client counts (default: 1,2,4,8)")
    parser.add_argument("--requests", type=int, default=2, help="requests per client at each level (default: 2)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per level, modes alternating (default: 2)")
    parser.add_argument("--backend", default="cpu", help="vdeploy serve --backend (default: cpu, onnxruntime)")
    parser.add_argument("--threads", type=int, default=None, help="vdeploy serve --threads")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--modes", default="on,off", help="batching modes to run: on,off (default both)")
    parser.add_argument("--json", type=Path, help="write the report as JSON")
    parser.add_argument("--md", type=Path, help="write the markdown table")
    args = parser.parse_args(argv)
    args.levels = [int(c) for c in args.concurrency.split(",")]
    for path in (args.json, args.md):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vdeploy-serve-load-") as tmp:
        model = args.model
        if model is None:
            print(f"exporting a random-weight {args.config} model ...", file=sys.stderr, flush=True)
            model = export_random_model(args.config, Path(tmp) / "model")
        log_path = Path(tmp) / "serve.log"
        with open(log_path, "w") as log:
            rows = run(args, model, log)
        server_log = log_path.read_text()
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "settings": {"model": str(args.model or f"random {args.config}"), "config": args.config, "steps": args.steps,
                     "sampler": args.sampler, "backend": args.backend, "max_batch": args.max_batch,
                     "requests": args.requests, "rounds": args.rounds},
        "best": best_rounds(rows),
        "rows": rows,
        "server_log_tail": server_log[-2000:],
    }
    table = markdown(report)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.md:
        args.md.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
