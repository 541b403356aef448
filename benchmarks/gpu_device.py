#!/usr/bin/env python
"""The device-resident sampling loop against the host loop, real samplers, one model (benchmarks/gpu.sh).

    python benchmarks/gpu_device.py MODEL_DIR --json OUT/device.json [--samplers dpmpp:13,ddpm:100] [--backend cuda]

Host path (``Pipeline`` as a user calls it): numpy latent and sampler arithmetic, ``OrtBackend.run`` (inputs
copied in, eps copied out), noise drawn on the host. Device path (``vdeploy.runtime.device_loop.sample``): the
same run with the latent, the multistep history, clipping and guidance in CuPy (the samplers on CuPy's array-API
namespace), the denoiser fed and read through the backend's bound device buffers (``DeviceDenoiser``: IO binding,
a CUDA graph per shape by default) and the noise from the same numpy generator, drawn a step ahead and uploaded.
Both use one backend (so the same graph and CUDA-graph setting). Reports per sampler: ms per step, denoiser ms
per step and the share of each step outside the denoiser, for both paths (the whole run: preparing the starting
noise to the video on the host), for the device path also over its steps alone (first denoiser call to the last:
``steps_outside_denoiser_pct``), and the max abs difference of the two
videos (the same float32 arithmetic: expected 0 or a few ulp). ``--backend cpu`` runs the device path on
onnxruntime CPU IO binding with array-api-strict as the "device" namespace (a check of this script without a
GPU).
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
    p.add_argument("--samplers", default="dpmpp:13,ddpm:100", help="sampler:steps comma list")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="timed runs per path (the fastest is reported)")
    p.add_argument("--backend", default="cuda")
    p.add_argument("--profile", type=int, default=0,
                   help="after timing, one more device run under cProfile: its N costliest functions (own time, "
                   "per step) in the JSON [0: none]")
    args = p.parse_args(argv)

    from vdeploy.runtime import Pipeline
    from vdeploy.runtime.device_loop import DeviceDenoiser, graph_names, sample
    from vdeploy.runtime.steps import drive

    if args.backend == "cpu":
        import array_api_strict as xp

        library, sync = "numpy", lambda: None
        wrap = lambda out: xp.asarray(out)  # noqa: E731 - host buffers as the strict "device"
    else:
        import cupy
        from array_api_compat import array_namespace

        xp = array_namespace(cupy.empty(1))
        library, sync, wrap = "cupy", lambda: cupy.cuda.Device().synchronize(), (lambda out: out)
    pipe = Pipeline.from_dir(args.model_dir, backend=args.backend)
    report: dict = {"model": str(args.model_dir), "backend": pipe.backend_name, "batch": args.batch,
                    "video_shape": list(pipe.shape), "cuda_graph": getattr(pipe.backend, "cuda_graph", None),
                    "namespace": getattr(xp, "__name__", str(xp)), "samplers": {}}
    bound = DeviceDenoiser(pipe.backend, graph_names(pipe.graph), library=library)
    cond = None
    if pipe.cond_dim:
        cond = np.random.default_rng(1).standard_normal((args.batch, pipe.cond_dim), dtype=np.float32)

    def host(kwargs):  # timed like the device run: preparing (the starting noise) to the video
        t0 = time.perf_counter()
        run = pipe.prepare(**kwargs)
        denoise, timing = pipe.denoiser_for(run.cond_scale)
        video = run.finish(drive(run.machine, denoise))
        return video, time.perf_counter() - t0, timing[1]

    def device(kwargs):
        spent, span = [0.0], []  # denoiser seconds; (start of the first call, end of the last)

        def timed(*a, **k):
            sync()
            t1 = time.perf_counter()
            out = wrap(bound(*a, **k))
            sync()
            t2 = time.perf_counter()
            spent[0] += t2 - t1
            span[:] = [span[0] if span else t1, t2]
            return out

        sync()
        t0 = time.perf_counter()
        video = sample(pipe, xp=xp, denoise=timed, **kwargs)  # ends with the one copy to the host
        loops[0] = span[1] - span[0]
        return video, time.perf_counter() - t0, spent[0]

    loops = [0.0]  # the device run's steps alone: first denoiser call to the last (no setup, no copy back)

    for item in args.samplers.split(","):
        name, _, steps = item.strip().partition(":")
        steps = int(steps) if steps else None
        kwargs = dict(batch_size=args.batch, cond=cond, sampler=name, steps=steps, seed=0)
        entry: dict = {"steps": steps}
        try:
            videos = {}
            for path, run in (("host", host), ("device", device)):
                run(kwargs)  # warm: buffers, CUDA graph capture, CuPy kernels compiled
            for _ in range(max(1, args.rounds)):
                for path, run in (("host", host), ("device", device)):
                    video, total, den = run(kwargs)
                    videos[path] = video
                    n = steps or len(pipe.betas)
                    best = entry.get(path)
                    if best is None or total < best["_total"]:
                        entry[path] = {"_total": total, "ms_per_step": round(1e3 * total / n, 3),
                                       "denoiser_ms_per_step": round(1e3 * den / n, 3),
                                       "outside_denoiser_pct": round(100 * (total - den) / total, 2)}
                        if path == "device":  # between the first call and the last: the steps' own overhead
                            entry[path]["steps_outside_denoiser_pct"] = round(100 * (loops[0] - den) / loops[0], 2)
            for path in ("host", "device"):
                entry[path].pop("_total")
            entry["video_max_abs_diff"] = float(np.abs(videos["device"] - videos["host"]).max())
            if args.profile:
                entry["device_profile"] = _profile(lambda: device(kwargs), args.profile, steps or len(pipe.betas))
        except Exception as e:  # noqa: BLE001 - recorded, the next sampler runs
            entry["error"] = f"{type(e).__name__}: {e}"[:400]
        report["samplers"][name] = entry
        print(json.dumps({name: entry}), flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    pipe.close()
    return 0


def _profile(run, top: int, steps: int) -> list[dict]:
    """``run()`` under cProfile: the ``top`` functions by own time, as ms per step and calls per step."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(run)
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, primitive calls, own s, cumulative s, ...)}
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [{"function": f"{Path(f).name}:{line}({name})", "calls_per_step": round(v[0] / steps, 2),
             "own_ms_per_step": round(1e3 * v[2] / steps, 4), "cum_ms_per_step": round(1e3 * v[3] / steps, 4)}
            for (f, line, name), v in rows]


if __name__ == "__main__":
    sys.exit(main())
