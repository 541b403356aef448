#!/usr/bin/env python
"""PyTorch against the exported runtime, side by side on this machine, and the speed targets of issue 5.

    python benchmarks/latency.py --config small --json bench-out/latency.json --plot bench-out/latency.png
    python benchmarks/latency.py --config small --ckpt demo/results/model-last.pt ...   # quality on a trained model
    vdeploy bench --config small ...                                                      # the same code

What it measures, every figure a ratio of two things measured in the same run:

1. per-call denoiser latency at batch 1 and 4 (median and min over ``--repeats`` after ``--warmup``),
   every backend called in turn in each round (round-robin, order rotated), so machine noise hits all:
   torch eager (the seed's 0.6.3 ``Unet3D`` and vdeploy's export-friendly one), ``torch.compile``,
   onnxruntime CPU fp32 through the runtime's ``OrtBackend`` (plain export, onnxslim'd, onnxruntime's
   offline-optimized graph, spinning threads), the fp16 graph, the fused CFG graph against two guided
   calls (conditioned models), and on a GPU onnxruntime CUDA, the TensorRT EP and a native TensorRT plan;
2. sampling: the seed's ``p_sample_loop`` and the runtime's ``ddpm`` over the same 1000-step chain
   (the first ``--loop-steps`` steps of each, timed and extrapolated per step when that is fewer than
   all: the report says so), and the runtime's ``dpmpp`` at 25 steps end to end, interleaved in rounds;
3. the share of runtime sampling time spent outside the denoiser (the backend's ``run`` is timed
   inside ``Pipeline.__call__``; everything else is loop overhead);
4. cold start: a fresh process that imports ``vdeploy.runtime`` and loads the model directory, against
   one that imports torch and loads the checkpoint (wall time from spawn, peak RSS);
5. FLOPs per call (``torch.utils.flop_counter``: matmul/conv FLOPs) and achieved GFLOP/s beside this
   machine's measured float32 matmul peak;
6. quality at fewer steps: ``dpmpp`` and ``ddim`` at 10/25/50 steps against the 1000-step DDIM (eta 0)
   solution from the same starting noise, on ``--ckpt``'s trained model (else the random model, noted).

Output: a markdown report on stdout, ``--json`` (keys ``machine``, ``config``, ``results``,
``ort_speedup_vs_torch``, ``loop_overhead_pct``, ``sampling``, ``cold_start``, ``flops``, ``quality``,
``targets``, ...) and ``--plot`` (a bar chart; needs matplotlib, the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger("vdeploy.bench")

TORCH_BACKENDS = ("torch-seed", "torch", "torch-compile")
CPU_RUNTIME_BACKENDS = ("ort", "ort-slim", "ort-offline", "ort-spin", "ort-fp16", "ort-cfg", "ort-guided")
GPU_RUNTIME_BACKENDS = ("ort-cuda", "ort-trt-ep", "ort-trt-ep-fp16", "tensorrt")
ALL_BACKENDS = TORCH_BACKENDS + CPU_RUNTIME_BACKENDS + GPU_RUNTIME_BACKENDS
# what `vdeploy export` (optimize=auto keeps the faster of these two) and the runtime ship on the CPU
SHIPPED_CPU = ("ort", "ort-slim")
SHIPPED_GPU = ("ort-cuda", "ort-trt-ep", "tensorrt")
# fp32 runtimes a user gets from `vdeploy export` + `Pipeline.from_dir` (sampling runs use the fastest of them)
SHIPPED_RUNTIME = ("ort", "ort-slim", "ort-cuda", "ort-trt-ep", "tensorrt")

DESCRIPTIONS = {
    "torch-seed": "torch eager, the seed's video-diffusion-pytorch 0.6.3 Unet3D (same weights)",
    "torch": "torch eager, vdeploy.model.Unet3D (folded layout, position tables precomputed)",
    "torch-compile": "torch.compile of vdeploy's Unet3D (inductor)",
    "ort": "onnxruntime CPU, plain export (runtime OrtBackend: ORT_ENABLE_ALL, no spinning)",
    "ort-slim": "onnxruntime CPU, onnxslim'd graph (what --optimize auto keeps when faster)",
    "ort-offline": "onnxruntime CPU, graph saved after ORT's offline ENABLE_EXTENDED optimization",
    "ort-spin": "onnxruntime CPU, plain graph, intra-op spinning allowed (ORT's default)",
    "ort-fp16": "onnxruntime CPU, denoiser_fp16.onnx (fp16 weights/activations, fp32 I/O)",
    "ort-cfg": "onnxruntime CPU, fused CFG graph: cond + null as one batch of 2b, one call",
    "ort-guided": "onnxruntime CPU, guidance as two calls of the plain graph (what --cfg replaces)",
    "ort-cuda": "onnxruntime CUDA EP (IO binding, cudnn EXHAUSTIVE)",
    "ort-trt-ep": "onnxruntime TensorRT EP, fp32",
    "ort-trt-ep-fp16": "onnxruntime TensorRT EP, fp16 kernels allowed",
    "tensorrt": "native TensorRT plan (runtime TensorRTBackend)",
}

QUALITY_PROMPT = "a red circle moving left"  # a caption of the synthetic demo data (vdeploy data synth)
QUALITY_COND_SCALE = 2.0  # the demo's guidance scale

TARGETS = {  # issue 5, CPU, small preset, batch 1
    "ort_speedup_vs_torch": (">=", 1.5),
    "loop_overhead_pct": ("<", 1.0),
    "dpmpp25_speedup_vs_seed1000": (">=", 40.0),
    "cold_start_speedup": (">=", 5.0),
}


class _Stop(Exception):
    """Raised from a step hook to end a sampling loop after the measured steps."""


# ----------------------------------------------------------------------------------------------- setup --


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog or "benchmarks/latency.py",
        description="PyTorch vs the exported vdeploy runtime: per-call latency, sampling, loop overhead, "
        "cold start, FLOPs and quality at fewer steps (issue 5).",
    )
    p.add_argument("--config", default=None, help="preset (tiny|small|base) or JSON config file [small]")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="benchmark this exported model dir instead of exporting --config (torch side: the "
                   "checkpoint its manifest names, else random weights of its config)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--plot", type=Path, default=None, help="write a bar chart PNG here (needs matplotlib)")
    p.add_argument("--backends", default="all",
                   help=f"comma list from {', '.join(ALL_BACKENDS)}; 'all' = every one that applies here [all]")
    p.add_argument("--ckpt", type=Path, default=None,
                   help="trained model for the quality section: a checkpoint, a results folder or an exported "
                   "model dir (default: the random benchmark model, noted)")
    p.add_argument("--cond-dim", type=int, default=None,
                   help="benchmark a conditioned variant of the config (enables the CFG comparison)")
    p.add_argument("--batches", default="1,4", help="batch sizes for per-call latency [1,4]")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds per batch size [15]")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per backend and batch [3]")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for torch and onnxruntime "
                   "[physical cores]")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the torch backends run; cuda also enables the GPU runtime backends [auto]")
    p.add_argument("--loop-steps", type=int, default=None,
                   help="steps timed of each 1000-step loop (extrapolated per step); default: all when that "
                   "fits ~8 s per loop, else enough for ~8 s")
    p.add_argument("--sampling-rounds", type=int, default=3, help="interleaved rounds of the sampling runs [3]")
    p.add_argument("--dpmpp-steps", type=int, default=25, help="steps of the fast sampler run [25]")
    p.add_argument("--quality-steps", default="10,25,50", help="sampler steps compared with the reference [10,25,50]")
    p.add_argument("--quality-ref-steps", type=int, default=None,
                   help="steps of the reference DDIM (eta 0) solution [all training timesteps]")
    p.add_argument("--quality-budget", type=float, default=900.0,
                   help="skip the quality section (with a note) when its estimated time exceeds this many "
                   "seconds [900]")
    p.add_argument("--cold-repeats", type=int, default=3, help="fresh processes per side for cold start [3]")
    p.add_argument("--skip", default="", help="comma list of sections to skip: sampling, coldstart, flops, "
                   "quality, profile")
    p.add_argument("--work", type=Path, default=None, help="folder for exports and checkpoints (kept); "
                   "default: a temporary folder, removed")
    p.add_argument("--seed", type=int, default=0, help="seeds weights, inputs and noise [0]")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    args.quality_steps = [int(s) for s in args.quality_steps.split(",") if s.strip()]
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = args.skip - {"sampling", "coldstart", "flops", "quality", "profile"}
    if unknown:
        p.error(f"--skip: unknown section(s) {', '.join(sorted(unknown))}")
    if args.backends == "all":
        args.backend_list = None
    else:
        args.backend_list = [b.strip() for b in args.backends.split(",") if b.strip()]
        bad = [b for b in args.backend_list if b not in ALL_BACKENDS]
        if bad:
            p.error(f"--backends: unknown {', '.join(bad)} (choose from {', '.join(ALL_BACKENDS)})")
    if args.model_dir is not None and (args.config is not None or args.cond_dim is not None):
        p.error("--model-dir takes its config from the model dir: leave out --config/--cond-dim")
    if args.model_dir is None and args.config is None:
        args.config = "small"
    if args.repeats < 1 or args.warmup < 0 or not args.batches or min(args.batches) < 1:
        p.error("--repeats must be >= 1, --warmup >= 0, --batches positive")
    return args


def progress(message: str) -> None:
    log.info("[%s] %s", time.strftime("%H:%M:%S"), message)


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info(threads: int, device: str) -> dict:
    import onnxruntime
    import torch

    from vdeploy.runtime.backends import gpu_name, physical_cores

    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "memory_gib": mem_gib,
        "threads": threads,
        "device": device,
        "gpu": gpu_name() if device == "cuda" else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "ort_providers": onnxruntime.get_available_providers(),
        "load_average_start": load_average(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def resolve_config(spec: str, cond_dim: int | None) -> tuple[str, dict]:
    from vdeploy import config as vconfig

    config = vconfig.load(spec)
    if cond_dim is not None:
        config = vconfig.resolve({**config, "cond_dim": cond_dim})
    name = spec if spec in vconfig.PRESETS else Path(spec).stem
    return name + (f"+cond{cond_dim}" if cond_dim is not None else ""), config


def random_unet(config: dict, seed: int):
    """vdeploy's ``Unet3D`` for ``config`` with seeded random weights (a nonzero position bias and null embedding)."""
    import torch

    from vdeploy import config as vconfig
    from vdeploy.model import Unet3D

    torch.manual_seed(seed)
    unet = Unet3D(**vconfig.unet_kwargs(config))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "relative_attention_bias" in name:
                p.normal_(0, 0.2)
    return unet.eval().requires_grad_(False)


