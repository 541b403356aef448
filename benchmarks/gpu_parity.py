#!/usr/bin/env python
"""Parity at every precision in one process (benchmarks/gpu.sh's parity step): a random-weight model of
``--config`` (default tiny) written as a checkpoint, exported with its fp16 graph, then
``vdeploy.export.parity.run_parity`` (what ``vdeploy parity`` runs) for each sampler and precision on
``--backend``, and the graph alone on that backend against onnxruntime CPU (same input, per precision).

    python benchmarks/gpu_parity.py --out gpu-out/parity --backend cuda
    python benchmarks/gpu_parity.py --out /tmp/p --backend cpu --precisions fp32,fp16   # a CPU check

Writes OUT/parity.json after every run (so a run cut short keeps what finished) and OUT/parity.md.
Exit code 0 even when a run fails its tolerance: gpu.sh reads the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path


def _graph_vs_cpu(model_dir: Path, backend: str, precision: str, seed: int) -> dict:
    """Max abs difference of one denoiser call on ``backend`` at ``precision`` from onnxruntime CPU fp32."""
    import numpy as np

    from vdeploy.runtime import manifest as vmanifest
    from vdeploy.runtime.backends import BackendOptions, graph_for, open_graph

    m = vmanifest.load(model_dir)
    rng = np.random.default_rng(seed)
    outs = {}
    for key, name, prec in (("ref", "cpu", "fp32"), ("got", backend, precision)):
        options = BackendOptions(precision=prec)
        graph = graph_for(name, m, options)
        spec = m.graphs[graph]
        if key == "ref":
            feeds = {}
            for t in spec.inputs:
                shape = tuple(d if isinstance(d, int) else (2 if i == 0 else None) for i, d in enumerate(t.shape))
                if t.role == "x":
                    shape = (2, *m.video_shape)
                if t.role == "t":
                    feeds[t.name] = np.array([10, m.config.get("timesteps", 100) - 1], np.int64)
                    continue
                if None in shape:
                    raise ValueError(f"input {t.name} {t.shape}: no shape to feed")
                feeds[t.name] = rng.standard_normal(shape).astype(np.float32)
        b = open_graph(name, model_dir, m, graph, options)
        try:
            outs[key] = b.run(feeds)[0].astype(np.float64)
        finally:
            b.close()
    ref, got = outs["ref"], outs["got"]
    return {"max_abs_diff_vs_ort_cpu_fp32": float(np.abs(got - ref).max()), "scale": float(np.abs(ref).max())}


def judged(r: dict) -> str:
    """What a parity entry was held to: ``atol X`` (fp32, tf32) or ``PSNR >= Y dB`` (fp16, bf16)."""
    if r.get("min_psnr_db") is not None:
        return f"PSNR >= {r['min_psnr_db']:g} dB"
    return f"atol {r['atol']:g}" if r.get("atol") is not None else ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--backend", default="cuda")
    p.add_argument("--config", default="tiny")
    p.add_argument("--precisions", default="fp32,tf32,fp16")
    p.add_argument("--samplers", default="dpmpp:13,ddpm:100",
                   help="sampler[:steps] comma list [dpmpp:13,ddpm:100]")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"backend": args.backend, "config": args.config, "runs": [], "graph": [], "errors": []}
    path = args.out / "parity.json"

    def save():
        path.write_text(json.dumps(report, indent=1))

    t0 = time.perf_counter()
    from vdeploy.bench.models import random_unet, resolve_config, write_checkpoint
    from vdeploy.export import export_unet
    from vdeploy.export.parity import run_parity

    name, config = resolve_config(args.config, None)
    unet = random_unet(config, args.seed)
    ckpt = write_checkpoint(unet, config, args.out / "model.pt")
    model_dir = args.out / "model"
    precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    export_unet(unet, config, model_dir, fp16="fp16" in precisions, optimize="none",
                source={"checkpoint": str(ckpt)})
    report["export_s"] = round(time.perf_counter() - t0, 1)
    save()
    for precision in precisions:
        try:
            report["graph"].append({"precision": precision,
                                    **_graph_vs_cpu(model_dir, args.backend, precision, args.seed)})
        except Exception as e:  # noqa: BLE001 - recorded, the next one runs
            report["graph"].append({"precision": precision, "error": f"{type(e).__name__}: {e}"})
        save()
    # onnxruntime CPU fp32 first: what these random weights give on the reference path (the GPU rows compare to it)
    runs = ([("cpu", "fp32")] if args.backend != "cpu" else []) + [(args.backend, p) for p in precisions]
    for item in args.samplers.split(","):
        sampler, _, steps = item.strip().partition(":")
        for backend, precision in runs:
            t1 = time.perf_counter()
            entry = {"sampler": sampler, "steps": int(steps) if steps else None, "backend": backend,
                     "precision": precision}
            try:
                r = run_parity(model_dir, ckpt, sampler=sampler, steps=entry["steps"], backend=backend,
                               precision=precision, seed=args.seed, raise_on_failure=False)
                per_call = r.get("per_call_max_abs_err") or []
                entry.update(passed=bool(r.get("passed")), atol=r.get("atol"), min_psnr_db=r.get("min_psnr_db"),
                             criterion=r.get("criterion"),
                             worst_per_call=max(per_call) if per_call else None,
                             final=r.get("final_max_abs_err"), psnr_db=r.get("psnr_db"))
            except Exception as e:  # noqa: BLE001
                entry["error"] = f"{type(e).__name__}: {e}"
                report["errors"].append(traceback.format_exc(limit=3))
            entry["seconds"] = round(time.perf_counter() - t1, 1)
            report["runs"].append(entry)
            save()
            print(json.dumps(entry), flush=True)
    lines = [f"# Parity on {args.backend} ({args.config}, random weights, seed {args.seed})", "",
             "Random weights give larger outputs than a trained model: the onnxruntime CPU fp32 row is what the "
             "reference path itself reaches; a device row is right when its errors are near that row's.", "",
             "| sampler | steps | backend | precision | worst per call | final | PSNR dB | judged by | result |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["runs"]:
        result = r.get("error") or ("pass" if r.get("passed") else "FAIL")
        fmt = lambda v: "" if v is None else f"{v:.3g}"  # noqa: E731
        lines.append(f"| {r['sampler']} | {r['steps'] or ''} | {r['backend']} | {r['precision']} | {fmt(r.get('worst_per_call'))} | "
                     f"{fmt(r.get('final'))} | {fmt(r.get('psnr_db'))} | {judged(r)} | {result} |")
    lines += ["", "| precision | one call: max abs diff from onnxruntime CPU fp32 | output scale |", "| --- | --- | --- |"]
    for g in report["graph"]:
        lines.append(f"| {g['precision']} | {g.get('max_abs_diff_vs_ort_cpu_fp32', g.get('error'))} | "
                     f"{g.get('scale', '')} |")
    (args.out / "parity.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
