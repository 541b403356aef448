#!/usr/bin/env python
"""How to make the half-precision graph, measured: onnxruntime's graph converter with vdeploy's fixed block list
(``export/fp16.py``, what ``vdeploy export --fp16`` writes) against an export of the half-precision torch model
(TensorRT demo/Diffusion's way), and bf16 the same two ways where onnxruntime CPU can run it.

    python benchmarks/gpu_fp16_choice.py --configs tiny,small --out fp16-choice/ \\
        [--oldest-python .venv-ort-oldest/bin/python] [--device cuda]

Per preset (random seeded weights: no trained checkpoint of these presets exists here): export fp32 with the
converter's fp16 graph; export ``Denoiser(unet).half()`` (inputs cast to half inside, the output back to float32,
so the runtime's float32 I/O contract holds) into a copy of the model directory as its ``denoiser_fp16.onnx``; then
for each candidate: ``onnx.checker``, a session in the oldest onnxruntime (``--oldest-python``: a venv with
onnxruntime 1.17.3, ``make test-ort-oldest``), one call against onnxruntime fp32 on the same input, and
``run_parity`` (dpmpp 13 steps, logsnr: the default run) against PyTorch fp32: worst per-call error, final video
error and PSNR. bf16: ``Denoiser(unet).to(torch.bfloat16)`` exported the same way, tried on onnxruntime.

onnxruntime CPU has few fp16 kernels: it inserts Casts and computes most fp16 nodes in fp32 (its
InsertCastTransformer), so on the CPU the error measures fp16 storage of weights and activations between nodes,
not fp16 arithmetic inside them; ``--device cuda`` runs the same comparison on the CUDA EP (benchmarks/gpu.sh).

``--time-batches 1,4`` also times each candidate's fp16 graph on ``--device`` per call (median of ``--repeats``
after warm-up; CUDA graphs as by default), on CUDA in each of ``--layouts`` (``nhwc``: channels-last
convolutions, ``BackendOptions.nhwc``). ``--reuse DIR``: DIR is an export of the same preset and seed with the converter's fp16
graph (``benchmarks/latency.py --work``'s ``model``), used instead of exporting again.

Writes OUT/fp16_choice.json (after every measurement) and OUT/fp16_choice.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

_OLDEST_CHECK = """
import sys, onnx, onnxruntime as ort
onnx.checker.check_model(onnx.load(sys.argv[1]))
ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
print(ort.__version__)
"""


def _half_export(unet, config: dict, fp32_dir: Path, out_dir: Path, dtype_name: str) -> Path:
    """``Denoiser(unet)`` in half precision (``float16``/``bfloat16``) traced into a copy of ``fp32_dir`` as its
    ``denoiser_fp16.onnx`` (the manifest's file hashes rewritten); returns the copy."""
    import torch

    from vdeploy.export.wrapper import Denoiser
    from vdeploy.runtime import manifest as vmanifest

    dtype = getattr(torch, dtype_name)

    class HalfIO(torch.nn.Module):
        """float32 in and out, ``dtype`` inside (the runtime's I/O contract)."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, t, *rest):
            rest = [r.to(dtype) if r.is_floating_point() else r for r in rest]
            return self.inner(x.to(dtype), t, *rest).float()

    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(fp32_dir, out_dir)
    m = vmanifest.load(out_dir)
    spec = m.graphs["denoiser"]
    module = HalfIO(Denoiser(copy.deepcopy(unet), config["num_frames"]).to(dtype)).eval()
    rng = torch.Generator().manual_seed(0)
    b, c, f, s = 2, config["channels"], config["num_frames"], config["image_size"]
    args = [torch.randn(b, c, f, s, s, generator=rng), torch.randint(0, config["timesteps"], (b,), generator=rng)]
    if spec.input("cond") is not None:
        args.append(torch.randn(b, spec.input("cond").shape[1], generator=rng))
    names = [i.name for i in spec.inputs]
    axes = {t.name: {k: str(d) for k, d in enumerate(t.shape) if not isinstance(d, int)}
            for t in [*spec.inputs, *spec.outputs]}
    with torch.no_grad():
        torch.onnx.export(module, tuple(args), str(out_dir / "denoiser_fp16.onnx"), dynamo=False, opset_version=17,
                          input_names=names, output_names=[o.name for o in spec.outputs], dynamic_axes=axes,
                          do_constant_folding=True)
    m.write(out_dir)
    return out_dir


def _one_call(model_dir: Path, device: str, precision: str) -> dict:
    """One call of the half graph against the fp32 graph on onnxruntime CPU, same input."""
    from vdeploy.runtime import manifest as vmanifest
    from vdeploy.runtime.backends import BackendOptions, graph_for, open_graph

    m = vmanifest.load(model_dir)
    rng = np.random.default_rng(0)
    feeds = {}
    spec = m.graphs["denoiser"]
    for t in spec.inputs:
        if t.role == "t":
            feeds[t.name] = np.array([10, m.config["timesteps"] - 1], np.int64)
        elif t.role == "x":
            feeds[t.name] = rng.standard_normal((2, *m.video_shape)).astype(np.float32)
        else:
            feeds[t.name] = rng.standard_normal((2, t.shape[1])).astype(np.float32)
    outs = {}
    for key, name, prec in (("ref", "cpu", "fp32"), ("got", device, precision)):
        options = BackendOptions(precision=prec)
        backend = open_graph(name, model_dir, m, graph_for(name, m, options), options)
        try:
            outs[key] = backend.run(feeds)[0].astype(np.float64)
        finally:
            backend.close()
    return {"one_call_max_abs_diff": float(np.abs(outs["got"] - outs["ref"]).max()),
            "output_scale": float(np.abs(outs["ref"]).max())}


def _timing(model_dir: Path, device: str, precision: str, batches: list[int], repeats: int,
            layouts: tuple[str, ...] = ("nchw",)) -> dict:
    """``{"nchw"|"nhwc": {batch: median ms per call}}`` of the model's ``precision`` graph on ``device``."""
    from vdeploy.bench.common import Inputs
    from vdeploy.runtime import manifest as vmanifest
    from vdeploy.runtime.backends import BackendOptions, graph_for, open_graph

    m = vmanifest.load(model_dir)
    inputs = Inputs(dict(m.config), 0)
    out: dict = {}
    for layout in layouts if device == "cuda" else ("nchw",):
        options = BackendOptions(precision=precision, nhwc=layout == "nhwc")
        name = graph_for(device, m, options)
        backend = open_graph(device, model_dir, m, name, options)
        try:
            for b in batches:
                feeds = {spec.name: inputs.numpy(b)[spec.role] for spec in m.graphs[name].inputs}
                for _ in range(3):
                    backend.run(feeds)
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    backend.run(feeds)
                    times.append(1e3 * (time.perf_counter() - t0))
                out.setdefault(layout, {})[str(b)] = round(float(np.median(times)), 3)
        except Exception as e:  # noqa: BLE001 - recorded
            out[layout] = f"{type(e).__name__}: {e}"[:300]
        finally:
            backend.close()
    return out


def _checks(graph: Path, oldest_python: str | None) -> dict:
    import onnx

    out = {}
    try:
        onnx.checker.check_model(onnx.load(str(graph)))
        out["onnx_checker"] = "ok"
    except Exception as e:  # noqa: BLE001 - recorded
        out["onnx_checker"] = f"{type(e).__name__}: {e}"[:300]
    if oldest_python:
        r = subprocess.run([oldest_python, "-c", _OLDEST_CHECK, str(graph)], capture_output=True, text=True,
                           timeout=300)
        out["oldest_onnxruntime"] = (f"ok ({r.stdout.strip()})" if r.returncode == 0
                                     else (r.stderr.strip().splitlines() or ["failed"])[-1][:300])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="tiny,small")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cpu", help="backend the half graphs run on: cpu (default) or cuda")
    p.add_argument("--sampler", default="dpmpp")
    p.add_argument("--steps", type=int, default=13)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--oldest-python", default=None, help="python of a venv with the oldest onnxruntime")
    p.add_argument("--time-batches", default="", help="time each candidate per call at these batch sizes")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per batch size [20]")
    p.add_argument("--layouts", default="nchw", help="on CUDA: nchw and/or nhwc (BackendOptions.nhwc) [nchw]")
    p.add_argument("--reuse", type=Path, default=None,
                   help="an export of the (one) preset and --seed with its fp16 graph, instead of exporting")
    p.add_argument("--no-bf16", action="store_true", help="leave out the bf16 torch export")
    args = p.parse_args(argv)
    time_batches = [int(b) for b in args.time_batches.split(",") if b.strip()]
    layouts = tuple(x.strip() for x in args.layouts.split(",") if x.strip())
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    from vdeploy.bench.models import random_unet, resolve_config, write_checkpoint
    from vdeploy.export import export_unet
    from vdeploy.export.parity import run_parity

    torch.set_num_threads(max(1, torch.get_num_threads()))
    report: dict = {"device": args.device, "sampler": args.sampler, "steps": args.steps, "seed": args.seed,
                    "torch": torch.__version__, "rows": []}
    try:
        import onnxruntime

        report["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    path = args.out / "fp16_choice.json"

    def save():
        path.write_text(json.dumps(report, indent=1))

    for config_name in [c.strip() for c in args.configs.split(",") if c.strip()]:
        name, config = resolve_config(config_name, None)
        unet = random_unet(config, args.seed)
        work = args.out / name
        ckpt = write_checkpoint(unet, config, work / "model.pt")
        t0 = time.perf_counter()
        fp32_dir = work / "converter"
        if args.reuse is not None:
            if fp32_dir.exists():
                shutil.rmtree(fp32_dir)
            shutil.copytree(args.reuse, fp32_dir)
        else:
            export_unet(unet, config, fp32_dir, fp16=True, optimize="none", source={"checkpoint": str(ckpt)})
        report.setdefault("export_s", {})[name] = round(time.perf_counter() - t0, 1)
        candidates = [("converter + block list", "fp16", fp32_dir)]
        for label, dtype_name, precision in (("half torch export", "float16", "fp16"),
                                             ("bf16 torch export", "bfloat16", "fp16"))[:1 if args.no_bf16 else 2]:
            try:
                candidates.append((label, precision, _half_export(unet, config, fp32_dir, work / dtype_name,
                                                                  dtype_name)))
            except Exception as e:  # noqa: BLE001 - recorded: the export itself failed
                report["rows"].append({"config": name, "candidate": label, "error": f"{type(e).__name__}: {e}"[:400]})
                save()
        for label, precision, model_dir in candidates:
            row = {"config": name, "candidate": label, "precision": precision}
            row.update(_checks(model_dir / "denoiser_fp16.onnx", args.oldest_python))
            try:
                row.update(_one_call(model_dir, args.device, precision))
                t1 = time.perf_counter()
                r = run_parity(model_dir, ckpt, sampler=args.sampler, steps=args.steps, backend=args.device,
                               precision=precision, seed=args.seed, raise_on_failure=False, atol=math.inf)
                row.update(worst_per_call=r["max_per_call_abs_err"], final=r["final_max_abs_err"],
                           psnr_db=r["psnr_db"], parity_s=round(time.perf_counter() - t1, 1))
                if time_batches:
                    row["ms_per_call"] = _timing(model_dir, args.device, precision, time_batches, args.repeats, layouts)
            except Exception as e:  # noqa: BLE001 - recorded (onnxruntime cannot run it, ...)
                row["error"] = " ".join(f"{type(e).__name__}: {e}".split())[:400]
            report["rows"].append(row)
            save()
            print(json.dumps(row), flush=True)
        # the fp32 graph's own run: what the reference path reaches on these weights
        r = run_parity(fp32_dir, ckpt, sampler=args.sampler, steps=args.steps, backend=args.device,
                       precision="fp32", seed=args.seed, raise_on_failure=False, atol=math.inf)
        report["rows"].append({"config": name, "candidate": "fp32 graph", "precision": "fp32",
                               "worst_per_call": r["max_per_call_abs_err"], "final": r["final_max_abs_err"],
                               "psnr_db": r["psnr_db"]})
        if time_batches:
            precisions = ("fp32", "tf32") if args.device == "cuda" else ("fp32",)
            report["rows"][-1]["ms_per_call"] = {p: _timing(fp32_dir, args.device, p, time_batches, args.repeats,
                                                            layouts) for p in precisions}
        save()
    fmt = lambda v: "" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [f"# fp16/bf16 graphs two ways ({args.sampler} {args.steps} steps on {args.device}, random weights)", "",
             "| config | candidate | onnx.checker | oldest onnxruntime | one call vs ORT fp32 (scale) | worst per call "
             "| final | PSNR dB | ms per call | error |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        lines.append(f"| {r['config']} | {r['candidate']} | {r.get('onnx_checker', '')} | "
                     f"{r.get('oldest_onnxruntime', '')} | {fmt(r.get('one_call_max_abs_diff'))} "
                     f"({fmt(r.get('output_scale'))}) | {fmt(r.get('worst_per_call'))} | {fmt(r.get('final'))} | "
                     f"{fmt(r.get('psnr_db'))} | {json.dumps(r.get('ms_per_call', ''))} | {r.get('error', '')[:160]} |")
    (args.out / "fp16_choice.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