def load_seed_module():
    """The seed ``video_diffusion_pytorch`` 0.6.3 module, imported with a stand-in torchvision (which
    cannot be installed beside the CPU torch; the package only uses it for training transforms)."""
    import importlib
    import types

    class _AnyAttr(types.ModuleType):
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.transforms", "torchvision.utils")}
    have_tv = importlib.util.find_spec("torchvision") is not None
    if not have_tv:
        tv = types.ModuleType("torchvision")
        tv.transforms, tv.utils = _AnyAttr("torchvision.transforms"), _AnyAttr("torchvision.utils")
        sys.modules.update({"torchvision": tv, "torchvision.transforms": tv.transforms, "torchvision.utils": tv.utils})
    try:
        module = importlib.import_module("video_diffusion_pytorch.video_diffusion_pytorch")
    finally:
        if not have_tv:
            for k, v in saved.items():
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v
    module.tqdm = lambda iterable, **kwargs: iterable  # no progress bar inside timed loops
    return module


def seed_unet(module, unet, config: dict, device):
    """The seed's ``Unet3D`` with ``unet``'s weights (state dicts are compatible both ways, strict)."""
    from vdeploy import config as vconfig

    kwargs = vconfig.unet_kwargs(config)
    if kwargs.pop("norm_type") != "group":
        raise RuntimeError("the seed 0.6.3 model has GroupNorm only (config norm_type is not 'group')")
    model = module.Unet3D(**kwargs)
    model.load_state_dict(unet.state_dict(), strict=True)
    return model.eval().requires_grad_(False).to(device)


def model_dir_unet(model_dir: Path, config: dict, seed: int):
    """The torch side of an exported model dir: the checkpoint its manifest names, else random weights."""
    from vdeploy.runtime import manifest as vmanifest

    source = vmanifest.load(model_dir).get("source") or {}
    ckpt = source.get("checkpoint")
    if ckpt and Path(ckpt).is_file():
        from vdeploy.export import load_unet

        unet, _, _ = load_unet(ckpt, default_config=config, ema=source.get("ema", True))
        return unet, f"checkpoint {ckpt}"
    return random_unet(config, seed), f"random (seed {seed}): the manifest's checkpoint {ckpt!r} is not here"


# ------------------------------------------------------------------------------------------- backends --


@dataclass
class Backend:
    """One way of running the denoiser. ``make(batch)`` returns a zero-argument call that runs it once,
    synchronously, on fixed inputs of that batch size."""

    name: str
    family: str  # "torch" | "runtime"
    make: Callable[[int], Callable[[], object]]
    description: str = ""
    device: str = "cpu"
    work_factor: int = 1  # denoiser evaluations per call (2 for guided / fused CFG)
    status: str = "ok"
    error: str | None = None
    setup_s: float = 0.0
    first_call_s: dict = field(default_factory=dict)
    times_ms: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)


class Inputs:
    """Fixed random denoiser inputs per batch size, as numpy arrays (and torch tensors on demand)."""

    def __init__(self, config: dict, seed: int):
        self.config = config
        self.seed = seed
        self._np: dict[int, dict] = {}

    def numpy(self, batch: int) -> dict:
        if batch not in self._np:
            c = self.config
            rng = np.random.default_rng(self.seed + batch)
            feed = {
                "x": rng.standard_normal((batch, c["channels"], c["num_frames"], c["image_size"], c["image_size"]),
                                         dtype=np.float32),
                "t": rng.integers(0, c["timesteps"], size=(batch,), dtype=np.int64),
            }
            if c.get("cond_dim"):
                feed["cond"] = rng.standard_normal((batch, c["cond_dim"]), dtype=np.float32)
            self._np[batch] = feed
        return self._np[batch]

    def torch(self, batch: int, device):
        import torch

        feed = self.numpy(batch)
        return {k: torch.from_numpy(v).to(device) for k, v in feed.items()}


def torch_call(model, inputs: Inputs, batch: int, device, cuda: bool):
    import torch

    feed = inputs.torch(batch, device)
    x, t, cond = feed["x"], feed["t"], feed.get("cond")

    def call():
        with torch.inference_mode():
            out = model(x, t, cond=cond)
        if cuda:
            torch.cuda.synchronize()
        return out

    return call


def runtime_call(backend, inputs: Inputs, batch: int, null_cond=None, guided: bool = False, cfg: bool = False):
    feed = dict(inputs.numpy(batch))
    names = [spec.name for spec in backend.inputs]
    feed = {name: feed[name] for name in names if name in feed}
    if cfg:
        feed["cond_scale"] = np.full((1,), 3.0, dtype=np.float32)
    if guided:
        null_feed = dict(feed, cond=np.repeat(null_cond, batch, axis=0))
        return lambda: (backend.run(feed), backend.run(null_feed))
    return lambda: backend.run(feed)


@dataclass
class Variants:
    """The graph files of the benchmark model: exported, and derived here."""

    model_dir: Path
    manifest: dict
    plain: Path
    slim: Path | None = None
    offline: Path | None = None
    fp16: Path | None = None
    cfg: Path | None = None
    plan: Path | None = None
    parity: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def _reusable(out: Path, config: dict, source: dict, *, cfg: bool, fp16: bool, plan: bool) -> bool:
    """A previous export in ``--work`` of the same config and weights seed, with the graphs wanted."""
    from vdeploy.runtime import manifest as vmanifest

    try:
        manifest = vmanifest.load(out)
    except Exception:  # noqa: BLE001 (absent or stale: export again)
        return False
    graphs = manifest.get("graphs", {})
    return (manifest.get("config") == json.loads(json.dumps(config))
            and (manifest.get("source") or {}).get("bench_seed") == source["bench_seed"]
            and (not cfg or "denoiser_cfg" in graphs) and (not fp16 or "denoiser_fp16" in graphs)
            and (not plan or bool(manifest.get("engines"))))


def export_model(unet, config: dict, work: Path, wanted: set[str], device: str, seed: int,
                 model_dir: Path | None = None) -> tuple[Variants, float]:
    """Export the benchmark model (plain fp32; the CFG and fp16 graphs and a TensorRT plan where wanted)
    and derive the onnxslim and onnxruntime-offline variants; each derived graph is checked against the
    plain one on one random input. An export of the same config and seed in ``work`` is reused."""
    from vdeploy.export import export_unet
    from vdeploy.runtime import manifest as vmanifest

    has_cond = bool(config.get("cond_dim"))
    trt_options = None
    if device == "cuda" and "tensorrt" in wanted:
        try:
            from vdeploy.export.tensorrt import TensorRTOptions, import_tensorrt

            import_tensorrt()
            trt_options = TensorRTOptions(fp16=False, max_batch=max(8, 2 * 4))
        except Exception as e:  # noqa: BLE001
            log.info("no TensorRT plan: %s", e)
    if model_dir is not None:
        return variants_of(model_dir, config, work, wanted), 0.0
    out = work / "model"
    cfg = has_cond and "ort-cfg" in wanted
    fp16 = "ort-fp16" in wanted
    source = {"checkpoint": str(work / "model.pt"), "step": 0, "ema": True, "bench_seed": seed}
    started = time.perf_counter()
    reused = _reusable(out, config, source, cfg=cfg, fp16=fp16, plan=trt_options is not None)
    if reused:
        log.info("reusing the export in %s (same config, seed and graphs)", out)
    else:
        export_unet(unet, config, out, source=source, cfg=cfg, fp16=fp16, optimize="none", tensorrt=trt_options)
    seconds = time.perf_counter() - started
    return variants_of(out, config, work, wanted), seconds


