"""Load benchmark of ``vdeploy serve``: throughput, latency, errors, RSS and the batcher's per-call trace at
several concurrencies, step-level batching on vs off vs auto, in one run.

    python benchmarks/serve_load.py --json bench-out/serve.json --md bench-out/serve.md
    python benchmarks/serve_load.py --model demo/model --steps 25 --concurrency 1,2,4,8
    python benchmarks/serve_load.py --backend cuda --quick --json gpu-out/serve.json --md gpu-out/serve.md

Without ``--model`` it exports a random-weight model of ``--config`` (default ``small``: dim 32, mults
1,2,4,8, 8 frames, 32 px) with ``vdeploy.export.export_unet`` (needs the [train,export] extras; the weights
do not change the speed). For each mode it starts ``vdeploy serve --batching MODE`` as a subprocess on a
free 127.0.0.1 port (all at once: an idle server costs no CPU; each warms its batch shapes before
``/readyz`` answers 200), sends each a few requests at every concurrency level, then at each concurrency c
keeps c clients busy until ``--requests`` x c requests are answered (stdlib ``http.client``, one thread per
client), in ``--rounds`` rounds that alternate the order of the modes, so load from other processes that
drifts during the run hits all alike. Reported per (mode, c), the round with the best throughput (all rounds
are in the JSON): videos/min, p50/p95 latency, errors (non-200 answers), the server's RSS (VmRSS after the
level, and its peak VmHWM), and from the difference of ``/metrics`` over the level: denoiser calls, mean
real and padding rows per call, calls and mean seconds per call by batch size, shape changes per second,
the batcher's own seconds, and the share of the level's wall time the denoiser was not running (at
concurrency 1: the server's overhead per request: HTTP, parsing, sampler steps, encoding). ``--quick``
is a short run (3 requests per client, 1 round) for a GPU, where the whole run takes a minute or two.
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


def metrics(port: int) -> dict[str, float]:
    """``/metrics`` as ``{'name{labels}': value}`` (Prometheus text format, comments dropped)."""
    out = {}
    for line in get(port, "/metrics")[1].decode().splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$", line)
        if match:
            out[match.group(1)] = float(match.group(2))
    return out


def by_batch(snapshot: dict[str, float], name: str) -> dict[int, float]:
    """``name{batch="8"}`` samples as ``{8: value}``."""
    out = {}
    for key, value in snapshot.items():
        match = re.fullmatch(rf'{re.escape(name)}\{{batch="(\d+)"\}}', key)
        if match:
            out[int(match.group(1))] = value
    return out


def trace(before: dict, after: dict, wall: float) -> dict:
    """The batcher's per-call trace over a level, from two ``/metrics`` snapshots."""
    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    calls = delta("vdeploy_batch_rows_count")
    counts = {b: n - by_batch(before, "vdeploy_denoiser_call_seconds_count").get(b, 0)
              for b, n in by_batch(after, "vdeploy_denoiser_call_seconds_count").items()}
    sums = {b: s - by_batch(before, "vdeploy_denoiser_call_seconds_sum").get(b, 0)
            for b, s in by_batch(after, "vdeploy_denoiser_call_seconds_sum").items()}
    denoiser = sum(sums.values())
    return {
        "calls": int(calls),
        "rows_per_call": round(delta("vdeploy_batch_rows_sum") / calls, 2) if calls else None,
        "padded_per_call": round(delta("vdeploy_batch_padded_rows_sum") / calls, 2) if calls else None,
        "calls_by_batch": {b: int(n) for b, n in sorted(counts.items()) if n},
        "ms_per_call_by_batch": {b: round(1e3 * sums[b] / n, 1) for b, n in sorted(counts.items()) if n},
        "shape_changes_per_s": round(delta("vdeploy_shape_changes_total") / wall, 2),
        "denoiser_s": round(denoiser, 3),
        "batcher_s": round(delta("vdeploy_batcher_seconds_sum"), 3),
        "not_in_denoiser": round(1 - denoiser / wall, 4),
    }


