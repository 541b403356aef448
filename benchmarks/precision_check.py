"""Reduced precision judged by the video: OpenVINO f32, bf16 and int8 (NNCF post-training quantization)
against onnxruntime fp32, on a trained model, with the default sampler.

    python benchmarks/precision_check.py --model demo/model --json precision.json

For each precision it reports the per-call error (max abs and relative RMS of the denoiser output, on the
inputs of the fp32 run's own steps) and the final-video PSNR against the fp32 video (the same noise, prompt
and sampler; videos in [0, 1]), plus the per-call latency (interleaved rounds, median). int8 is calibrated on
denoiser inputs recorded from real sampling runs across all the sampler's timesteps, with prompts and seeds
other than the evaluated ones. Guidance runs as two calls of the plain graph on every side (one graph to
quantize). A benchmark, not a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

EVAL_PROMPTS = ["a red circle moving left", "a blue square moving down", "a green triangle moving right",
                "a yellow circle moving up"]
CALIB_PROMPTS = ["a green square moving up", "a blue triangle moving left", "a yellow square moving right",
                 "a red triangle moving down", "a blue circle moving right", "a green circle moving down"]
THRESHOLD_DB = 30.0  # a precision ships only where every video reaches this


class Recorder:
    """A backend that records a copy of every feed it runs (the calibration and per-call inputs)."""

    def __init__(self, backend):
        self.backend, self.feeds = backend, []
        self.inputs, self.outputs, self.name, self.path = backend.inputs, backend.outputs, backend.name, backend.path

    def run(self, feeds):
        self.feeds.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        return self.backend.run(feeds)

    def close(self):
        pass


def interleaved_times(variants: dict, feeds: dict, repeats: int) -> dict:
    """Seconds per call of each backend on ``feeds``: two untimed calls each, then ``repeats`` interleaved rounds
    (so load that comes and goes falls on every backend alike)."""
    for backend in variants.values():
        backend.run(feeds)
        backend.run(feeds)
    times = {n: [] for n in variants}
    for _ in range(repeats):
        for n, backend in variants.items():
            t = time.perf_counter()
            backend.run(feeds)
            times[n].append(time.perf_counter() - t)
    return times


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def quantize_int8(graph: Path, feeds: list[dict], out: Path, subset: int) -> Path:
    """The graph quantized to int8 by NNCF (post-training, calibrated on ``feeds``), saved as OpenVINO IR."""
    import nncf
    import openvino as ov

    from vdeploy.runtime.openvino import shared_core

    model = shared_core().read_model(str(graph))
    names = [p.get_any_name() for p in model.inputs]
    data = [{n: f[n].astype(np.float32) if f[n].dtype.kind == "f" else f[n] for n in names} for f in feeds]
    quantized = nncf.quantize(model, nncf.Dataset(data), subset_size=min(subset, len(data)),
                              model_type=nncf.ModelType.TRANSFORMER)
    ov.save_model(quantized, str(out))
    return out


def speed_only(args) -> int:
    """Per-call speed of onnxruntime, OpenVINO f32, bf16 and int8 at batch 1, interleaved rounds."""
    from vdeploy.runtime.manifest import load
    from vdeploy.runtime.openvino import OpenVINOBackend
    from vdeploy.runtime.ort import OrtBackend
    from vdeploy.runtime.ranking import warmup_feeds

    manifest = load(args.model)
    graph = args.model / manifest.graphs["denoiser"].file
    feeds = [warmup_feeds(manifest.graphs["denoiser"], manifest.video_shape, seed=i) for i in range(24)]
    args.work.mkdir(parents=True, exist_ok=True)
    int8 = quantize_int8(graph, feeds, args.work / "denoiser_int8.xml", subset=len(feeds))
    variants = {"onnxruntime fp32": OrtBackend(graph, "cpu", threads=args.threads, cache=False),
                "openvino f32": OpenVINOBackend(graph, threads=args.threads, cache=False),
                "openvino bf16": OpenVINOBackend(graph, precision="bf16", threads=args.threads, cache=False),
                "openvino int8": OpenVINOBackend(int8, threads=args.threads, cache=False)}
    times = interleaved_times(variants, feeds[0], args.repeats)
    base = statistics.median(times["onnxruntime fp32"])
    for n, ts in times.items():
        print(f"{n}: median {statistics.median(ts) * 1e3:.1f} ms (min {min(ts) * 1e3:.1f}), "
              f"{base / statistics.median(ts):.2f}x onnxruntime")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a trained, exported model directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", default="0,1", help="seeds per evaluated prompt [0,1]")
    parser.add_argument("--cond-scale", type=float, default=2.0)
    parser.add_argument("--calib-seeds", default="100,101")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds per batch (interleaved)")
    parser.add_argument("--work", type=Path, default=Path("precision-out"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--speed-only", action="store_true",
                        help="only per-call speed at batch 1 on --model's graph (any model, random weights fine): "
                        "int8 calibrated on 24 random inputs, since no error is reported")
    args = parser.parse_args(argv)
    if args.speed_only:
        return speed_only(args)

    from vdeploy.runtime import Pipeline
    from vdeploy.runtime.openvino import OpenVINOBackend, cpu_has_bf16, import_openvino

    import_openvino()  # a clear error before any work when it is missing
    pipe = Pipeline.from_dir(args.model, backend="cpu", threads=args.threads)
    pipe.cfg_backend = pipe.cfg_graph = None  # guidance as two calls of the plain graph, on every side
    fp32 = pipe.backend
    graph = fp32.path
    seeds = [int(s) for s in args.seeds.split(",")]

    def sample(backend, prompt, seed):
        pipe.backend = backend
        return pipe(text=prompt, cond_scale=args.cond_scale, seed=seed)

    # calibration inputs: real sampling runs (every timestep of the default sampler), other prompts and seeds
    t0 = time.perf_counter()
    recorder = Recorder(fp32)
    for prompt in CALIB_PROMPTS:
        for seed in (int(s) for s in args.calib_seeds.split(",")):
            sample(recorder, prompt, seed)
    calib = recorder.feeds
    args.work.mkdir(parents=True, exist_ok=True)
    int8_path = quantize_int8(graph, calib, args.work / "denoiser_int8.xml", subset=len(calib))
    quantize_s = time.perf_counter() - t0
    print(f"int8: NNCF {__import__('nncf').__version__}, {len(calib)} calibration inputs from "
          f"{len(CALIB_PROMPTS)} prompts x {args.calib_seeds} seeds, {quantize_s:.0f} s", file=sys.stderr)

    variants = {"onnxruntime fp32": fp32,
                "openvino f32": OpenVINOBackend(graph, precision="fp32", threads=args.threads, cache=False)}
    if cpu_has_bf16():
        variants["openvino bf16"] = OpenVINOBackend(graph, precision="bf16", threads=args.threads, cache=False)
    variants["openvino int8"] = OpenVINOBackend(int8_path, precision="fp32", threads=args.threads, cache=False)

    # the fp32 reference videos, and the inputs of their calls
    recorder = Recorder(fp32)
    reference = {(p, s): sample(recorder, p, s) for p in EVAL_PROMPTS for s in seeds}
    eval_feeds = recorder.feeds
    rows = {}
    for name, backend in variants.items():
        errs, rels = [], []
        for f in eval_feeds:
            ref = fp32.run(f)[0].astype(np.float64)
            out = backend.run(f)[0]
            errs.append(float(np.abs(out - ref).max()))
            rels.append(float(np.sqrt(np.mean((out - ref) ** 2)) / np.sqrt(np.mean(ref ** 2))))
        videos = {k: sample(backend, *k) for k in reference}
        psnrs = [psnr(videos[k], reference[k]) for k in reference]
        rows[name] = {"per_call_max_abs_err": max(errs), "per_call_rel_rms_err_mean": float(np.mean(rels)),
                      "video_psnr_db_min": min(psnrs), "video_psnr_db_mean": float(np.mean(psnrs)),
                      "videos": len(psnrs)}
    # latency: batch 1 and 2 (the guided pair), interleaved rounds
    for batch in (1, 2):
        f = {k: np.concatenate([v[:1]] * batch) for k, v in eval_feeds[0].items()}  # every input has a batch axis
        times = interleaved_times(variants, f, args.repeats)
        base = statistics.median(times["onnxruntime fp32"])
        for n in variants:
            med = statistics.median(times[n])
            rows[n][f"ms_b{batch}"] = round(med * 1e3, 2)
            rows[n][f"speedup_vs_ort_b{batch}"] = round(base / med, 2)
    print(f"| precision | per-call max abs err | per-call rel RMS err | video PSNR dB min / mean ({len(reference)} "
          f"videos) | ms b1 | vs ORT b1 | ms b2 | vs ORT b2 | ships (>= {THRESHOLD_DB:g} dB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, r in rows.items():
        ships = r["video_psnr_db_min"] >= THRESHOLD_DB
        print(f"| {n} | {r['per_call_max_abs_err']:.2e} | {r['per_call_rel_rms_err_mean']:.2e} | "
              f"{r['video_psnr_db_min']:.1f} / {r['video_psnr_db_mean']:.1f} | {r['ms_b1']:.1f} | "
              f"{r['speedup_vs_ort_b1']:.2f}x | {r['ms_b2']:.1f} | {r['speedup_vs_ort_b2']:.2f}x | "
              f"{'yes' if ships else 'no'} |")
    result = {"model": str(args.model), "threads": args.threads, "sampler": "default (dpmpp, its default steps)",
              "cond_scale": args.cond_scale, "prompts": EVAL_PROMPTS, "seeds": seeds,
              "calibration": {"inputs": len(calib), "prompts": CALIB_PROMPTS, "seconds": round(quantize_s, 1)},
              "rows": rows, "command": " ".join(["python", "benchmarks/precision_check.py", *(argv or sys.argv[1:])])}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