def variants_of(out: Path, config: dict, work: Path, wanted: set[str]) -> Variants:
    """The graphs of model dir ``out`` plus the onnxslim / onnxruntime-offline variants derived in ``work``."""
    from vdeploy.runtime import manifest as vmanifest

    manifest = vmanifest.load(out)
    graphs = manifest["graphs"]
    v = Variants(out, manifest, out / graphs["denoiser"]["file"])
    if "denoiser_fp16" in graphs:
        v.fp16 = out / graphs["denoiser_fp16"]["file"]
    if "denoiser_cfg" in graphs:
        v.cfg = out / graphs["denoiser_cfg"]["file"]
    for engine in manifest.get("engines") or []:
        if engine.get("graph") == "denoiser":
            v.plan = out / engine["file"]
    from vdeploy.export.optimize import ort_offline, slim

    derived = work / "variants"
    derived.mkdir(parents=True, exist_ok=True)
    key = manifest["files"][graphs["denoiser"]["file"]][:12]  # derived graphs are reused while the source is the same
    if (graphs["denoiser"].get("optimization") or {}).get("kept") == "onnxslim":
        v.notes.append("the model dir's denoiser.onnx is already onnxslim'd: 'ort' runs that graph, 'ort-slim' "
                       "slims it again")
    for name, make, attr in (("ort-slim", slim, "slim"), ("ort-offline", ort_offline, "offline")):
        if name not in wanted:
            continue
        path = derived / f"denoiser.{key}.{attr}.onnx"
        try:
            if not path.is_file():
                tmp = path.with_name(path.name + ".partial.onnx")
                make(v.plain, tmp)
                os.replace(tmp, path)
            setattr(v, attr, path)
        except Exception as e:  # noqa: BLE001
            v.notes.append(f"{name}: deriving the graph failed: {str(e).strip().splitlines()[0]}")
    v.parity = {k: round(e, 8) for k, e in graph_errors(v, config).items()}
    return v


def graph_errors(v: Variants, config: dict) -> dict:
    """Max abs difference of each derived graph's output from the plain graph's on one random input
    (the export itself checked the plain and fp16 graphs against PyTorch: see the manifest's parity)."""
    from vdeploy.export.checks import ort_session

    feed = Inputs(config, 99).numpy(1)
    reference = ort_session(v.plain).run(None, feed)[0]
    errors = {}
    for name, path in (("ort-slim", v.slim), ("ort-offline", v.offline), ("ort-fp16", v.fp16)):
        if path is not None:
            out = ort_session(path).run(None, feed)[0]
            errors[name] = float(np.abs(out.astype(np.float64) - reference).max())
    return errors


def build_backends(args, config, unet, variants: Variants, inputs: Inputs, device: str, threads: int) -> list[Backend]:
    """Every requested backend that applies here; one that cannot start is kept with its error."""
    import torch

    from vdeploy.export.wrapper import Denoiser
    from vdeploy.runtime.backends import OrtBackend, TensorRTBackend, ort_providers

    has_cond = bool(config.get("cond_dim"))
    cuda = device == "cuda"
    providers = ort_providers()
    requested = args.backend_list
    backends: list[Backend] = []

    def want(name: str) -> bool:
        return requested is None or name in requested

    def add(name: str, family: str, opener: Callable[[], Callable[[int], Callable]], *, work_factor: int = 1,
            on: str = "cpu", note: str | None = None) -> None:
        b = Backend(name, family, make=lambda batch: None, description=DESCRIPTIONS[name], device=on,
                    work_factor=work_factor)
        t0 = time.perf_counter()
        try:
            b.make = opener()
        except Exception as e:  # noqa: BLE001 (a backend that cannot start is reported, not fatal)
            b.status, b.error = "failed", f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        b.setup_s = time.perf_counter() - t0
        if note:
            b.extra["note"] = note
        backends.append(b)

    def skipped(name: str, why: str) -> None:
        if requested is not None and name in requested:
            backends.append(Backend(name, "runtime" if name.startswith(("ort", "tensorrt")) else "torch",
                                    make=lambda batch: None, description=DESCRIPTIONS[name], status="skipped",
                                    error=why))

    tdev = torch.device(device)
    if want("torch-seed"):
        def open_seed():
            model = seed_unet(load_seed_module(), unet, config, tdev)
            return lambda batch: torch_call(model, inputs, batch, tdev, cuda)
        add("torch-seed", "torch", open_seed, on=device)
    denoiser = Denoiser(unet, config["num_frames"]).to(tdev).eval()
    if want("torch"):
        add("torch", "torch", lambda: (lambda batch: torch_call(denoiser, inputs, batch, tdev, cuda)), on=device)
    if want("torch-compile"):
        def open_compiled():
            compiled = torch.compile(denoiser, dynamic=False)
            return lambda batch: torch_call(compiled, inputs, batch, tdev, cuda)
        add("torch-compile", "torch", open_compiled, on=device,
            note="compile time is in first_call_s; every batch size compiles once")

    def ort(path: Path | None, kind: str = "cpu", **kwargs):
        def opener():
            if path is None:
                raise RuntimeError("graph not available (see notes)")
            backend = OrtBackend(path, kind, threads=threads if kind == "cpu" else None, **kwargs)
            return lambda batch: runtime_call(backend, inputs, batch)
        return opener

    if want("ort"):
        add("ort", "runtime", ort(variants.plain))
    if want("ort-slim"):
        add("ort-slim", "runtime", ort(variants.slim))
    if want("ort-offline"):
        add("ort-offline", "runtime", ort(variants.offline))
    if want("ort-spin"):
        def open_spin():
            backend = OrtBackend(variants.plain, "cpu", threads=threads)
            import onnxruntime

            options = onnxruntime.SessionOptions()  # the runtime's options, but spinning (ORT's default)
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            backend.session = onnxruntime.InferenceSession(str(variants.plain), sess_options=options,
                                                           providers=["CPUExecutionProvider"])
            return lambda batch: runtime_call(backend, inputs, batch)
        add("ort-spin", "runtime", open_spin)
    if want("ort-fp16"):
        add("ort-fp16", "runtime", ort(variants.fp16))
    if has_cond:
        null = np.load(variants.model_dir / "null_cond_emb.npy").reshape(1, -1).astype(np.float32)
        if want("ort-cfg"):
            def open_cfg():
                if variants.cfg is None:
                    raise RuntimeError("no CFG graph exported")
                backend = OrtBackend(variants.cfg, "cpu", threads=threads)
                return lambda batch: runtime_call(backend, inputs, batch, cfg=True)
            add("ort-cfg", "runtime", open_cfg, work_factor=2)
        if want("ort-guided"):
            def open_guided():
                backend = OrtBackend(variants.plain, "cpu", threads=threads)
                return lambda batch: runtime_call(backend, inputs, batch, null_cond=null, guided=True)
            add("ort-guided", "runtime", open_guided, work_factor=2)
    else:
        for name in ("ort-cfg", "ort-guided"):
            skipped(name, "the model is unconditioned (no cond_dim): pass --cond-dim N for the CFG comparison")

    gpu_kinds = {"ort-cuda": "CUDAExecutionProvider", "ort-trt-ep": "TensorrtExecutionProvider",
                 "ort-trt-ep-fp16": "TensorrtExecutionProvider"}
    for name, provider in gpu_kinds.items():
        if not want(name):
            continue
        if not cuda or provider not in providers:
            if requested is not None:
                skipped(name, f"needs --device cuda and onnxruntime-gpu with {provider}")
            continue
        if name == "ort-cuda":
            add(name, "runtime", ort(variants.plain, "cuda"), on="cuda")
        else:
            profile = trt_ep_profile(variants.manifest, max(args.batches) * 2)
            add(name, "runtime", ort(variants.plain, "tensorrt-ep", fp16=name.endswith("fp16"), profile=profile),
                on="cuda", note="engine build time is in setup_s/first_call_s (cached between runs)")
    if want("tensorrt"):
        if cuda and variants.plan is not None:
            def open_trt():
                backend = TensorRTBackend(variants.plan)
                return lambda batch: runtime_call(backend, inputs, batch)
            add("tensorrt", "runtime", open_trt, on="cuda")
        elif requested is not None or cuda:
            skipped("tensorrt", "needs a CUDA GPU and the tensorrt module (a plan is built at export)")
    return backends


def trt_ep_profile(manifest: dict, max_batch: int) -> dict:
    """The TensorRT EP shape profile the runtime would use (``Pipeline.from_dir``'s, batch 1..max_batch)."""
    from vdeploy.runtime.pipeline import _profile

    graph = manifest["graphs"]["denoiser"]
    return _profile(graph, manifest["config"], (manifest.get("conditioning") or {}).get("cond_dim"), max_batch)


# ------------------------------------------------------------------------------------ per-call timing --