def rss_mib(pid: int) -> tuple[float, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields.get("VmRSS", float("nan")), fields.get("VmHWM", float("nan"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its threads so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, model: Path, mode: str, log) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "vdeploy.cli", "serve", "--model", str(model), "--port", str(port),
           "--backend", args.backend, "--max-batch", str(args.max_batch), "--max-queue", str(max(args.levels) * 2),
           "--batching", mode, "--quiet"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.buckets:
        cmd += ["--buckets", args.buckets]
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    end = time.monotonic() + 600
    while get(port, "/readyz")[0] != 200:
        if server.poll() is not None or time.monotonic() > end:
            server.kill()
            raise SystemExit(f"vdeploy serve did not become ready (exit {server.poll()}); see the log")
        time.sleep(0.2)
    return server, port


def warmup_report(port: int, started: float) -> dict:
    """What the server's warm-up measured and decided (its gauges), and seconds from start to ready."""
    snapshot = metrics(port)
    return {"batching": bool(snapshot.get("vdeploy_batching")), "warmup_s": round(snapshot.get("vdeploy_warmup_seconds", 0), 2),
            "ready_after_s": round(time.monotonic() - started, 1),
            "ms_per_row_by_batch": {b: round(1e3 * v, 1) for b, v in sorted(by_batch(snapshot, "vdeploy_warmup_row_seconds").items())}}


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


def measure(args, server, port: int, mode: str, c: int, round_: int) -> dict:
    body = {"steps": args.steps, "sampler": args.sampler, "format": "npy"}
    if args.cond_scale is not None:
        body["cond_scale"] = args.cond_scale
    before, cpu = metrics(port), cpu_seconds(server.pid)
    latencies, errors, wall = fire(port, body, c, args.requests * c)
    after, cpu = metrics(port), cpu_seconds(server.pid) - cpu
    rss, peak = rss_mib(server.pid)
    row = {
        "mode": mode, "concurrency": c, "round": round_, "requests": args.requests * c,
        "ok": len(latencies), "errors": errors, "seconds": round(wall, 2),
        "videos_per_min": round(60 * len(latencies) / wall, 1),
        "p50_s": round(percentile(latencies, 0.5), 3) if latencies else None,
        "p95_s": round(percentile(latencies, 0.95), 3) if latencies else None,
        **trace(before, after, wall),
        "cpu_s": round(cpu, 2), "cpu_s_per_video": round(cpu / len(latencies), 3) if latencies else None,
        "rss_mib": round(rss), "peak_rss_mib": round(peak),
    }
    print(f"round {round_} {mode:>4} c={c}: {row['videos_per_min']} videos/min, p50 {row['p50_s']} s, "
          f"p95 {row['p95_s']} s, errors {errors}, rows/call {row['rows_per_call']} (+{row['padded_per_call']} "
          f"padding), calls {row['calls_by_batch']}, not in denoiser {100 * row['not_in_denoiser']:.1f}%, "
          f"CPU {row['cpu_s_per_video']} s/video, "
          f"RSS {row['rss_mib']} MiB", file=sys.stderr, flush=True)
    return row


def run(args, model: Path, log) -> tuple[list[dict], dict]:
    """Every mode's server up at once (an idle one costs no CPU); every level measured in rounds that rotate
    the order of the modes, so a load that drifts on a shared machine hits all alike."""
    modes = args.modes.split(",")
    servers, warmups = {}, {}
    try:
        for mode in modes:
            started = time.monotonic()
            servers[mode] = start_server(args, model, mode, log)
            warmups[mode] = warmup_report(servers[mode][1], started)
            print(f"server {mode}: {warmups[mode]}", file=sys.stderr, flush=True)
        warm = {"steps": args.steps, "sampler": args.sampler, "format": "npy", "seed": 0}
        for mode, (_, port) in servers.items():  # the HTTP path and each level's batch sizes once
            for c in args.levels:
                fire(port, warm, c, c)
        rows = []
        for c in args.levels:
            for round_ in range(args.rounds):
                shift = round_ % len(modes)
                order = modes[shift:] + modes[:shift]
                for mode in (order if round_ % 2 == 0 else order[::-1]):
                    server, port = servers[mode]
                    rows.append(measure(args, server, port, mode, c, round_))
        return rows, warmups
    finally:
        for mode, (server, _) in servers.items():
            server.terminate()
            try:
                code = server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                code = "killed"
            print(f"vdeploy serve (batching {mode}) exited {code} after SIGTERM", file=sys.stderr)


def best_rounds(rows: list[dict]) -> list[dict]:
    """Per (mode, concurrency) the round with the highest throughput (the least disturbed by other load)."""
    best = {}
    for row in rows:
        key = (row["mode"], row["concurrency"])
        if key not in best or row["videos_per_min"] > best[key]["videos_per_min"]:
            best[key] = row
    return [best[k] for k in sorted(best, key=lambda k: (k[0], k[1]))]


def comparison(rows: list[dict], best: list[dict]) -> list[dict]:
    """Per concurrency: each mode's throughput pooled over its rounds (videos answered / seconds, all rounds;
    the rounds interleave the modes, so other load hits each alike), auto against the better of on/off
    pooled, from the best rounds, and as the median over rounds of the per-round ratio; and the server's CPU
    seconds per video pooled (other processes' load changes it far less than it changes wall time):
    ``auto_vs_best_cpu`` is the better mode's CPU per video over auto's."""
    out = []
    for c in sorted({r["concurrency"] for r in best}):
        entry = {"concurrency": c}
        for mode in sorted({r["mode"] for r in rows}):
            mine = [r for r in rows if r["concurrency"] == c and r["mode"] == mode]
            entry[mode] = round(60 * sum(r["ok"] for r in mine) / sum(r["seconds"] for r in mine), 1)
            entry[f"{mode}_cpu_s_per_video"] = round(sum(r["cpu_s"] for r in mine) / max(1, sum(r["ok"] for r in mine)), 3)
        best_of = {r["mode"]: r["videos_per_min"] for r in best if r["concurrency"] == c}
        if all(m in entry for m in ("on", "off", "auto")):
            entry["auto_vs_best"] = round(entry["auto"] / max(entry["on"], entry["off"]), 3)
            entry["auto_vs_best_of_best_rounds"] = round(best_of["auto"] / max(best_of["on"], best_of["off"]), 3)
            entry["auto_vs_best_cpu"] = round(min(entry["on_cpu_s_per_video"], entry["off_cpu_s_per_video"])
                                              / entry["auto_cpu_s_per_video"], 3)
            per_round = {}
            for r in rows:
                if r["concurrency"] == c:
                    per_round.setdefault(r["round"], {})[r["mode"]] = r["videos_per_min"]
            ratios = sorted(v["auto"] / max(v["on"], v["off"]) for v in per_round.values()
                            if {"on", "off", "auto"} <= set(v) and max(v["on"], v["off"]) > 0)
            if ratios:
                entry["auto_vs_best_median_round"] = round(ratios[len(ratios) // 2], 3)
        if "on" in entry and "off" in entry and entry["off"]:
            entry["on_vs_off"] = round(entry["on"] / entry["off"], 3)
        out.append(entry)
    return out


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"`vdeploy serve` load, {report['date']}, {report['machine']}: model {s['model']} ({s['config']}), "
        f"{s['sampler']} {s['steps']} steps a request{', cond_scale ' + str(s['cond_scale']) if s['cond_scale'] else ''}, "
        f"backend {s['backend']}, max batch {s['max_batch']} rows, buckets {s['buckets'] or 'default'}, "
        f"{s['requests']} x c requests per level; best of {s['rounds']} interleaved rounds.",
        "",
        "Warm-up (each server before /readyz): " + "; ".join(
            f"{m}: batching {'on' if w['batching'] else 'off'}, {w['warmup_s']} s, ms/row by batch "
            + (" ".join(f"{b}:{v}" for b, v in w["ms_per_row_by_batch"].items()) or "-")
            for m, w in report["warmup"].items()) + ".",
        "",
    ]
    if any("auto_vs_best" in e for e in report["comparison"]):
        lines += ["Throughput pooled over the rounds (videos / seconds of all rounds); in brackets auto / better of "
                  "on, off from the best rounds, and the median round's ratio.", "",
                  "| concurrency | on videos/min | off | auto | auto / better of on, off (best rounds; median round) "
                  "| on / off | server CPU s/video on / off / auto | auto by CPU / video |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for e in report["comparison"]:
            lines.append(f"| {e['concurrency']} | {e.get('on')} | {e.get('off')} | {e.get('auto')} | "
                         f"{e.get('auto_vs_best')} ({e.get('auto_vs_best_of_best_rounds')}; "
                         f"{e.get('auto_vs_best_median_round')}) | {e.get('on_vs_off')} | "
                         f"{e.get('on_cpu_s_per_video')} / {e.get('off_cpu_s_per_video')} / "
                         f"{e.get('auto_cpu_s_per_video')} | {e.get('auto_vs_best_cpu')} |")
        lines.append("")
    lines += [
        "| batching | c | videos/min | p50 s | p95 s | errors | rows/call | padding/call | calls by batch | "
        "ms/call by batch | shape changes/s | not in denoiser | RSS MiB (peak) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: |",
    ]
    for r in report["best"]:
        calls = " ".join(f"{b}:{n}" for b, n in r["calls_by_batch"].items())
        ms = " ".join(f"{b}:{v}" for b, v in r["ms_per_call_by_batch"].items())
        lines.append(f"| {r['mode']} | {r['concurrency']} | {r['videos_per_min']} | {r['p50_s']} | {r['p95_s']} | "
                     f"{r['errors']} | {r['rows_per_call']} | {r['padded_per_call']} | {calls} | {ms} | "
                     f"{r['shape_changes_per_s']} | {100 * r['not_in_denoiser']:.1f}% | {r['rss_mib']} ({r['peak_rss_mib']}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a model directory (default: export a random --config model)")
    parser.add_argument("--config", default="small", help="preset of the random model (default: small)")
    parser.add_argument("--steps", type=int, default=4, help="denoiser steps a request (default: 4)")
    parser.add_argument("--sampler", default="dpmpp")
    parser.add_argument("--cond-scale", type=float, default=None,
                        help="guidance scale of every request (a conditioned --model; guided rows count two)")
    parser.add_argument("--concurrency", default="1,2,4,8", help="client counts (default: 1,2,4,8)")
    parser.add_argument("--requests", type=int, default=2, help="requests per client at each level (default: 2)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per level, mode order rotating (default: 2)")
    parser.add_argument("--quick", action="store_true",
                        help="a short run (a GPU in a minute or two): --requests 3 --rounds 1 unless given")
    parser.add_argument("--backend", default="cpu", help="vdeploy serve --backend (default: cpu, onnxruntime)")
    parser.add_argument("--threads", type=int, default=None, help="vdeploy serve --threads")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--buckets", default=None, help="vdeploy serve --buckets (default: the server's)")
    parser.add_argument("--modes", default="on,off,auto", help="batching modes to run (default: on,off,auto)")
    parser.add_argument("--json", type=Path, help="write the report as JSON")
    parser.add_argument("--md", type=Path, help="write the markdown table")
    args = parser.parse_args(argv)
    if args.quick:
        given = set(argv if argv is not None else sys.argv[1:])
        args.requests = args.requests if "--requests" in given else 3
        args.rounds = args.rounds if "--rounds" in given else 1
    args.levels = [int(c) for c in args.concurrency.split(",")]
    for mode in args.modes.split(","):
        if mode not in ("on", "off", "auto"):
            parser.error(f"--modes: {mode!r} is not one of on, off, auto")
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
            rows, warmups = run(args, model, log)
        server_log = log_path.read_text()
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "settings": {"model": str(args.model or f"random {args.config}"), "config": args.config, "steps": args.steps,
                     "sampler": args.sampler, "cond_scale": args.cond_scale, "backend": args.backend,
                     "max_batch": args.max_batch, "buckets": args.buckets, "requests": args.requests,
                     "rounds": args.rounds},
        "warmup": warmups,
        "best": best_rounds(rows),
        "rows": rows,
        "server_log_tail": server_log[-2000:],
    }
    report["comparison"] = comparison(rows, report["best"])
    table = markdown(report)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.md:
        args.md.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
