"""On a machine with a CUDA GPU and TensorRT 10: build the engine, check its parity and latency, in one run.

    python benchmarks/tensorrt_check.py --config small --out trt-out/ [--ckpt model-10.pt] [--fp32]

1. exports the denoiser (``vdeploy.export.export_unet`` / ``export_onnx`` with ``--tensorrt``): ONNX,
   its onnxruntime checks, the serialized engine and the manifest, into ``OUT/model``;
2. runs the engine with TensorRT's Python API (torch CUDA tensors as buffers) against the same
   ``Unet3D`` in torch CUDA fp32 eager on fresh inputs at batch 1 and the profile's max batch;
3. times both (CUDA-synchronized, warm-up, median over repeats), torch also under fp16 autocast;
4. writes ``OUT/tensorrt_check.json`` and prints it.

Without TensorRT or a GPU it stops with one line and exit code 2. Written against TensorRT's documented
Python API; it has not been run where this file was written (no GPU there).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


class EngineRunner:
    """A deserialized engine and one execution context; inputs and outputs are torch CUDA tensors."""

    def __init__(self, plan: Path):
        import tensorrt as trt
        import torch

        self.trt, self.torch = trt, torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {plan}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.stream = torch.cuda.Stream()

    def _dtype(self, name: str):
        return self.torch.from_numpy(np.empty(0, dtype=self.trt.nptype(self.engine.get_tensor_dtype(name)))).dtype

    def __call__(self, feeds: dict) -> "torch.Tensor":  # noqa: F821
        keep = []
        for name in self.inputs:
            tensor = feeds[name].to(device="cuda", dtype=self._dtype(name)).contiguous()
            keep.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = self.torch.empty(shape, dtype=self._dtype(name), device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        self.stream.synchronize()
        return outputs[self.outputs[0]]


def _time(fn, repeats: int, warmup: int = 3) -> dict:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": float(np.median(times)), "min_ms": float(np.min(times))}


def run(config: str | None, out: Path, *, ckpt: str | None = None, fp16: bool = True, max_batch: int = 4,
        repeats: int = 20, timing_cache: str | None = None) -> dict:
    """Build, check and time; return (and write) the report."""
    try:
        import tensorrt as trt
    except ImportError as e:
        _fail(f"tensorrt does not import ({e}); install vdeploy[tensorrt] on a CUDA machine")
    import torch

    if not torch.cuda.is_available():
        _fail("torch sees no CUDA GPU (this check compares the engine with torch CUDA)")
    from vdeploy import config as vconfig
    from vdeploy.export import export_onnx, export_unet, load_unet
    from vdeploy.export.tensorrt import TensorRTOptions
    from vdeploy.model import Unet3D

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    options = TensorRTOptions(fp16=fp16, max_batch=max_batch, timing_cache=timing_cache)
    t0 = time.perf_counter()
    if ckpt:
        unet, cfg, _ = load_unet(ckpt, config=config)
        manifest = export_onnx(ckpt, out / "model", config=config, tensorrt=options, optimize="none")
    else:
        cfg = vconfig.load(config or "small")
        torch.manual_seed(0)
        unet = Unet3D(**vconfig.unet_kwargs(cfg)).eval()
        manifest = export_unet(unet, cfg, out / "model", tensorrt=options, optimize="none")
    export_seconds = time.perf_counter() - t0
    engine_entry = manifest.engines[0]  # vdeploy.runtime.manifest.Engine
    runner = EngineRunner(out / "model" / engine_entry.file)
    unet = unet.cuda().eval()
    cond_dim = manifest.cond_dim

    rng = np.random.default_rng(0)
    parity, latency = {}, {}
    c, f, s = cfg["channels"], cfg["num_frames"], cfg["image_size"]
    for b in sorted({1, max_batch}):
        feeds = {
            "x": torch.from_numpy(rng.standard_normal((b, c, f, s, s), dtype=np.float32)).cuda(),
            "t": torch.from_numpy(rng.integers(0, cfg["timesteps"], size=(b,))).cuda(),
        }
        if cond_dim:
            feeds["cond"] = torch.from_numpy(rng.standard_normal((b, cond_dim), dtype=np.float32)).cuda()
        with torch.no_grad():
            ref = unet(feeds["x"], feeds["t"], cond=feeds.get("cond")).float()
            got = runner(feeds).float()
            parity[f"b{b}"] = float((got - ref).abs().max())

            def torch_fp32():
                return unet(feeds["x"], feeds["t"], cond=feeds.get("cond"))

            def torch_fp16():
                with torch.autocast("cuda", dtype=torch.float16):
                    return unet(feeds["x"], feeds["t"], cond=feeds.get("cond"))

            latency[f"b{b}"] = {
                "tensorrt": _time(lambda: runner(feeds), repeats),
                "torch_cuda_fp32": _time(torch_fp32, repeats),
                "torch_cuda_fp16_autocast": _time(torch_fp16, repeats),
            }
            lat = latency[f"b{b}"]
            lat["speedup_vs_torch_fp32"] = lat["torch_cuda_fp32"]["median_ms"] / lat["tensorrt"]["median_ms"]

    report = {
        "machine": {"gpu": torch.cuda.get_device_name(0), "tensorrt": trt.__version__, "torch": torch.__version__,
                    "python": platform.python_version()},
        "config": cfg,
        "engine": engine_entry.to_json(),
        "export_seconds": round(export_seconds, 1),
        "parity": {"reference": "torch CUDA fp32 eager", "max_abs_err_per_batch": parity,
                   "max_abs_err": max(parity.values()), "onnxruntime_cpu": dict(manifest.parity)},
        "latency": latency,
    }
    (out / "tensorrt_check.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None,
                        help="preset or JSON (default: small; with --ckpt: only where the checkpoint holds none)")
    parser.add_argument("--ckpt", default=None, help="checkpoint to export (default: random weights)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the model dir and tensorrt_check.json")
    parser.add_argument("--fp32", action="store_true", help="build without the FP16 flag")
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--timing-cache", default=None)
    args = parser.parse_args(argv)
    report = run(args.config, args.out, ckpt=args.ckpt, fp16=not args.fp32, max_batch=args.max_batch,
                 repeats=args.repeats, timing_cache=args.timing_cache)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