def measure_per_call(backends: list[Backend], batches: list[int], warmup: int, repeats: int) -> None:
    """Warm up every backend, then time rounds in which each backend runs once (order rotated)."""
    for batch in batches:
        live = []
        for b in backends:
            if b.status != "ok":
                continue
            try:
                fn = b.make(batch)
                t0 = time.perf_counter()
                fn()
                b.first_call_s[str(batch)] = round(time.perf_counter() - t0, 4)
                for _ in range(max(warmup - 1, 0)):
                    fn()
            except Exception as e:  # noqa: BLE001 (e.g. torch.compile without a working compiler)
                b.status = "failed"
                msg = str(e).strip().splitlines()
                b.error = f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]
                progress(f"{b.name} failed at batch {batch}: {b.error}")
                continue
            b.calls[batch] = fn
            live.append(b)
        progress(f"batch {batch}: timing {len(live)} backends x {repeats} rounds (load {load_average()})")
        times: dict[str, list[float]] = {b.name: [] for b in live}
        for r in range(repeats):
            order = live[r % len(live):] + live[: r % len(live)] if live else []
            for b in order:
                fn = b.calls[batch]
                t0 = time.perf_counter()
                fn()
                times[b.name].append((time.perf_counter() - t0) * 1e3)
        for b in live:
            v = np.asarray(times[b.name])
            b.times_ms[str(batch)] = {
                "median": round(float(np.median(v)), 3),
                "min": round(float(v.min()), 3),
                "p90": round(float(np.percentile(v, 90)), 3),
                "n": int(v.size),
            }
        for b in live:
            b.calls.pop(batch, None)  # free the compiled/batched state of this size


# ------------------------------------------------------------------------------------ flops and peak --


def count_flops(unet, config: dict, inputs: Inputs, batches: list[int]) -> dict:
    """Matmul/conv FLOPs of one denoiser call (``torch.utils.flop_counter``; elementwise ops not counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vdeploy.export.wrapper import Denoiser

    den = Denoiser(unet, config["num_frames"]).cpu().eval()
    out = {}
    for batch in batches:
        feed = inputs.torch(batch, "cpu")
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), counter:
            den(feed["x"], feed["t"], feed.get("cond"))
        out[str(batch)] = int(counter.get_total_flops())
    by_op = {}
    with contextlib.suppress(Exception):
        by_op = {str(k): int(v) for k, v in counter.get_flop_counts()["Global"].items()}
    return {"per_call": out, "method": "torch.utils.flop_counter.FlopCounterMode (conv, matmul, bmm, addmm; "
            "2 FLOPs per MAC; norms, softmax and elementwise ops not counted)", "by_op_last_batch": by_op}


def _best_of(fn, repeats: int, sync=None) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        best = min(best, time.perf_counter() - t0)
    return best


def _ort_matmul(n: int, threads: int):
    """A one-node onnxruntime MatMul session (MLAS, the kernels the exported graphs run on) and its feed."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])], "matmul",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in ("A", "B")],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def matmul_peak(device: str, threads: int, sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5) -> dict:
    """This machine's measured float32 matmul throughput (GFLOP/s): the best square product of torch,
    numpy and onnxruntime at each size (on CUDA: torch, TF32 off). ``peak_gflops`` is the highest."""
    import torch

    result: dict = {"threads": threads, "sizes": list(sizes), "gflops": {}}
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        n = 8192
        a, b = torch.randn(n, n, device="cuda"), torch.randn(n, n, device="cuda")
        _best_of(lambda: a @ b, 3, torch.cuda.synchronize)
        result["gflops"][f"torch_cuda_{n}"] = round(2 * n**3 / _best_of(lambda: a @ b, 10, torch.cuda.synchronize) / 1e9, 1)
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        an, bn = a.numpy(), b.numpy()
        candidates = {"torch": lambda: a @ b, "numpy": lambda: an @ bn}
        with contextlib.suppress(Exception):
            session = _ort_matmul(n, threads)
            feed = {"A": an, "B": bn}
            candidates["onnxruntime"] = lambda: session.run(None, feed)
        for lib, fn in candidates.items():
            fn()  # warm-up
            result["gflops"][f"{lib}_cpu_{n}"] = round(2 * n**3 / _best_of(fn, repeats) / 1e9, 1)
    on = [v for k, v in result["gflops"].items() if ("cuda" in k) == (device == "cuda")]
    result["peak_gflops"] = max(on)
    result["peak_source"] = max((v, k) for k, v in result["gflops"].items() if v in on)[1]
    return result


# ------------------------------------------------------------------------------------------- sampling --


class TimedBackend:
    """A runtime backend whose ``run`` time is summed: the denoiser's share of a sampling run."""

    def __init__(self, inner):
        self.inner = inner
        self.inputs, self.outputs = inner.inputs, inner.outputs
        self.name, self.kind = inner.name, inner.kind
        self.path = getattr(inner, "path", None)
        self.seconds = 0.0
        self.calls = 0

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def run(self, feeds):
        t0 = time.perf_counter()
        out = self.inner.run(feeds)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def open_runtime_backend(variants: Variants, name: str, threads: int):
    """The runtime backend object for one of the fp32 backends measured per call."""
    from vdeploy.runtime.backends import OrtBackend, TensorRTBackend

    paths = {"ort": variants.plain, "ort-slim": variants.slim, "ort-offline": variants.offline}
    if name in paths:
        return OrtBackend(paths[name], "cpu", threads=threads)
    if name == "ort-spin":
        return OrtBackend(variants.plain, "cpu", threads=threads)  # the runtime never spins; its graph
    if name == "ort-cuda":
        return OrtBackend(variants.plain, "cuda")
    if name == "ort-trt-ep":
        return OrtBackend(variants.plain, "tensorrt-ep", profile=trt_ep_profile(variants.manifest, 8))
    if name == "tensorrt":
        return TensorRTBackend(variants.plan)
    raise ValueError(name)


def seed_sampler(args, config: dict, unet, device: str):
    """``(run(k) -> seconds for the first k steps of the seed's p_sample_loop, description)``."""
    import torch

    from vdeploy import config as vconfig

    tdev = torch.device(device)
    shape = (1, config["channels"], config["num_frames"], config["image_size"], config["image_size"])
    cond = None
    if config.get("cond_dim"):
        cond = torch.from_numpy(np.random.default_rng(args.seed).standard_normal((1, config["cond_dim"]),
                                                                                 dtype=np.float32)).to(tdev)
    try:
        module = load_seed_module()
        model = seed_unet(module, unet, config, tdev)
        diffusion = module.GaussianDiffusion(model, **{k: v for k, v in vconfig.diffusion_kwargs(config).items()}).to(tdev)
        what = "video-diffusion-pytorch 0.6.3 GaussianDiffusion.p_sample_loop (the seed)"
        counted = model
    except Exception as e:  # noqa: BLE001
        from vdeploy.diffusion import GaussianDiffusion

        log.warning("the seed package is not importable (%s); using vdeploy.diffusion's faithful copy", e)
        diffusion = GaussianDiffusion(unet, **vconfig.diffusion_kwargs(config)).to(tdev)
        what = f"vdeploy.diffusion.GaussianDiffusion.p_sample_loop (seed package not importable: {e})"
        counted = unet

    def run(k: int) -> float:
        calls = [0]
        original = counted.forward_with_cond_scale

        def counting(*a, **kw):
            if calls[0] >= k:
                raise _Stop
            calls[0] += 1
            return original(*a, **kw)

        counted.forward_with_cond_scale = counting  # instance attribute: the loop calls it once per step
        kwargs = {"progress": False} if "vdeploy" in what else {}
        try:
            t0 = time.perf_counter()
            try:
                diffusion.p_sample_loop(shape, cond=cond, **kwargs)
            except _Stop:
                pass
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0
        finally:
            del counted.forward_with_cond_scale

    return run, what


def runtime_pipeline(variants: Variants, backend):
    from vdeploy.runtime import Pipeline

    return Pipeline(variants.model_dir, variants.manifest, backend)


