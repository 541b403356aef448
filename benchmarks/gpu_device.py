#!/usr/bin/env python
"""The device path against today's host path, one model, a fixed-coefficient step loop (benchmarks/gpu.sh).

    python benchmarks/gpu_device.py MODEL_DIR --json OUT/device.json [--steps 50] [--backend cuda]

Host path (what ``Pipeline`` does today): numpy latent, ``OrtBackend.run`` (inputs copied in, eps copied out),
numpy arithmetic and noise. Device path: the latent in CuPy, ``DeviceDenoiser`` over the bound buffers of an
``OrtBackend(cuda_graph=True)``, CuPy arithmetic, ``NoisePrefetch`` noise. Both run the same update
``x = a x - b eps + c z`` (DDPM-like: one denoiser call, one noise draw per step) from the same start and noise.
Reports per step: total ms, denoiser ms and the share outside the denoiser; and the max abs difference of one
call and of the final latent between the paths. ``--backend cpu`` runs both paths on onnxruntime CPU with
numpy as the "device" (a check of this script on a machine without a GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model_dir", type=Path)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--backend", default="cuda")
    args = p.parse_args(argv)

    from vdeploy.runtime import manifest as vmanifest
    from vdeploy.runtime.backends import BackendOptions, open_graph
    from vdeploy.runtime.device_loop import DeviceDenoiser, NoisePrefetch

    if args.backend == "cuda":
        import cupy as xp

        library, upload, sync, to_host = "cupy", xp.asarray, lambda: xp.cuda.Device().synchronize(), xp.asnumpy
    else:
        xp, library, upload, sync, to_host = np, "numpy", np.asarray, lambda: None, np.asarray
    m = vmanifest.load(args.model_dir)
    spec = m.graphs["denoiser"]
    names = {role: spec.input(role).name for role in ("x", "t", "cond") if spec.input(role) is not None}
    names["out"] = spec.outputs[0].name
    report: dict = {"model": str(args.model_dir), "backend": args.backend, "steps": args.steps, "batch": args.batch,
                    "video_shape": list(m.video_shape)}
    host_backend = open_graph(args.backend, args.model_dir, m, "denoiser", BackendOptions())
    try:
        graph_backend = open_graph(args.backend, args.model_dir, m, "denoiser", BackendOptions(cuda_graph=True))
        report["cuda_graph"] = True
    except Exception as e:  # noqa: BLE001 - e.g. nodes onnxruntime placed off CUDA: IO binding alone
        report["cuda_graph"] = f"failed, IO binding alone: {type(e).__name__}: {e}"[:400]
        graph_backend = open_graph(args.backend, args.model_dir, m, "denoiser", BackendOptions())
    device_denoise = DeviceDenoiser(graph_backend, names, library=library)
    shape = (args.batch, *m.video_shape)
    rng = np.random.default_rng(0)
    x_start = rng.standard_normal(shape, dtype=np.float32)
    t_host = np.full((args.batch,), 500, np.int64)
    cond = None
    if "cond" in names:
        cond = rng.standard_normal((args.batch, m.cond_dim), dtype=np.float32)
    a, b, c = 0.999, 0.01, 0.005  # Python floats keep float32 arrays float32 (numpy 2, CuPy)

    def host_call(x):
        feeds = {names["x"]: x, names["t"]: t_host}
        if cond is not None:
            feeds[names["cond"]] = cond
        return host_backend.run(feeds)[0]

    t_dev = upload(t_host)
    cond_dev = None if cond is None else upload(cond)
    one_host = host_call(x_start)
    one_dev = to_host(device_denoise(upload(x_start), t_dev, cond_dev))
    report["one_call_max_abs_diff"] = float(np.abs(one_dev - one_host).max())

    def host_loop():
        noise = np.random.default_rng(1)
        x, den = x_start.copy(), 0.0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            t1 = time.perf_counter()
            eps = host_call(x)
            den += time.perf_counter() - t1
            x = a * x - b * eps + c * noise.standard_normal(shape, dtype=np.float32)
        return x, time.perf_counter() - t0, den

    def device_loop():
        noise = NoisePrefetch(np.random.default_rng(1), shape, upload, steps=args.steps)
        x, den = upload(x_start), 0.0
        sync()
        t0 = time.perf_counter()
        for i in range(args.steps):
            t1 = time.perf_counter()
            eps = device_denoise(x, t_dev, cond_dev)
            sync()
            den += time.perf_counter() - t1
            x = a * x - b * eps + c * noise(i)
        sync()
        total = time.perf_counter() - t0
        noise.close()
        return to_host(x), total, den

    for name, loop in (("host", host_loop), ("device", device_loop)):
        loop()  # warm: the first call of a shape builds its buffers (and captures its CUDA graph)
    results = {}
    for name, loop in (("host", host_loop), ("device", device_loop), ("host", host_loop), ("device", device_loop)):
        x, total, den = loop()
        results.setdefault(name, []).append((total, den))
        report[f"{name}_final"] = x
    for name, runs in results.items():
        total, den = min(runs)
        report[name] = {"ms_per_step": round(1e3 * total / args.steps, 3),
                        "denoiser_ms_per_step": round(1e3 * den / args.steps, 3),
                        "outside_denoiser_pct": round(100 * (total - den) / total, 2)}
    report["final_max_abs_diff"] = float(np.abs(report.pop("device_final") - report.pop("host_final")).max())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
