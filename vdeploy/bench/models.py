"""The benchmark's models: configs, the torch models (vdeploy's and the seed's), the exported model
directory (reused from ``--work`` when it matches), the derived-graph directories, the checkpoint."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import time
import types
from dataclasses import dataclass, field, replace
from pathlib import Path

from .common import log

# derived graphs: flavour -> how it is made from the plain graph (vdeploy.export.optimize)
DERIVED = ("slim", "offline")


@dataclass
class ModelDir:
    """The exported benchmark model, and the model directories derived from its plain graph.

    Attributes:
        path / manifest: the model directory and its typed manifest.
        derived: flavour (``slim``, ``offline``) -> ``(directory, manifest)``: a model directory holding
            only that graph as its ``denoiser``, so that the runtime opens it like any other.
        notes: what the report should say about them.
    """

    path: Path
    manifest: object  # vdeploy.runtime.manifest.Manifest
    derived: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


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
    if kwargs.pop("frame_conditioning", False):
        raise RuntimeError("the seed 0.6.3 model has no frame conditioning (config frame_conditioning is true)")
    if kwargs.pop("text_cross_attention", False):
        raise RuntimeError("the seed 0.6.3 model has no token text conditioning (config text_cross_attention is true)")
    model = module.Unet3D(**kwargs)
    model.load_state_dict(unet.state_dict(), strict=True)
    return model.eval().requires_grad_(False).to(device)


def model_dir_unet(model_dir: Path, config: dict, seed: int):
    """The torch side of an exported model dir: the checkpoint its manifest names, else random weights."""
    from vdeploy.runtime import manifest as vmanifest

    source = vmanifest.load(model_dir).source
    ckpt = source.get("checkpoint")
    if ckpt and Path(ckpt).is_file():
        from vdeploy.export import load_unet

        unet, _, _ = load_unet(ckpt, default_config=config, ema=source.get("ema", True))
        return unet, f"checkpoint {ckpt}"
    return random_unet(config, seed), f"random (seed {seed}): the manifest's checkpoint {ckpt!r} is not here"


def _reusable(out: Path, config: dict, seed: int, *, cfg: bool, fp16: bool, plan: bool) -> bool:
    """A previous export in ``--work`` of the same config and weights seed, with the graphs wanted
    (loading it checks every file's sha256)."""
    from vdeploy.runtime import manifest as vmanifest

    try:
        m = vmanifest.load(out)
    except vmanifest.ManifestError:  # absent or stale: export again
        return False
    return (dict(m.config) == json.loads(json.dumps(config)) and m.source.get("bench_seed") == seed
            and (not cfg or m.find_graph(guidance=True) is not None)
            and (not fp16 or m.find_graph(precision="fp16") is not None)
            and (not plan or bool(m.engines)))


def export_model(unet, config: dict, work: Path, *, cfg: bool, fp16: bool, device: str, seed: int,
                 model_dir: Path | None = None) -> tuple[ModelDir, float]:
    """The benchmark model as a model directory: ``model_dir`` as given, else an export of ``unet`` (plain
    fp32; the CFG and fp16 graphs and, on CUDA with TensorRT, an fp32 plan). Reused from ``work`` when a
    previous run exported the same config and seed."""
    from vdeploy.runtime import manifest as vmanifest

    if model_dir is not None:
        return ModelDir(model_dir, vmanifest.load(model_dir)), 0.0
    from vdeploy.export import export_unet

    trt_options = None
    if device == "cuda":
        try:
            from vdeploy.export.tensorrt import TensorRTOptions, import_tensorrt

            import_tensorrt()
            trt_options = TensorRTOptions(fp16=False, max_batch=8)
        except Exception as e:  # noqa: BLE001 (no TensorRT here: its rows say why)
            log.info("no TensorRT plan: %s", e)
    out = work / "model"
    cfg = cfg and bool(config.get("cond_dim"))
    source = {"checkpoint": str(work / "model.pt"), "step": 0, "ema": True, "bench_seed": seed}
    started = time.perf_counter()
    if _reusable(out, config, seed, cfg=cfg, fp16=fp16, plan=trt_options is not None):
        log.info("reusing the export in %s (same config, seed and graphs)", out)
    else:
        export_unet(unet, config, out, source=source, cfg=cfg, fp16=fp16, optimize="none", tensorrt=trt_options)
    seconds = time.perf_counter() - started
    return ModelDir(out, vmanifest.load(out)), seconds


def derive_graphs(model: ModelDir, work: Path, flavours) -> None:
    """Make the onnxslim'd (``slim``) and onnxruntime-offline (``offline``) model directories asked for.

    Each holds the derived graph as its only denoiser and a manifest written through the runtime's
    ``Manifest.write``; one derived from the same source graph (by sha256) is reused.
    """
    from vdeploy.export.optimize import ort_offline, slim
    from vdeploy.runtime import manifest as vmanifest

    manifest = model.manifest
    graph = manifest.graphs["denoiser"]
    source_sha = manifest.files[graph.file]
    if (graph.optimization or {}).get("kept") == "onnxslim":
        model.notes.append("the model dir's denoiser.onnx is already onnxslim'd: 'ort' runs that graph, "
                           "'ort-slim' slims it again")
    convert = {"slim": slim, "offline": ort_offline}
    for flavour in [f for f in DERIVED if f in flavours]:
        out = work / "variants" / f"denoiser-{source_sha[:12]}-{flavour}"
        try:
            derived = vmanifest.load(out)
            if derived.source.get("derived_from_sha256") != source_sha:
                raise vmanifest.ManifestError("derived from another graph")
        except vmanifest.ManifestError:
            try:
                derived = _derive(model, out, flavour, convert[flavour], source_sha)
            except Exception as e:  # noqa: BLE001 (a variant that cannot be made is a note, not fatal)
                model.notes.append(f"{flavour}: deriving the graph failed: {str(e).strip().splitlines()[0]}")
                continue
        model.derived[flavour] = (out, derived)


def _derive(model: ModelDir, out: Path, flavour: str, convert, source_sha: str):
    from vdeploy.runtime.manifest import Conditioning

    manifest = model.manifest
    graph = manifest.graphs["denoiser"]
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        convert(model.path / graph.file, tmp / "denoiser.onnx")
        derived = replace(
            manifest,
            graphs={"denoiser": replace(graph, file="denoiser.onnx", optimization={"derived": flavour})},
            engines=(), conditioning=Conditioning(cond_dim=manifest.cond_dim), parity={}, files={},
            source={**manifest.source, "derived_from": str(model.path), "derived_from_sha256": source_sha},
        ).write(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return derived


def write_checkpoint(unet, config: dict, path: Path) -> Path:
    """The benchmark model as a vdeploy checkpoint (what a torch user loads)."""
    from vdeploy import config as vconfig
    from vdeploy.checkpoint import make_checkpoint, save_checkpoint
    from vdeploy.diffusion import GaussianDiffusion

    state = GaussianDiffusion(unet, **vconfig.diffusion_kwargs(config)).state_dict()
    return save_checkpoint(make_checkpoint(step=0, model=state, ema=state, optimizer=None, scaler=None,
                                           config=config), path)


def quality_model(ckpt: Path | None, model: ModelDir, config: dict, work: Path) -> tuple[Path, str, dict]:
    """``(model dir, description, config)`` of the model the quality section samples: ``--ckpt`` (a
    checkpoint, a results folder or an exported model dir), else the random benchmark model."""
    if ckpt is None:
        return model.path, ("random weights (no --ckpt): the errors show the samplers' behaviour on an "
                            "untrained denoiser, not on a trained one"), config
    from vdeploy.runtime import manifest as vmanifest

    if ckpt.is_dir() and (ckpt / vmanifest.MANIFEST_NAME).is_file():
        return ckpt, f"exported model dir {ckpt}", dict(vmanifest.load(ckpt).config)
    if ckpt.is_dir():
        from vdeploy.checkpoint import latest_checkpoint

        found = latest_checkpoint(ckpt)
        if found is None:
            raise SystemExit(f"--ckpt {ckpt}: no model-*.pt checkpoint and no vdeploy.json in it")
        ckpt = found
    from vdeploy.export import export_onnx

    out = work / "quality_model"
    manifest = export_onnx(ckpt, out, optimize="none")
    return out, f"trained checkpoint {ckpt} (step {manifest.source.get('step')})", dict(manifest.config)