def measure_sampling(args, config, unet, variants: Variants, runtime_name: str, per_call_s: float, threads: int,
                     device: str) -> dict:
    """Seed p_sample_loop vs runtime ddpm over the same chain (first k steps), and runtime dpmpp end to end,
    interleaved in rounds; loop overhead from the timed backend."""
    T = int(config["timesteps"])
    dpmpp_steps = min(args.dpmpp_steps, T)
    k = args.loop_steps or (T if per_call_s * T <= 8.0 else max(10, min(T, int(round(8.0 / max(per_call_s, 1e-6))))))
    k = max(1, min(k, T))
    timed = TimedBackend(open_runtime_backend(variants, runtime_name, threads))
    pipe = runtime_pipeline(variants, timed)
    seed_run, seed_what = seed_sampler(args, config, unet, device)
    cond = None
    if config.get("cond_dim"):
        cond = np.random.default_rng(args.seed).standard_normal((1, config["cond_dim"]), dtype=np.float32)

    def runtime_ddpm() -> tuple[float, float, int]:
        done = [0]

        def stop(info):
            done[0] += 1
            if done[0] >= k and k < T:
                raise _Stop

        timed.reset()
        t0 = time.perf_counter()
        try:
            pipe(batch_size=1, cond=cond, sampler="ddpm", seed=args.seed, callback=stop)
        except _Stop:
            pass
        return time.perf_counter() - t0, timed.seconds, timed.calls

    def runtime_dpmpp() -> tuple[float, float, int]:
        timed.reset()
        t0 = time.perf_counter()
        pipe(batch_size=1, cond=cond, sampler="dpmpp", steps=dpmpp_steps, seed=args.seed)
        return time.perf_counter() - t0, timed.seconds, timed.calls

    # warm-up: one step each
    seed_run(1)
    pipe(batch_size=1, cond=cond, sampler="dpmpp", steps=1, seed=args.seed)
    rounds = {"seed": [], "ddpm": [], "dpmpp": []}
    for r in range(args.sampling_rounds):
        progress(f"sampling round {r + 1}/{args.sampling_rounds}: seed loop {k} steps, runtime ddpm {k} steps, "
                 f"dpmpp {dpmpp_steps} steps (load {load_average()})")
        rounds["seed"].append(seed_run(k))
        rounds["ddpm"].append(runtime_ddpm())
        rounds["dpmpp"].append(runtime_dpmpp())
    med = lambda xs: float(np.median(xs))  # noqa: E731
    seed_step = med([s / k for s in rounds["seed"]])
    ddpm_step = med([w / k for w, _, _ in rounds["ddpm"]])
    dpmpp_s = med([w for w, _, _ in rounds["dpmpp"]])
    overhead = lambda runs: med([100.0 * (w - d) / w for w, d, _ in runs])  # noqa: E731
    extrapolated = k < T
    return {
        "batch": 1,
        "timesteps": T,
        "measured_steps": k,
        "extrapolated": extrapolated,
        "note": (f"the 1000-step loops were timed over their first {k} of {T} steps (every step costs one "
                 f"denoiser call at any t) and extrapolated per step to {T}" if extrapolated
                 else f"all {T} steps measured"),
        "rounds": args.sampling_rounds,
        "runtime_backend": runtime_name,
        "seed_sampler": seed_what,
        "seed_ddpm": {"per_step_ms": round(seed_step * 1e3, 3), "total_s": round(seed_step * T, 2)},
        "runtime_ddpm": {"per_step_ms": round(ddpm_step * 1e3, 3), "total_s": round(ddpm_step * T, 2),
                         "loop_overhead_pct": round(overhead(rounds["ddpm"]), 3)},
        "runtime_dpmpp": {"steps": dpmpp_steps, "total_s": round(dpmpp_s, 3),
                          "per_step_ms": round(dpmpp_s / dpmpp_steps * 1e3, 3),
                          "loop_overhead_pct": round(overhead(rounds["dpmpp"]), 3)},
        "ddpm_speedup_equal_steps": round(seed_step / ddpm_step, 3),
        "dpmpp_speedup_vs_seed_1000": round(seed_step * T / dpmpp_s, 2),
        "raw_s": {"seed": [round(s, 4) for s in rounds["seed"]],
                  "runtime_ddpm": [[round(a, 4), round(b, 4), c] for a, b, c in rounds["ddpm"]],
                  "runtime_dpmpp": [[round(a, 4), round(b, 4), c] for a, b, c in rounds["dpmpp"]]},
    }


# -------------------------------------------------------------------------------------------- quality --


def quality_model(args, config: dict, unet, variants: Variants, work: Path) -> tuple[Path, str, dict]:
    """``(model dir, description, config)`` of the model the quality section samples."""
    if args.ckpt is None:
        return variants.model_dir, "random weights (no --ckpt): the errors show the samplers' behaviour on an " \
                                   "untrained denoiser, not on a trained one", config
    from vdeploy.runtime import manifest as vmanifest

    ckpt = args.ckpt
    if ckpt.is_dir() and (ckpt / vmanifest.MANIFEST_NAME).is_file():
        return ckpt, f"exported model dir {ckpt}", vmanifest.load(ckpt)["config"]
    if ckpt.is_dir():
        from vdeploy.checkpoint import latest_checkpoint

        found = latest_checkpoint(ckpt)
        if found is None:
            raise SystemExit(f"--ckpt {ckpt}: no model-*.pt checkpoint and no vdeploy.json in it")
        ckpt = found
    from vdeploy.export import export_onnx

    out = work / "quality_model"
    manifest = export_onnx(ckpt, out, optimize="none")
    return out, f"trained checkpoint {ckpt} (step {manifest['source'].get('step')})", manifest["config"]


def measure_quality(args, model_dir: Path, what: str, config: dict, threads: int, per_call_s: float | None,
                    backend: str) -> dict:
    from vdeploy.runtime import Pipeline

    T = int(config["timesteps"])
    ref_steps = min(args.quality_ref_steps or T, T)
    steps = [s for s in args.quality_steps if s <= T]
    pipe = Pipeline.from_dir(model_dir, backend=backend, threads=threads)
    noise = np.random.default_rng(args.seed + 7).standard_normal((1, *pipe.shape), dtype=np.float32)
    guidance: dict = {}
    if pipe.text_encoder is not None:  # a captioned model: a prompt with guidance, as the demo samples
        guidance = {"text": QUALITY_PROMPT, "cond_scale": QUALITY_COND_SCALE}
    elif pipe.cond_dim:
        guidance = {"cond": pipe.null_cond}  # unconditional, through the learned null embedding
    # estimate: one call to time the denoiser of this model
    t0 = time.perf_counter()
    pipe(batch_size=1, noise=noise, **guidance, sampler="ddim", steps=1)
    call_s = time.perf_counter() - t0
    calls = ref_steps + 2 * sum(steps)
    estimate = call_s * calls
    result = {"model": what, "config": {k: config[k] for k in ("dim", "dim_mults", "image_size", "num_frames",
                                                               "timesteps")},
              "reference": f"ddim eta=0, {ref_steps} steps" + ("" if ref_steps == T else f" (of {T}: reduced)"),
              "noise_seed": args.seed + 7, "space": "output video in [0, 1]", "estimated_s": round(estimate, 1),
              "conditioning": ({k: v for k, v in guidance.items() if k != "cond"} or
                               ("null embedding" if guidance else "unconditional model"))}
    if estimate > args.quality_budget:
        result["skipped"] = (f"estimated {estimate:.0f} s > --quality-budget {args.quality_budget:.0f} s; "
                             "pass a smaller model via --ckpt, --quality-ref-steps, or a larger budget")
        return result
    progress(f"quality: reference ddim {ref_steps} steps + dpmpp/ddim at {steps} (~{estimate:.0f} s)")
    t0 = time.perf_counter()
    ref = pipe(batch_size=1, noise=noise, **guidance, sampler="ddim", steps=ref_steps, eta=0.0)
    result["reference_s"] = round(time.perf_counter() - t0, 2)
    rows = []
    for sampler in ("dpmpp", "ddim"):
        for s in steps:
            t0 = time.perf_counter()
            out = pipe(batch_size=1, noise=noise, **guidance, sampler=sampler, steps=s)
            secs = time.perf_counter() - t0
            diff = out.astype(np.float64) - ref
            mse = float(np.mean(diff**2))
            rows.append({
                "sampler": sampler, "steps": s, "seconds": round(secs, 3),
                "max_abs_err": round(float(np.abs(diff).max()), 5),
                "rmse": round(mse**0.5, 5),
                "psnr_db": None if mse == 0 else round(10 * np.log10(1.0 / mse), 2),
            })
    result["rows"] = rows
    dropped = [s for s in args.quality_steps if s > T]
    if dropped:
        result["note"] = f"steps {dropped} exceed the model's {T} timesteps and were left out"
    return result


# ----------------------------------------------------------------------------------------- cold start --

# Peak RSS is read from /proc/self/status (VmHWM: this process image's high-water mark); getrusage's
# ru_maxrss would also count the parent's memory that the fork copied before exec.
_HWM = r"""
def hwm_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
"""

_RUNTIME_CHILD = _HWM + r"""
import json, sys, time
t0 = time.time()
import numpy as np
from vdeploy.runtime import Pipeline
t1 = time.time()
pipe = Pipeline.from_dir(sys.argv[1], backend=sys.argv[2], threads=int(sys.argv[3]))
t2 = time.time()
rss = hwm_kb()
x = np.zeros((1, *pipe.shape), dtype=np.float32)
cond = None if pipe.cond_dim is None else pipe.null_cond
pipe.denoiser()(x, np.zeros((1,), dtype=np.int64), cond)
t3 = time.time()
print("BENCH " + json.dumps({"start": t0, "imported": t1, "loaded": t2, "first_call": t3, "rss_loaded_kb": rss,
                             "peak_kb": hwm_kb(), "torch_imported": "torch" in sys.modules}))
"""

