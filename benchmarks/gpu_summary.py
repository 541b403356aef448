#!/usr/bin/env python
"""benchmarks/gpu.sh's last step: one summary of a run folder (OUT/summary.json, OUT/summary.md).

    python benchmarks/gpu_summary.py OUT

Reads what the steps wrote (steps.jsonl, env.json, parity/parity.json, latency.json, compile.json,
serve.json), each optional: a missing or broken file becomes a line saying so. No torch, no vdeploy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(path: Path, problems: list):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        problems.append(f"{path.name}: not written")
    except (OSError, ValueError) as e:
        problems.append(f"{path.name}: unreadable ({e})")
    return None


def _fmt(v, digits=3):
    if v is None:
        return ""
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _judged(r: dict) -> str:
    if r.get("min_psnr_db") is not None:
        return f"PSNR >= {r['min_psnr_db']:g} dB"
    return f"atol {r['atol']:g}" if r.get("atol") is not None else ""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0])
    problems: list[str] = []
    steps = []
    try:
        steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        problems.append(f"steps.jsonl: {e}")
    env = _load(out / "env.json", problems) or {}
    parity = _load(out / "parity" / "parity.json", problems)
    latency = _load(out / "latency.json", problems)
    compiled = _load(out / "compile.json", problems)
    serve = _load(out / "serve.json", problems) if (out / "serve.json").exists() else None
    device = _load(out / "device.json", problems)
    fp16_choice = _load(out / "fp16" / "fp16_choice.json", problems) if (out / "fp16").exists() else None
    kernels = _load(out / "kernels.json", problems) if (out / "kernels.json").exists() else None

    per_call = {}
    for source in (latency, compiled):
        for name, r in ((source or {}).get("results") or {}).items():
            if name in per_call and source is compiled:
                name = f"{name} (compile run)"
            per_call[name] = {
                "precision": r.get("precision"), "status": r.get("status"), "error": r.get("error"),
                "ms": {b: t.get("median") for b, t in (r.get("per_call_ms") or {}).items()},
                "first_call_s": r.get("first_call_s"), "max_abs_err_vs_torch": r.get("max_abs_err_vs_torch"),
                "gpu_peak_mib": r.get("gpu_peak_mib"), "gpu_used_mib": r.get("gpu_used_mib"),
            }
    sampling = (latency or {}).get("sampling") or {}
    outside = {k: v.get("loop_overhead_pct") for k, v in sampling.items() if isinstance(v, dict) and "loop_overhead_pct" in v}
    summary = {"env": env, "steps": steps, "parity": parity, "per_call": per_call,
               "time_outside_denoiser_pct": outside, "device_path": device, "fp16_choice": fp16_choice,
               "kernels": kernels, "serve": serve, "problems": problems}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))

    lines = [f"# vdeploy GPU checks: {env.get('gpu') or env.get('nvidia_smi') or env.get('device', '?')}", "",
             f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), onnxruntime {env.get('onnxruntime')} "
             f"{env.get('providers')}, onnx {env.get('onnx')}, numpy {env.get('numpy')}, cupy {env.get('cupy')}", "",
             "| step | rc | seconds | timeout |", "| --- | --- | --- | --- |"]
    lines += [f"| {s.get('step')} | {s.get('rc') if s.get('rc') is not None else s.get('skipped')} | {s.get('seconds')} | "
              f"{s.get('timeout_s')} |" for s in steps]
    if parity:
        lines += ["", "## Parity (random tiny model; the onnxruntime CPU fp32 row is the reference path's own error)", "",
                  "| sampler | steps | backend | precision | worst per call | final | PSNR dB | judged by | result |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in parity.get("runs", []):
            result = r.get("error") or ("pass" if r.get("passed") else "FAIL")
            lines.append(f"| {r.get('sampler')} | {r.get('steps') or ''} | {r.get('backend')} | {r.get('precision')} | "
                         f"{_fmt(r.get('worst_per_call'))} | {_fmt(r.get('final'))} | {_fmt(r.get('psnr_db'))} | "
                         f"{_judged(r)} | {result[:120]} |")
        for g in parity.get("graph", []):
            lines.append(f"\none call at {g.get('precision')}: max abs diff from onnxruntime CPU fp32 "
                         f"{_fmt(g.get('max_abs_diff_vs_ort_cpu_fp32')) or g.get('error')} (output scale {_fmt(g.get('scale'))})")
    if per_call:
        batches = sorted({b for r in per_call.values() for b in r["ms"]}, key=int)
        lines += ["", f"## Per call ({(latency or compiled or {}).get('config', {}).get('name', '')}), median ms", "",
                  "| row | precision | " + " | ".join(f"b{b}" for b in batches) + " | err vs torch fp32 | first call s | "
                  "GPU peak MiB (torch) | status |",
                  "| --- | --- | " + " | ".join("---" for _ in batches) + " | --- | --- | --- | --- |"]
        for name, r in per_call.items():
            lines.append(f"| {name} | {r['precision']} | " + " | ".join(_fmt(r["ms"].get(b)) for b in batches)
                         + f" | {_fmt(r['max_abs_err_vs_torch'])} | {r['first_call_s'] or ''} | {r['gpu_peak_mib'] or ''} | "
                         f"{r['status']}{': ' + r['error'][:100] if r['error'] else ''} |")
    if outside:
        lines += ["", "time outside the denoiser (% of sampling): "
                  + ", ".join(f"{k} {v}" for k, v in outside.items())]
    if device:
        lines += ["", f"## Device loop vs host loop ({device.get('backend')}, batch {device.get('batch')}, video "
                  f"{device.get('video_shape')}, CUDA graph: {device.get('cuda_graph')}, {device.get('namespace')})",
                  "", "| sampler | steps | path | ms per step | denoiser ms | outside the denoiser % (whole run) | "
                  "outside the denoiser % (steps alone) | video diff |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, entry in (device.get("samplers") or {}).items():
            if entry.get("error"):
                lines.append(f"| {name} | {entry.get('steps')} | error | {entry['error'][:120]} | | | | |")
                continue
            for path in ("host", "device"):
                d = entry.get(path) or {}
                lines.append(f"| {name} | {entry.get('steps')} | {path} | {d.get('ms_per_step')} | "
                             f"{d.get('denoiser_ms_per_step')} | {d.get('outside_denoiser_pct')} | "
                             f"{d.get('steps_outside_denoiser_pct', '')} | "
                             f"{_fmt(entry.get('video_max_abs_diff')) if path == 'device' else ''} |")
        for name, entry in (device.get("samplers") or {}).items():
            top = entry.get("device_profile") or []
            if top:
                lines += ["", f"{name}, the device run's costliest functions (own ms per step): "
                          + "; ".join(f"{r['function']} {r['own_ms_per_step']} ({r['calls_per_step']}/step)"
                                      for r in top[:8])]
    if kernels:
        lines += ["", f"## GPU time of one call by kernel kind (batch {kernels.get('batch')}, CUDA graphs off)", "",
                  "| run | GPU ms / call | kernels / call | by kind: ms (share) |", "| --- | --- | --- | --- |"]
        for name, r in (kernels.get("runs") or {}).items():
            if r.get("error"):
                lines.append(f"| {name} | error: {r['error'][:120]} | | |")
                continue
            kinds = ", ".join(f"{k} {v['ms_per_call']} ({v['share_pct']}%)" for k, v in r["by_kind"].items())
            lines.append(f"| {name} | {r['gpu_ms_per_call']} | {r['kernels_per_call']} | {kinds} |")
    if fp16_choice:
        lines += ["", "## fp16 graph: converter + block list vs half-precision torch export "
                  f"({fp16_choice.get('device')}, {fp16_choice.get('sampler')} {fp16_choice.get('steps')} steps)", "",
                  "| config | candidate | one call vs ORT CPU fp32 | worst per call | final | PSNR dB | ms per call | error |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in fp16_choice.get("rows", []):
            lines.append(f"| {r.get('config')} | {r.get('candidate')} | {_fmt(r.get('one_call_max_abs_diff'))} | "
                         f"{_fmt(r.get('worst_per_call'))} | {_fmt(r.get('final'))} | {_fmt(r.get('psnr_db'))} | "
                         f"{json.dumps(r.get('ms_per_call', ''))} | {(r.get('error') or '')[:100]} |")
    if serve is not None:
        lines += ["", "serving: serve.md / serve.json"]
    skipped = {s.get("step") for s in steps if s.get("skipped")}  # not run: nothing of theirs is missing
    files = {"parity": "parity.json", "latency": "latency.json", "compile": "compile.json", "device": "device.json"}
    problems = [p for p in problems if not any(step in skipped and p.startswith(f) for step, f in files.items())]
    if problems:
        lines += ["", "## Missing", ""] + [f"- {p}" for p in problems]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
