"""``vdeploy export``: a checkpoint in, a checked model directory out.

The model directory is built in a temporary directory next to the target and renamed into place only
when every graph has passed its checks, so a failed export leaves nothing behind::

    denoiser.onnx            eps = denoiser(x, t[, cond])            (fp32; onnxslim'd when that is faster)
    denoiser_cfg.onnx        eps = denoiser_cfg(x, t, cond, cond_scale)   (--cfg)
    denoiser_fp16.onnx       float16 weights/activations, fp32 I/O   (--fp16)
    denoiser.<gpu>.trt<v>.<precision>.plan                           (--tensorrt)
    null_cond_emb.npy        the learned null embedding (1, cond_dim) (conditioned models)
    null_text_tokens.npy     the learned null token sequence (L, cond_dim) (text_cross_attention models)
    text_encoder/            model.onnx + tokenizer.json             (text-conditioned models)
    vdeploy.json             the manifest (vdeploy.runtime.manifest)
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from vdeploy.runtime.manifest import Conditioning, Engine, Graph, Manifest, Schedule, sha256_file

from .checks import check_graph, check_parity, denoiser_cases
from .spec import DEFAULT_OPSET, FP16_ATOL, FP32_ATOL, ExportError, ExportSpec, ValidationError, denoiser_spec
from .variants import VARIANTS, selected
from .variants import variant_options as variant_flags

log = logging.getLogger("vdeploy.export")

OPTIMIZE_CHOICES = ("auto", "none", "onnxslim")
MIN_OPSET, MAX_OPSET = 17, 20  # 17: LayerNormalization; 20: the TorchScript exporter's last


# ----------------------------------------------------------------- loading ----


def load_unet(ckpt: str | os.PathLike, config=None, ema: bool = True, default_config: dict | None = None):
    """Load the denoiser of a vdeploy or ``video-diffusion-pytorch`` 0.6.3 checkpoint.

    Args:
        ckpt: checkpoint path (``vdeploy.checkpoint.load_denoiser_state`` reads every format).
        config: a preset name, JSON path or dict giving the architecture; needed when the checkpoint
            holds none (upstream ``model-N.pt``), and it wins over the stored one when given.
        ema: the EMA weights (default) or the raw training weights.
        default_config: used when neither ``config`` nor the checkpoint gives one (e.g. a manifest's).

    Returns:
        ``(unet, config, step)``: the ``vdeploy.model.Unet3D`` in eval mode, its resolved config, the step.

    Raises:
        ExportError: a missing/corrupt/non-checkpoint file, no config, or a config that does not match the
            weights (naming the first mismatching key).
    """
    from vdeploy import config as vconfig
    from vdeploy.checkpoint import CheckpointError, load_denoiser_state
    from vdeploy.model import Unet3D

    log.info("loading %s (%s weights)", ckpt, "EMA" if ema else "raw")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            state, stored_config, step = load_denoiser_state(ckpt, ema=ema)
        for w in caught:
            log.warning("%s", w.message)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    try:
        if config is not None:
            resolved = vconfig.load(config)
        elif stored_config is not None:
            resolved = vconfig.resolve(stored_config)
        elif default_config is not None:
            resolved = vconfig.resolve(dict(default_config))
        else:
            raise ExportError(
                f"checkpoint {ckpt} holds no model config (an upstream model-N.pt?): pass --config "
                f"(a preset: {', '.join(vconfig.PRESETS)}, or a JSON file)"
            )
    except vconfig.ConfigError as e:
        raise ExportError(f"config: {e}") from None
    try:
        unet = Unet3D(**vconfig.unet_kwargs(resolved))
    except (TypeError, ValueError, AssertionError) as e:
        raise ExportError(f"config does not build a Unet3D: {e}") from None
    mismatch = first_mismatch(unet.state_dict(), state)
    if mismatch:
        raise ExportError(f"config does not match the weights of {ckpt}: {mismatch}")
    unet.load_state_dict(state, strict=True)
    unet.eval().requires_grad_(False)
    return unet, resolved, step


def first_mismatch(expected: dict, got: dict) -> str | None:
    """The first key (in the model's order) that is missing, extra, or of another shape; None if all fit."""
    for key, tensor in expected.items():
        if key not in got:
            return f"first mismatching key '{key}': the config's model has it, the checkpoint does not"
        if tuple(got[key].shape) != tuple(tensor.shape):
            return (
                f"first mismatching key '{key}': checkpoint shape {tuple(got[key].shape)}, "
                f"config's model {tuple(tensor.shape)}"
            )
    for key in got:
        if key not in expected:
            return f"first mismatching key '{key}': the checkpoint has it, the config's model does not"
    return None


# --------------------------------------------------------- model directory ----


@contextlib.contextmanager
def staging_dir(out: str | os.PathLike):
    """A temporary directory beside ``out`` that becomes ``out`` when the block succeeds.

    An existing ``out`` is replaced only if it is empty or a previous model directory (has
    ``vdeploy.json``); anything else is refused. On failure the temporary directory is removed.

    Raises:
        ExportError: ``out`` is a file, a non-empty directory that is not a model directory, or not writable.
    """
    from vdeploy.runtime.manifest import MANIFEST_NAME

    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise ExportError(f"output {out} is a non-empty directory without {MANIFEST_NAME}: refusing to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as e:
        raise ExportError(f"cannot write the output directory {out}: {e.strerror or e}") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.{os.getpid()}.old")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------ export ----


def export_onnx(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    *,
    config=None,
    ema: bool = True,
    **kwargs,
) -> Manifest:
    """Export a checkpoint's denoiser to a checked model directory.

    Args:
        ckpt: a vdeploy checkpoint or a ``video-diffusion-pytorch`` 0.6.3 ``model-N.pt``.
        out: the model directory to write (replaced if it is a previous one).
        config: architecture (preset, JSON path or dict) where the checkpoint holds none.
        ema: export the EMA weights (default) or the raw ones (``--no-ema``).
        **kwargs: as :func:`export_unet` (``opset``, ``cfg``, ``fp16``, ``optimize``, ``text_encoder``,
            ``tensorrt``, ``dynamic_size``, ``atol``, ``fp16_atol``).

    Returns:
        The manifest as written (``vdeploy.runtime.manifest.Manifest``).

    Raises:
        ExportError: bad input (checkpoint, config, output directory), one line.
        ValidationError: a graph failed its checks; the message lists every measured error.
    """
    with staging_dir(out) as tmp:
        unet, resolved, step = load_unet(ckpt, config=config, ema=ema)
        source = {"checkpoint": str(Path(ckpt).absolute()), "step": step, "ema": ema}
        text_encoder = kwargs.pop("text_encoder", None)
        if text_encoder is None:
            text_encoder = _checkpoint_text_encoder(ckpt, resolved)
        return _export(unet, resolved, tmp, Path(out), source=source, text_encoder=text_encoder, **kwargs)


def export_unet(unet, config: dict, out: str | os.PathLike, *, source: dict | None = None, **kwargs) -> Manifest:
    """Export an in-memory ``Unet3D`` (weights loaded) with its resolved config; see :func:`_export`."""
    with staging_dir(out) as tmp:
        return _export(unet.eval(), config, tmp, Path(out), source=source or {}, **kwargs)


def _checkpoint_text_encoder(ckpt, config: dict) -> str | None:
    """The text encoder a text-conditioned checkpoint was trained with: the directory it recorded if that
    exists here, else the embedded default (``"default"``); None for a model without text conditioning."""
    from vdeploy.checkpoint import load_checkpoint

    stored = load_checkpoint(ckpt).get("text_encoder")
    if stored and Path(stored).is_dir():
        return stored
    if stored:
        log.warning("the checkpoint's text encoder %s is not here; exporting the embedded default instead", stored)
        return "default"
    return "default" if config.get("use_bert_text_cond") else None


def _export(
    unet,
    config: dict,
    tmp: Path,
    final: Path,
    *,
    source: dict,
    opset: int = DEFAULT_OPSET,
    optimize: str = "auto",
    text_encoder: str | os.PathLike | None = None,
    tensorrt=None,
    dynamic_size: bool = True,
    atol: float = FP32_ATOL,
    fp16_atol: float = FP16_ATOL,
    **variant_options,
) -> Manifest:
    """Everything after loading, written into ``tmp``: one loop over the graph variants asked for.

    Args:
        opset: ONNX opset (17 default: GroupNorm decomposes, no opset-21 GroupNormalization semantics).
        **variant_options: the graph variants' export options (``variants.VARIANTS``' ``option``): ``cfg=True``
            also exports the one-call classifier-free-guidance graph ``denoiser_cfg.onnx``, ``fp16=True``
            ``denoiser_fp16.onnx`` (checked against fp32 PyTorch within ``fp16_atol``); and tolerances of new
            variants (``<name>_atol``, their ``atol_option``).
        optimize: ``auto`` (keep the onnxslim graph when it measurably runs faster), ``onnxslim``
            (always), ``none``.
        text_encoder: local HF encoder directory, ``"default"`` for the embedded MiniLM, or None.
        tensorrt: a :class:`~vdeploy.export.tensorrt.TensorRTOptions` to build engines, or None.
        dynamic_size: height and width as dynamic axes (batch always is; frames never are).
        atol: fp32 tolerance against PyTorch.
    """
    import onnx
    import onnxruntime
    import torch

    import vdeploy
    from vdeploy.diffusion import cosine_beta_schedule

    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset {opset} is not supported: {MIN_OPSET} to {MAX_OPSET} (torch's TorchScript exporter)")
    if optimize not in OPTIMIZE_CHOICES:
        raise ExportError(f"optimize must be one of {', '.join(OPTIMIZE_CHOICES)}, got {optimize!r}")
    if tensorrt is not None:  # fail before minutes of work, not after
        from .tensorrt import import_tensorrt

        import_tensorrt()
    started = time.perf_counter()
    null = unet.null_cond_emb.detach().float().reshape(1, -1).numpy() if getattr(unet, "has_cond", False) else None
    cond_dim = None if null is None else int(null.shape[1])
    null_tokens = None  # a text_cross_attention model's null token sequence (L, cond_dim)
    if getattr(unet, "text_cross_attention", False):
        null_tokens = unet.null_text_tokens.detach().float()[0].numpy()
    tolerances = {"atol": atol, "fp16_atol": fp16_atol,
                  **{k: v for k, v in variant_options.items() if k.endswith("_atol")}}
    unknown = sorted(set(variant_options) - set(tolerances) - set(variant_flags()))
    if unknown:
        raise TypeError(f"export got unknown option(s) {', '.join(unknown)} (graph variants: "
                        f"{', '.join(variant_flags())})")
    names = selected(variant_options)
    # every spec is built before any tracing, so that --cfg on an unconditioned model fails at once
    specs = {
        name: denoiser_spec(config, cond_dim, guidance=VARIANTS[name].guidance, name=name, file=VARIANTS[name].file,
                            dynamic_size=dynamic_size, opset=opset, atol=tolerances[VARIANTS[name].atol_option])
        for name in names
    }
    extra_size = _extra_size(config) if dynamic_size else None
    reference = _reference(unet)
    graphs: dict[str, Graph] = {}
    parity: dict[str, dict] = {}
    cases: dict[bool, list] = {}  # parity cases per guidance, shared by the variants that need them
    slimmed = None  # whether onnxslim's graph was kept, as the plain graph measured it

    for name in names:
        variant, spec = VARIANTS[name], specs[name]
        path = tmp / spec.file
        if spec.guidance not in cases:
            cases[spec.guidance] = denoiser_cases(spec, config, reference, null, extra_size=extra_size,
                                                  null_tokens=null_tokens)
        record: dict = {}
        if variant.derive is not None:  # 1. built from an earlier variant's file
            source_variant, convert = variant.derive
            record = convert(tmp / specs[source_variant].file, path)
        else:  # 1. traced from the U-Net
            _trace(variant.wrapper(unet, config["num_frames"]), spec, config, path)
        if slimmed is None and variant.derive is None:  # 2. the first traced graph decides the optimization
            path, record, errors = _optimize(path, spec, cases[spec.guidance], optimize)
            slimmed = record["kept"] == "onnxslim"
        else:
            if slimmed and variant.derive is None:
                _slim_in_place(path)
                record["kept"] = "onnxslim"
            check_graph(path, spec)  # 3. checks, 4. parity
            errors = check_parity(path, spec, cases[spec.guidance])
        log.info("%s parity vs PyTorch %s (atol %g): %s", spec.file, variant.reference, spec.atol, _fmt(errors))
        graphs[name] = spec.graph(precision=variant.precision, optimization=record)
        parity[name] = {"atol": spec.atol, "reference": f"torch fp32 eager {variant.reference} (CPU)",
                        "max_abs_err": errors}

    # 5. conditioning: the null embedding (and null token sequence), the text encoder
    conditioning = Conditioning(cond_dim=cond_dim)
    if null is not None:
        np.save(tmp / "null_cond_emb.npy", null.astype(np.float32))
        conditioning = Conditioning(cond_dim=cond_dim, null_embedding="null_cond_emb.npy")
    if null_tokens is not None:
        np.save(tmp / "null_text_tokens.npy", null_tokens.astype(np.float32))
        conditioning = replace(conditioning, null_tokens="null_text_tokens.npy")
    if text_encoder is not None:
        from .text_encoder import export_text_encoder

        info = export_text_encoder(
            tmp,
            None if str(text_encoder) == "default" else text_encoder,
            cls_repr=bool(config.get("text_use_bert_cls")),
            cond_dim=cond_dim,
            opset=opset,
            tokens=null_tokens is not None,
            standardize=(unet.text_standardize, unet.text_mean.detach().cpu(), unet.text_proj.detach().cpu())
            if getattr(unet, "text_mean", None) is not None else None,  # the caption map of text_standardize
        )
        conditioning = replace(conditioning, text_encoder=info["dir"], max_length=info["max_length"],
                               pooling=info["pooling"], text_encoder_graph=info["spec"].graph())
        parity["text_encoder"] = info["parity"]

    # 6. TensorRT engines from the variants that take one
    engines = ()
    if tensorrt is not None:
        engines = tuple(_build_engine(tmp, specs[name], config, tensorrt) for name in names if VARIANTS[name].tensorrt)

    manifest = Manifest(
        vdeploy_version=vdeploy.__version__,
        config=config,
        source=source,
        opset=opset,
        graphs=graphs,
        engines=engines,
        schedule=Schedule(
            timesteps=config["timesteps"], betas=tuple(cosine_beta_schedule(config["timesteps"]).tolist()),
            beta_schedule=config.get("beta_schedule", "cosine"), prediction_type=config.get("prediction_type", "eps"),
        ),
        conditioning=conditioning,
        parity=parity,
        export={
            "seconds": round(time.perf_counter() - started, 1),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    )
    written = manifest.write(tmp)
    log.info("wrote %s (%d files) in %.1f s", final, len(written.files), time.perf_counter() - started)
    return written


def _trace(module, spec: ExportSpec, config: dict, path: Path) -> None:
    """``torch.onnx.export`` (TorchScript tracer, constant folding) at batch 2 and the config's size."""
    import torch

    rng = torch.Generator().manual_seed(0)
    b, c, f, s = 2, config["channels"], config["num_frames"], config["image_size"]
    args = [torch.randn(b, c, f, s, s, generator=rng), torch.randint(0, config["timesteps"], (b,), generator=rng)]
    names = spec.input_names
    if "cond" in names:
        args.append(torch.randn(b, spec.inputs[names.index("cond")].shape[1], generator=rng))
    if "text_tokens" in names:  # row 0 with every token real, row 1 with padding
        length, width = spec.inputs[names.index("text_tokens")].shape[1:]
        args.append(torch.randn(b, length, width, generator=rng))
        args.append((torch.arange(length)[None] < torch.tensor([[length], [max(1, length // 2)]])).float())
    if "frames" in names:
        args.append(torch.randn(b, c, f, s, s, generator=rng).clamp(-1, 1))
        args.append((torch.arange(f) < f // 2).float().expand(b, f).contiguous())
    if "cond_scale" in names:
        args.append(torch.tensor([3.0]))
    log.info("tracing %s (opset %d, dynamic axes %s)", spec.file, spec.opset, spec.dynamic_axes)
    t0 = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings on shape arithmetic, the exporter's deprecation note
        torch.onnx.export(
            module.eval(),
            tuple(args),
            str(path),
            dynamo=False,
            opset_version=spec.opset,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes,
            do_constant_folding=True,
        )
    stamp_shapes(path, spec)
    log.info("traced %s in %.1f s", spec.file, time.perf_counter() - t0)


def stamp_shapes(path: Path, spec: ExportSpec) -> None:
    """Declare the spec's shapes on the graph's inputs and outputs (the tracer leaves generated names
    such as ``Transposeeps_dim_1`` where a reshape had -1); ``check_graph``'s strict shape inference and
    the parity run's output shapes then prove them."""
    import onnx

    model = onnx.load(str(path))
    specs = {t.name: t for t in spec.inputs + spec.outputs}
    for value in list(model.graph.input) + list(model.graph.output):
        want = specs.get(value.name)
        if want is None:
            continue
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for d in want.shape:
            dim = dims.add()
            if isinstance(d, str):
                dim.dim_param = d
            else:
                dim.dim_value = d
    onnx.save(model, str(path))


def _reference(unet):
    """PyTorch reference for parity cases: the model itself (not the wrapper), on numpy arrays."""
    import torch

    def reference(x, t, cond, kind, scale, **inputs):
        with torch.no_grad():
            xt, tt = torch.from_numpy(x), torch.from_numpy(t)
            ct = torch.from_numpy(cond) if cond is not None else None
            frame_kw = {role: torch.from_numpy(v) for role, v in inputs.items()}  # frames, mask, text_tokens, ...
            if kind == "cfg":
                out = unet.forward_with_cond_scale(xt, tt, cond=ct, cond_scale=float(scale[0]), **frame_kw)
            elif kind == "uncond":
                out = unet(xt, tt, cond=ct, null_cond_prob=1.0, **frame_kw)
            else:
                out = unet(xt, tt, cond=ct, **frame_kw)
        return out.float().numpy()

    return reference


def _extra_size(config: dict) -> int | None:
    """A second image size for checking a dynamic-size graph: half the size when the U-Net allows it."""
    factor = 2 ** (len(config["dim_mults"]) - 1)
    half = config["image_size"] // 2
    return half if half >= factor and half % factor == 0 else None


def _optimize(traced: Path, spec: ExportSpec, cases, optimize: str) -> tuple[Path, dict, dict]:
    """Check the traced graph and its onnxslim version (parity first), keep the one that runs faster.

    Returns:
        ``(graph path, the manifest's optimization record with the measured latencies, its parity errors)``.
    """
    from .optimize import MIN_GAIN, choose, measure_latency, slim

    plain = traced.with_name(traced.stem + ".plain.onnx")
    os.replace(traced, plain)
    check_graph(plain, spec)
    plain_errors = check_parity(plain, spec, cases)
    if optimize == "none":
        os.replace(plain, traced)
        return traced, {"kept": "plain"}, plain_errors
    slimmed = traced.with_name(traced.stem + ".slim.onnx")
    try:
        slim(plain, slimmed)
        check_graph(slimmed, spec)
        slim_errors = check_parity(slimmed, spec, cases)
    except Exception as e:  # noqa: BLE001 (an optimizer failure falls back to the plain graph)
        slimmed.unlink(missing_ok=True)
        if optimize == "onnxslim":
            raise ValidationError(f"onnxslim's graph failed: {e}") from None
        log.warning("onnxslim's graph is not usable (%s); keeping the plain export", str(e).splitlines()[0])
        os.replace(plain, traced)
        return traced, {"kept": "plain", "onnxslim": f"failed: {str(e).splitlines()[0]}"}, plain_errors
    latency = measure_latency({"plain": plain, "onnxslim": slimmed}, cases[0].feed)
    kept = "onnxslim" if optimize == "onnxslim" else choose(latency)
    info = {
        "kept": kept,
        "latency_ms": {k: round(v["median_ms"], 2) for k, v in latency.items()},
        "latency_setup": {"provider": "CPUExecutionProvider", "intra_op_threads": 2, "batch": 1,
                          "rule": f"onnxslim kept when its median is {MIN_GAIN:.0%} below plain's"},
    }
    log.info(
        "onnxruntime CPU latency, batch 1, 2 threads: plain %.1f ms, onnxslim %.1f ms -> keeping %s",
        latency["plain"]["median_ms"], latency["onnxslim"]["median_ms"], kept,
    )
    os.replace(slimmed if kept == "onnxslim" else plain, traced)
    (plain if kept == "onnxslim" else slimmed).unlink(missing_ok=True)
    return traced, info, slim_errors if kept == "onnxslim" else plain_errors


def _slim_in_place(path: Path) -> None:
    from .optimize import slim

    tmp = path.with_name(path.stem + ".slim.onnx")
    slim(path, tmp)
    os.replace(tmp, path)


def _build_engine(tmp: Path, spec: ExportSpec, config: dict, options) -> Engine:
    from vdeploy.runtime.platform import engine_file_name

    from .tensorrt import build_engine, gpu_name, import_tensorrt

    trt = import_tensorrt()
    precision = "fp16" if options.fp16 else "fp32"
    name = engine_file_name(spec.name, gpu_name(), trt.__version__, precision)
    entry = build_engine(tmp / spec.file, tmp / name, spec, config, options)
    return Engine(file=name, graph=spec.name, gpu=entry.pop("gpu"), tensorrt_version=entry.pop("tensorrt_version"),
                  precision=entry.pop("precision"), profile=entry.pop("profile"),
                  onnx_sha256=sha256_file(tmp / spec.file), build=entry)


def _fmt(errors: dict) -> str:
    return ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