_TORCH_CHILD = _HWM + r"""
import json, sys, time
t0 = time.time()
import torch
torch.set_num_threads(int(sys.argv[3]))
t1 = time.time()
from vdeploy.export import load_unet
unet, config, step = load_unet(sys.argv[1])
t2 = time.time()
rss = hwm_kb()
dev = torch.device(sys.argv[2])
unet = unet.to(dev)
x = torch.zeros((1, config["channels"], config["num_frames"], config["image_size"], config["image_size"]), device=dev)
cond = None if not config.get("cond_dim") else torch.zeros((1, config["cond_dim"]), device=dev)
with torch.inference_mode():
    unet(x, torch.zeros((1,), dtype=torch.long, device=dev), cond=cond)
if dev.type == "cuda":
    torch.cuda.synchronize()
t3 = time.time()
print("BENCH " + json.dumps({"start": t0, "imported": t1, "loaded": t2, "first_call": t3, "rss_loaded_kb": rss,
                             "peak_kb": hwm_kb()}))
"""


def _child(code: str, argv: list[str], env: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1", **(env or {}))
    spawned = time.time()
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, text=True)
    out, err = proc.communicate()
    exited = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"cold-start child failed ({proc.returncode}): {err.strip()[-500:]}")
    line = [ln for ln in out.splitlines() if ln.startswith("BENCH ")][-1]
    data = json.loads(line[6:])
    return {
        "to_loaded_s": data["loaded"] - spawned,  # interpreter start + imports + load
        "interpreter_s": data["start"] - spawned,
        "import_s": data["imported"] - data["start"],
        "load_s": data["loaded"] - data["imported"],
        "first_call_s": data["first_call"] - data["loaded"],
        "process_s": exited - spawned,
        "rss_loaded_mib": data["rss_loaded_kb"] / 1024,
        "peak_rss_mib": data["peak_kb"] / 1024,
        "torch_imported": data.get("torch_imported"),
    }


def write_checkpoint(unet, config: dict, path: Path) -> Path:
    """The benchmark model as a vdeploy checkpoint (what a torch user loads)."""
    from vdeploy import config as vconfig
    from vdeploy.checkpoint import make_checkpoint, save_checkpoint
    from vdeploy.diffusion import GaussianDiffusion

    state = GaussianDiffusion(unet, **vconfig.diffusion_kwargs(config)).state_dict()
    return save_checkpoint(make_checkpoint(step=0, model=state, ema=state, optimizer=None, scaler=None,
                                           config=config), path)


def measure_cold_start(variants: Variants, ckpt: Path, repeats: int, threads: int, runtime_kind: str,
                       device: str) -> dict:
    """Fresh processes, alternating sides; one untimed round first (page cache) when repeating, then medians.

    The runtime keeps onnxruntime's optimized graph in its cache after the first load on a machine; the
    ``runtime_first_load`` side times that first load (an empty cache folder each run)."""
    rt_args = [str(variants.model_dir), runtime_kind, str(threads)]
    torch_args = [str(ckpt), device, str(threads)]
    sides = {"runtime": (_RUNTIME_CHILD, rt_args), "torch": (_TORCH_CHILD, torch_args)}
    if runtime_kind == "cpu":
        sides["runtime_first_load"] = (_RUNTIME_CHILD, rt_args)
    if repeats > 1:  # an untimed round first: page cache, .pyc files, the runtime's graph cache
        for side, (code, argv) in sides.items():
            if side != "runtime_first_load":
                _child(code, argv)
    runs = {side: [] for side in sides}
    for r in range(repeats):
        progress(f"cold start {r + 1}/{repeats} (load {load_average()})")
        for side, (code, argv) in sides.items():
            if side == "runtime_first_load":
                with tempfile.TemporaryDirectory(prefix="vdeploy-cache-") as empty:
                    runs[side].append(_child(code, argv, {"VDEPLOY_CACHE": empty}))
            else:
                runs[side].append(_child(code, argv))

    def summary(rows: list[dict]) -> dict:
        keys = [k for k in rows[0] if isinstance(rows[0][k], float)]
        out = {k: round(float(np.median([r[k] for r in rows])), 3) for k in keys}
        out["min_to_loaded_s"] = round(min(r["to_loaded_s"] for r in rows), 3)
        return out

    rt, tr = summary(runs["runtime"]), summary(runs["torch"])
    rt["torch_imported"] = any(r["torch_imported"] for r in runs["runtime"])
    extra = {}
    if "runtime_first_load" in runs:
        first = summary(runs["runtime_first_load"])
        extra["runtime_first_load"] = first | {
            "what": "the runtime's first load on a machine: onnxruntime optimizes the graph (ORT_ENABLE_ALL) "
                    "and the runtime caches it; later loads open the cached graph",
            "speedup": round(tr["to_loaded_s"] / first["to_loaded_s"], 2),
        }
    return extra | {
        "runtime": rt | {"what": f"python -c 'from vdeploy.runtime import Pipeline; Pipeline.from_dir(DIR, "
                                 f"backend={runtime_kind!r})' (sha256 of every file verified)"},
        "torch": tr | {"what": "python -c 'import torch; from vdeploy.export import load_unet; load_unet(CKPT)'"},
        "speedup": round(tr["to_loaded_s"] / rt["to_loaded_s"], 2),
        "rss_ratio": round(tr["rss_loaded_mib"] / rt["rss_loaded_mib"], 2),
        "repeats": repeats,
        "note": "to_loaded_s: from spawning the process to the model being loaded (interpreter start, "
                "imports, load); rss_loaded_mib: peak RSS at that point; first_call_s and peak_rss_mib "
                "include one denoiser call after it",
    }


# --------------------------------------------------------------------------------------------- report --


def _psnr(value) -> str:
    return "inf" if value is None else f"{value:.1f}"


def fmt_ms(entry: dict | None) -> str:
    if not entry:
        return "–"
    return f"{entry['median']:.1f} ({entry['min']:.1f})"


def summarize(backends: list[Backend], flops: dict | None, peak: dict | None) -> tuple[dict, dict, str | None, str | None]:
    """JSON entries per backend, the headline speedups, the torch baseline and best shipped runtime."""
    by = {b.name: b for b in backends if b.status == "ok" and "1" in b.times_ms}
    baseline = next((n for n in ("torch-seed", "torch") if n in by), None)
    results = {}
    for b in backends:
        entry = {
            "family": b.family,
            "description": b.description,
            "device": b.device,
            "status": b.status,
            "per_call_ms": b.times_ms,
            "setup_s": round(b.setup_s, 3),
            "first_call_s": b.first_call_s,
            "denoiser_evals_per_call": b.work_factor,
        }
        if b.error:
            entry["error"] = b.error
        if b.extra:
            entry.update(b.extra)
        if b.status == "ok" and baseline and "1" in b.times_ms:
            entry["speedup_vs_torch_eager_b1"] = round(
                by[baseline].times_ms["1"]["median"] * b.work_factor / b.times_ms["1"]["median"], 3)
        if flops and b.times_ms:
            entry["gflops_per_s"] = {
                batch: round(flops["per_call"][batch] * b.work_factor / (t["median"] / 1e3) / 1e9, 2)
                for batch, t in b.times_ms.items() if batch in flops["per_call"]
            }
            if peak:
                entry["pct_of_matmul_peak"] = {
                    batch: round(100 * g / peak["peak_gflops"], 1) for batch, g in entry["gflops_per_s"].items()
                }
        results[b.name] = entry
    best_cpu = _fastest(by, SHIPPED_CPU)
    # the headline compares torch with the runtime on the same device: the GPU runtimes when torch ran on CUDA
    on_gpu = baseline is not None and by[baseline].device == "cuda"
    best = _fastest(by, SHIPPED_GPU) if on_gpu else best_cpu
    speedups = {}
    if baseline and best:
        speedups = {
            "baseline": baseline,
            "runtime": best,
            "b1": round(by[baseline].times_ms["1"]["median"] / by[best].times_ms["1"]["median"], 3),
        }
        if "4" in by[baseline].times_ms and "4" in by[best].times_ms:
            speedups["b4"] = round(by[baseline].times_ms["4"]["median"] / by[best].times_ms["4"]["median"], 3)
        if "torch" in by and baseline != "torch":
            speedups["vs_vdeploy_torch_b1"] = round(
                by["torch"].times_ms["1"]["median"] / by[best].times_ms["1"]["median"], 3)
    return results, speedups, baseline, best_cpu


def _fastest(by: dict, names: tuple[str, ...]) -> str | None:
    present = [n for n in names if n in by]
    return min(present, key=lambda n: by[n].times_ms["1"]["median"]) if present else None


def evaluate_targets(report: dict) -> dict:
    measured = {
        "ort_speedup_vs_torch": report.get("ort_speedup_vs_torch"),
        "loop_overhead_pct": report.get("loop_overhead_pct"),
        "dpmpp25_speedup_vs_seed1000": (report.get("sampling") or {}).get("dpmpp_speedup_vs_seed_1000"),
        "cold_start_speedup": (report.get("cold_start") or {}).get("speedup"),
    }
    out = {}
    for key, (op, target) in TARGETS.items():
        value = measured[key]
        met = None if value is None else (value >= target if op == ">=" else value < target)
        out[key] = {"target": f"{op} {target:g}", "measured": value, "met": met}
    return out


