"""onnxruntime CPU vs OpenVINO (f32 and bf16) on one exported denoiser: per-call latency and max abs diff.

    python benchmarks/openvino_check.py --out ov-out/                # exports a random small-preset model first
    python benchmarks/openvino_check.py --model demo/model --threads 2 --batches 1,4 --repeats 15

Every backend opens the same ``denoiser.onnx`` with the same thread count; each compiles (OpenVINO: once per
shape) and warms up outside the timing, then the backends run interleaved (one call each per round) and
the median per call is reported with the max abs difference of its output against onnxruntime's on the
same inputs. A benchmark, not a test: numbers depend on the machine and its load (prints the CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def export_random(out: Path, config: str, seed: int) -> Path:
    """A random-weight model of ``config`` exported to ``out/model`` (the checkpoint in ``out``)."""
    import torch

    from vdeploy import config as vconfig
    from vdeploy.checkpoint import make_checkpoint, save_checkpoint
    from vdeploy.diffusion import GaussianDiffusion
    from vdeploy.export import export_onnx
    from vdeploy.model import Unet3D

    resolved = vconfig.load(config)
    torch.manual_seed(seed)
    unet = Unet3D(**vconfig.unet_kwargs(resolved)).eval()
    state = GaussianDiffusion(unet, **vconfig.diffusion_kwargs(resolved)).state_dict()
    out.mkdir(parents=True, exist_ok=True)
    ckpt = save_checkpoint(make_checkpoint(step=0, model=state, ema=state, optimizer=None, scaler=None,
                                           config=resolved), out / "model-0.pt")
    export_onnx(ckpt, out / "model", optimize="none")
    return out / "model"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="an exported model directory (default: export a random one)")
    parser.add_argument("--out", type=Path, default=Path("ov-out"), help="where a random model is exported")
    parser.add_argument("--config", default="small", help="preset of the random model [small]")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per batch (interleaved)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from vdeploy.runtime.manifest import load
    from vdeploy.runtime.openvino import OpenVINOBackend, cpu_has_bf16, import_openvino, shared_core
    from vdeploy.runtime.ort import OrtBackend

    ov = import_openvino()
    model_dir = args.model or export_random(args.out, args.config, seed=0)
    manifest = load(model_dir)
    graph = model_dir / manifest.graphs["denoiser"].file
    t0 = time.perf_counter()
    backends = {"onnxruntime-cpu": OrtBackend(graph, "cpu", threads=args.threads, cache=False)}
    backends["openvino-f32"] = OpenVINOBackend(graph, precision="fp32", threads=args.threads)
    if cpu_has_bf16():
        backends["openvino-bf16"] = OpenVINOBackend(graph, precision="bf16", threads=args.threads)
    else:
        print("this CPU has no BF16 in OpenVINO: no bf16 row", file=sys.stderr)
    print(f"opened in {time.perf_counter() - t0:.1f} s; CPU: {shared_core().get_property('CPU', 'FULL_DEVICE_NAME')}, "
          f"OpenVINO {ov.__version__}, {args.threads} threads, {graph}", file=sys.stderr)

    c, f, h, w = manifest.video_shape
    rng = np.random.default_rng(0)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        feeds = {"x": rng.standard_normal((batch, c, f, h, w), dtype=np.float32),
                 "t": rng.integers(0, manifest.schedule.timesteps, batch)}
        if manifest.cond_dim:
            feeds["cond"] = rng.standard_normal((batch, manifest.cond_dim), dtype=np.float32)
        outputs, first = {}, {}
        for name, backend in backends.items():  # compile (OpenVINO: this shape) and warm up, untimed
            t0 = time.perf_counter()
            outputs[name] = backend.run(feeds)[0]
            first[name] = time.perf_counter() - t0
            backend.run(feeds)
        times = {name: [] for name in backends}
        for _ in range(args.repeats):
            for name, backend in backends.items():
                t0 = time.perf_counter()
                backend.run(feeds)
                times[name].append(time.perf_counter() - t0)
        base = statistics.median(times["onnxruntime-cpu"])
        for name in backends:
            median = statistics.median(times[name])
            rows.append({"batch": batch, "backend": name, "median_ms": round(median * 1e3, 2),
                         "speedup_vs_ort": round(base / median, 3), "first_call_s": round(first[name], 2),
                         "max_abs_diff_vs_ort": float(np.abs(outputs[name] - outputs["onnxruntime-cpu"]).max())})
    print(f"{'batch':>5}  {'backend':<16} {'median ms':>10} {'vs ORT':>7} {'first call s':>12} {'max abs diff':>12}")
    for r in rows:
        print(f"{r['batch']:>5}  {r['backend']:<16} {r['median_ms']:>10.1f} {r['speedup_vs_ort']:>6.2f}x "
              f"{r['first_call_s']:>12.2f} {r['max_abs_diff_vs_ort']:>12.2e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": str(model_dir), "threads": args.threads, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