def markdown(report: dict) -> str:
    m, c = report["machine"], report["config"]
    lines = [
        f"## vdeploy latency: {c['name']} (dim {c['model']['dim']}, mults {c['model']['dim_mults']}, "
        f"{c['model']['num_frames']} frames, {c['model']['image_size']} px{', cond ' + str(c['model']['cond_dim']) if c['model'].get('cond_dim') else ''})",
        "",
        f"{m['cpu']}, {m['physical_cores']} cores, {m['threads']} threads"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + f"; torch {m['torch']}, onnxruntime {m['onnxruntime']}; load average {m['load_average_start']} at start, "
        f"{m.get('load_average_end')} at end.",
        "",
        "1-minute load as each section started/ended (this benchmark's own threads count): "
        + ", ".join(f"{k} {'/'.join(str(x) for x in v)}" for k, v in (report.get("load_1min") or {}).items()) + ".",
        "",
        f"Per-call denoiser latency, ms: median (min) of {c['repeats']} interleaved rounds after {c['warmup']} warm-up calls.",
        "",
        "| backend | batch 1 | batch 4 | vs torch eager (b1) | GFLOP/s (b1) | notes |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    peak = (report.get("flops") or {}).get("matmul_peak", {}).get("peak_gflops")
    for name, r in report["results"].items():
        if r["status"] != "ok":
            lines.append(f"| {name} | – | – | – | – | {r['status']}: {r.get('error', '')} |")
            continue
        g = (r.get("gflops_per_s") or {}).get("1")
        gtxt = "–" if g is None else (f"{g:.1f}" + (f" ({100 * g / peak:.0f}%)" if peak else ""))
        sp = r.get("speedup_vs_torch_eager_b1")
        notes = []
        if r["denoiser_evals_per_call"] > 1:
            notes.append(f"{r['denoiser_evals_per_call']} evals/call")
        if name == "torch-compile" and r["first_call_s"]:
            notes.append(f"compile + first call {r['first_call_s'].get('1', 0):.0f} s (inductor cache may be warm)")
        lines.append(f"| {name} | {fmt_ms(r['per_call_ms'].get('1'))} | {fmt_ms(r['per_call_ms'].get('4'))} | "
                     f"{'–' if sp is None else f'{sp:.2f}x'} | {gtxt} | {'; '.join(notes)} |")
    fl = report.get("flops")
    if fl:
        lines += ["", f"FLOPs per call: {fl['per_call'].get('1', 0) / 1e9:.2f} GFLOP at batch 1 (matmul/conv); "
                      f"this machine's measured fp32 matmul peak {peak} GFLOP/s ({fl['matmul_peak']['peak_source']}; "
                      + ", ".join(f"{k} {v}" for k, v in fl["matmul_peak"]["gflops"].items()) + ")."]
    sp = report.get("ort_speedup_detail") or {}
    if sp:
        lines += ["", f"onnxruntime ({sp['runtime']}) vs torch eager ({sp['baseline']}): {sp['b1']:.2f}x at batch 1"
                      + (f", {sp['b4']:.2f}x at batch 4" if "b4" in sp else "")
                      + (f"; vs vdeploy's torch model {sp['vs_vdeploy_torch_b1']:.2f}x" if "vs_vdeploy_torch_b1" in sp else "")
                      + "."]
    s = report.get("sampling")
    if s:
        lines += [
            "", f"Sampling, batch 1 ({s['note']}; median of {s['rounds']} interleaved rounds; runtime backend "
                f"{s['runtime_backend']}):", "",
            "| run | steps | total s | per step ms | outside the denoiser |",
            "| --- | --- | --- | --- | --- |",
            f"| seed p_sample_loop (torch) | {s['timesteps']} | {s['seed_ddpm']['total_s']:.1f}"
            f"{'*' if s['extrapolated'] else ''} | {s['seed_ddpm']['per_step_ms']:.1f} | – |",
            f"| runtime ddpm | {s['timesteps']} | {s['runtime_ddpm']['total_s']:.1f}{'*' if s['extrapolated'] else ''} | "
            f"{s['runtime_ddpm']['per_step_ms']:.1f} | {s['runtime_ddpm']['loop_overhead_pct']:.2f}% |",
            f"| runtime dpmpp | {s['runtime_dpmpp']['steps']} | {s['runtime_dpmpp']['total_s']:.2f} | "
            f"{s['runtime_dpmpp']['per_step_ms']:.1f} | {s['runtime_dpmpp']['loop_overhead_pct']:.2f}% |",
            "",
            (f"\\* extrapolated from {s['measured_steps']} measured steps. " if s["extrapolated"] else "")
            + f"ddpm at equal steps: runtime {s['ddpm_speedup_equal_steps']:.2f}x faster; dpmpp {s['runtime_dpmpp']['steps']} "
              f"steps vs the seed's {s['timesteps']}-step sampler: {s['dpmpp_speedup_vs_seed_1000']:.1f}x.",
        ]
    cs = report.get("cold_start")
    if cs:
        r, t = cs["runtime"], cs["torch"]
        lines += [
            "", f"Cold start (fresh process, median of {cs['repeats']}):", "",
            "| process | spawn → loaded s | import s | load s | RSS at load MiB | + first call s | peak RSS MiB |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            f"| runtime: import vdeploy.runtime + Pipeline.from_dir | {r['to_loaded_s']:.2f} | {r['import_s']:.2f} | "
            f"{r['load_s']:.2f} | {r['rss_loaded_mib']:.0f} | {r['first_call_s']:.2f} | {r['peak_rss_mib']:.0f} |",
            f"| torch: import torch + load checkpoint | {t['to_loaded_s']:.2f} | {t['import_s']:.2f} | {t['load_s']:.2f} | "
            f"{t['rss_loaded_mib']:.0f} | {t['first_call_s']:.2f} | {t['peak_rss_mib']:.0f} |",
        ]
        first = cs.get("runtime_first_load")
        if first:
            lines.append(f"| runtime, first load on this machine (graph cache empty) | {first['to_loaded_s']:.2f} | "
                         f"{first['import_s']:.2f} | {first['load_s']:.2f} | {first['rss_loaded_mib']:.0f} | "
                         f"{first['first_call_s']:.2f} | {first['peak_rss_mib']:.0f} |")
        lines += ["", f"Runtime cold start {cs['speedup']:.1f}x faster than torch, {cs['rss_ratio']:.1f}x less memory "
                      f"at load" + (f"; its first load on a machine {first['speedup']:.1f}x." if first else ".")]
    q = report.get("quality")
    if q:
        cond = q.get("conditioning")
        cond = ", ".join(f"{k} {v!r}" for k, v in cond.items()) if isinstance(cond, dict) else cond
        lines += ["", f"Quality at fewer steps vs {q['reference']} from the same noise ({q['model']}; {cond}):", ""]
        if q.get("skipped"):
            lines.append(f"skipped: {q['skipped']}")
        else:
            lines += ["| sampler | steps | max abs err | RMSE | PSNR dB | seconds |", "| --- | --- | --- | --- | --- | --- |"]
            for row in q["rows"]:
                lines.append(f"| {row['sampler']} | {row['steps']} | {row['max_abs_err']:.4f} | {row['rmse']:.4f} | "
                             f"{_psnr(row['psnr_db'])} | {row['seconds']:.2f} |")
            lines.append(f"\nreference run: {q['reference_s']:.1f} s.")
    tg = report.get("targets")
    if tg:
        lines += ["", "| target (CPU, small, batch 1) | wanted | measured | |", "| --- | --- | --- | --- |"]
        for key, t in tg.items():
            mark = "–" if t["met"] is None else ("met" if t["met"] else "MISSED")
            lines.append(f"| {key} | {t['target']} | {'–' if t['measured'] is None else t['measured']} | {mark} |")
    prof = report.get("profile")
    if prof:
        lines += ["", f"onnxruntime profile of {prof['graph']} (batch 1): by op "
                      + ", ".join(f"{k} {100 * v:.0f}%" for k, v in list(prof["by_op"].items())[:8])
                      + "; by part " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in prof["by_part"].items()) + "."]
    for note in report.get("notes", []):
        lines.append(f"\nNote: {note}")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> str | None:
    """A bar chart of per-call latency (and the sampling runs); returns why not when it cannot be drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'vdeploy[dev]'): no plot written"
    ok = {n: r for n, r in report["results"].items() if r["status"] == "ok" and r["per_call_ms"]}
    s = report.get("sampling")
    fig, axes = plt.subplots(1, 2 if s else 1, figsize=(13 if s else 8, 4.8), squeeze=False)
    ax = axes[0][0]
    names = list(ok)
    batches = sorted({b for r in ok.values() for b in r["per_call_ms"]}, key=int)
    width = 0.8 / max(len(batches), 1)
    for i, batch in enumerate(batches):
        vals = [ok[n]["per_call_ms"].get(batch, {}).get("median", 0) for n in names]
        ax.bar(np.arange(len(names)) + i * width, vals, width, label=f"batch {batch}")
    ax.set_xticks(np.arange(len(names)) + width * (len(batches) - 1) / 2)
    ax.set_xticklabels(names, rotation=35, ha="right")
    ax.set_ylabel("ms per denoiser call (median)")
    ax.set_title(f"{report['config']['name']}: per-call latency")
    ax.legend()
    if s:
        ax = axes[0][1]
        labels = [f"seed ddpm {s['timesteps']}", f"runtime ddpm {s['timesteps']}", f"runtime dpmpp {s['runtime_dpmpp']['steps']}"]
        vals = [s["seed_ddpm"]["total_s"], s["runtime_ddpm"]["total_s"], s["runtime_dpmpp"]["total_s"]]
        ax.bar(labels, vals, color=["tab:gray", "tab:blue", "tab:green"])
        ax.set_yscale("log")
        ax.set_ylabel("seconds per video (log)" + (" *extrapolated" if s["extrapolated"] else ""))
        ax.set_title("sampling, batch 1")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ----------------------------------------------------------------------------------------------- main --


def run(args: argparse.Namespace) -> dict:
    import torch

    from vdeploy.runtime.backends import physical_cores

    threads = args.threads or physical_cores()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    torch.set_num_threads(threads)
    unet = None
    if args.model_dir is not None:
        from vdeploy.runtime import manifest as vmanifest

        config = vmanifest.load(args.model_dir)["config"]
        name = args.model_dir.name
        unet, weights = model_dir_unet(args.model_dir, config, args.seed)
    else:
        name, config = resolve_config(args.config, args.cond_dim)
        weights = f"random (seed {args.seed})"
    report: dict = {"machine": machine_info(threads, device), "notes": []}
    report["config"] = {
        "name": name, "spec": args.config, "model": config, "batches": args.batches, "repeats": args.repeats,
        "warmup": args.warmup, "threads": threads, "device": device, "weights": weights,
        "command": shlex.join(["python", "benchmarks/latency.py", *args.argv]),
    }
    load = report["machine"]["load_average_start"]
    if load and load[0] >= 1.0:
        report["notes"].append(f"load average {load[0]} at start (>= 1 on {os.cpu_count()} CPUs): other work was "
                               "running; absolute times are inflated and ratios noisier")
    loads: dict[str, list] = {}
    report["load_1min"] = loads

    def mark(section: str) -> None:  # the 1-minute load average as a section starts and ends
        value = load_average()
        loads.setdefault(section, []).append(value[0] if value else None)

    wanted = set(args.backend_list or ALL_BACKENDS)
    owns_work = args.work is None
    work = Path(tempfile.mkdtemp(prefix="vdeploy-bench-")) if owns_work else args.work
    work.mkdir(parents=True, exist_ok=True)
    try:
        if unet is None:
            progress(f"{name}: exporting the benchmark model to {work}")
            unet = random_unet(config, args.seed)
        variants, export_s = export_model(unet, config, work, wanted, device, args.seed, args.model_dir)
        report["export"] = {"seconds": round(export_s, 1), "derived_graph_max_abs_err_vs_plain": variants.parity,
                            "parity_vs_torch": variants.manifest.get("parity")}
        report["notes"] += variants.notes
        inputs = Inputs(config, args.seed)
        unet = unet.to(device)
        backends = build_backends(args, config, unet, variants, inputs, device, threads)
        for b in backends:
            if b.status != "ok":
                progress(f"{b.name}: {b.status} ({b.error})")
        mark("per_call")
        measure_per_call(backends, args.batches, args.warmup, args.repeats)
        mark("per_call")

        flops = peak = None
        if "flops" not in args.skip:
            progress("counting FLOPs and measuring the matmul peak")
            flops = count_flops(unet.cpu(), config, inputs, args.batches)
            unet.to(device)
            peak = matmul_peak(device, threads)
            flops["matmul_peak"] = peak
        results, speedups, baseline, best_cpu = summarize(backends, flops, peak)
        report["results"] = results
        report["flops"] = flops
        report["ort_speedup_vs_torch"] = speedups.get("b1")
        report["ort_speedup_detail"] = speedups

        ok = {n: r for n, r in results.items() if r["status"] == "ok" and "1" in r["per_call_ms"]}
        fp32_runtime = [n for n in SHIPPED_RUNTIME if n in ok and (device == "cuda") == (ok[n]["device"] == "cuda")]
        if not fp32_runtime:  # e.g. --device cuda with a CPU-only onnxruntime
            fp32_runtime = [n for n in SHIPPED_RUNTIME if n in ok]
        runtime_name = min(fp32_runtime, key=lambda n: ok[n]["per_call_ms"]["1"]["median"]) if fp32_runtime else None
        report["loop_overhead_pct"] = None
        report["sampling"] = None
        if "sampling" not in args.skip and runtime_name:
            torch_ref = baseline or runtime_name
            per_call_s = max(ok[torch_ref]["per_call_ms"]["1"]["median"], ok[runtime_name]["per_call_ms"]["1"]["median"]) / 1e3
            mark("sampling")
            report["sampling"] = measure_sampling(args, config, unet, variants, runtime_name, per_call_s, threads, device)
            mark("sampling")
            report["loop_overhead_pct"] = report["sampling"]["runtime_dpmpp"]["loop_overhead_pct"]

        runtime_kind = "cpu" if runtime_name is None or ok[runtime_name]["device"] == "cpu" else \
            {"ort-cuda": "cuda", "ort-trt-ep": "tensorrt-ep", "tensorrt": "tensorrt"}[runtime_name]
        report["cold_start"] = None
        if "coldstart" not in args.skip:
            ckpt = (variants.manifest.get("source") or {}).get("checkpoint")
            if args.model_dir is None or not ckpt or not Path(ckpt).is_file():
                ckpt = write_checkpoint(unet.cpu(), config, work / "model.pt")
                unet.to(device)
            mark("cold_start")
            report["cold_start"] = measure_cold_start(variants, ckpt, args.cold_repeats, threads, runtime_kind, device)
            mark("cold_start")

        report["profile"] = None
        if "profile" not in args.skip and best_cpu:
            from vdeploy.export.profile import profile_graph

            path = {"ort": variants.plain, "ort-slim": variants.slim}[best_cpu]
            progress(f"onnxruntime profile of {path.name}")
            prof = profile_graph(path, inputs.numpy(1), threads=threads, runs=max(5, min(args.repeats, 10)))
            report["profile"] = {"graph": path.name, **{k: prof[k] for k in ("run_ms", "kernel_ms", "by_op", "by_part")},
                                 "top_nodes": prof["top_nodes"][:10]}

        report["quality"] = None
        if "quality" not in args.skip:
            q_dir, q_what, q_config = quality_model(args, config, unet, variants, work)
            per_call = ok[runtime_name]["per_call_ms"]["1"]["median"] / 1e3 if runtime_name else None
            mark("quality")
            report["quality"] = measure_quality(args, q_dir, q_what, q_config, threads, per_call, runtime_kind)
            mark("quality")
        report["targets"] = evaluate_targets(report)
        if device == "cuda":
            report["notes"].append("the targets are defined for the CPU; on a GPU they are shown for reference")
        report["machine"]["load_average_end"] = load_average()
        # this benchmark's own busy threads count in the load average (about `threads` while it measures)
        busy = [k for k, v in loads.items() if any(x is not None and x > threads + 1.0 for x in v)]
        if busy:
            report["notes"].append(
                f"other work ran during: {', '.join(busy)} (1-minute load above {threads + 1} = this benchmark's "
                f"{threads} threads + 1; see load_1min). torch's OpenMP threads degrade far more under CPU "
                "contention than onnxruntime's non-spinning pool (a torch step can take 10-50x its quiet time), so "
                "torch-side figures from those sections overstate the runtime's advantage: rerun on a quiet machine")
    finally:
        if owns_work:
            shutil.rmtree(work, ignore_errors=True)
    return report


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the benchmark; ``argv`` as on the command line. Returns the exit code (2: bad input)."""
    from vdeploy.config import ConfigError
    from vdeploy.export import ExportError
    from vdeploy.runtime import ManifestError
    from vdeploy.runtime.atomic import unwritable, write_text

    args = parse_args(argv, prog)
    for option, path in (("--json", args.json), ("--plot", args.plot)):  # found now, not after the whole run
        why = path is not None and unwritable(path)
        if why:
            print(f"error: {option} {path}: cannot write there ({why})", file=sys.stderr)
            return 2
    if not args.quiet:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    logging.getLogger("vdeploy.export").setLevel(logging.WARNING)
    try:
        report = run(args)
    except (ConfigError, ExportError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.json, json.dumps(report, indent=2, default=str) + "\n")
    if args.plot:
        why = plot(report, args.plot)
        if why:
            report["notes"].append(why)
            print(f"note: {why}", file=sys.stderr)
    print(markdown(report))
    if args.json:
        print(f"JSON: {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
