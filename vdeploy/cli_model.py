"""``vdeploy export``, ``verify``, ``parity`` and ``bench``: the commands that see torch and the compiled graph."""

from __future__ import annotations

import time
from pathlib import Path

import click

from vdeploy.cli_options import (BadInput, FiniteFloat, OneLineErrors, backend_choice, main, precision_choice,
                                 require_extra, sampler_choice, sampler_option_flags, sampler_options_of,
                                 variant_option_flags, variant_options_of)
# the tables every command reads its choices from (numpy-only modules: no torch, no onnxruntime)
from vdeploy.runtime.pipeline import CONDITIONING


# -------------------------------------------------------------- export ----


def _log_progress() -> None:
    """Progress lines of the export/parity stage (logger ``vdeploy.export``) on stderr."""
    import logging

    logger = logging.getLogger("vdeploy.export")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


@main.command("export", cls=OneLineErrors)
@click.option("--ckpt", required=True, type=click.Path(path_type=Path),
              help="vdeploy checkpoint, or a video-diffusion-pytorch 0.6.3 model-N.pt.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Model directory to write (a previous one is replaced; written to a temp dir, renamed at the end).")
@click.option("--config", "config_spec", default=None,
              help="Architecture: preset (tiny|small|base) or JSON file; needed when the checkpoint holds none.")
@click.option("--ema/--no-ema", default=True, show_default=True, help="Export the EMA weights or the raw ones.")
@click.option("--opset", default=17, show_default=True, type=click.IntRange(17, 20), help="ONNX opset (17-20).")
@variant_option_flags
@click.option("--optimize", type=click.Choice(["auto", "none", "onnxslim"]), default="auto", show_default=True,
              help="auto: keep the onnxslim graph only when it measurably runs faster (ORT CPU, 2 threads).")
@click.option("--static-size", is_flag=True, help="Fix height/width to the config's image_size (batch stays dynamic).")
@click.option("--atol", default=1e-4, show_default=True, type=FiniteFloat(min=0, min_open=True),
              help="fp32 tolerance against PyTorch.")
@click.option("--fp16-atol", default=5e-2, show_default=True, type=FiniteFloat(min=0, min_open=True),
              help="fp16 tolerance against fp32 PyTorch.")
@click.option("--text-encoder", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Local HF text encoder dir to export (default for text-conditioned models: the embedded MiniLM).")
@click.option("--tensorrt", is_flag=True, help="Build a TensorRT engine (needs tensorrt and a CUDA GPU).")
@click.option("--trt-fp32", is_flag=True, help="Build the TensorRT engine without the FP16 flag.")
@click.option("--min-shapes", default=None, help="TensorRT profile, trtexec syntax: x:1x3x8x32x32,t:1,...")
@click.option("--opt-shapes", default=None, help="TensorRT profile opt shapes (trtexec syntax).")
@click.option("--max-shapes", default=None, help="TensorRT profile max shapes (trtexec syntax).")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TensorRT timing cache file (read if present, written after the build).")
@click.option("--workspace", default=4096, show_default=True, type=click.IntRange(min=64),
              help="TensorRT workspace limit in MiB.")
@click.option("--sign-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Sign the directory with this EC private key (unencrypted PEM; P-256/384/521): OUT/model.sig, "
                   "checked by `vdeploy verify` and Pipeline.from_dir(public_key=...). Needs vdeploy[signing].")
def export_cmd(ckpt: Path, out: Path, config_spec: str | None, ema: bool, opset: int, optimize: str, static_size: bool, atol: float, fp16_atol: float, text_encoder: Path | None,
               tensorrt: bool, trt_fp32: bool, min_shapes: str | None, opt_shapes: str | None, max_shapes: str | None,
               timing_cache: Path | None, workspace: int, sign_key: Path | None, **flags) -> None:
    """Export a checkpoint's denoiser to a checked model directory (ONNX, optional TensorRT).

    \b
    Writes OUT/denoiser.onnx (x, t[, cond] -> eps; batch, height and width dynamic, frames fixed),
    optionally denoiser_cfg.onnx (--cfg), denoiser_fp16.onnx (--fp16), a TensorRT plan (--tensorrt),
    null_cond_emb.npy and text_encoder/ for conditioned models, and vdeploy.json. Every graph is
    checked (onnx.checker, names, shapes) and compared with PyTorch at batch 1 and 3; the export
    fails, leaving nothing behind, when an error exceeds --atol.
    """
    require_extra("export", "torch", "onnx", "onnxruntime")
    if sign_key is not None:  # a key that cannot sign is refused before the slow work
        from vdeploy.runtime.signing import SignatureError, check_private_key, sign_dir

        try:
            check_private_key(sign_key)
        except SignatureError as e:
            raise BadInput(f"--sign-key: {e}") from None
    _log_progress()
    from vdeploy.export import ExportError, ValidationError, export_onnx
    from vdeploy.export.tensorrt import TensorRTOptions, parse_shapes

    try:
        trt = None
        if tensorrt:
            trt = TensorRTOptions(
                fp16=not trt_fp32,
                min_shapes=parse_shapes(min_shapes),
                opt_shapes=parse_shapes(opt_shapes),
                max_shapes=parse_shapes(max_shapes),
                workspace_mb=workspace,
                timing_cache=str(timing_cache) if timing_cache else None,
            )
        t0 = time.perf_counter()
        manifest = export_onnx(
            ckpt, out, config=config_spec, ema=ema, opset=opset, optimize=optimize, **variant_options_of(flags),
            dynamic_size=not static_size, atol=atol, fp16_atol=fp16_atol, text_encoder=text_encoder, tensorrt=trt,
        )
    except ExportError as e:
        raise BadInput(str(e)) from None
    except ValidationError as e:
        raise click.ClickException(f"export failed its checks, nothing written: {e}") from None
    for graph, result in manifest.parity.items():
        worst = max(result["max_abs_err"].values())
        click.echo(f"{graph}: max abs err vs PyTorch {worst:.2e} (atol {result['atol']:g}) over "
                   + ", ".join(f"{k} {v:.1e}" for k, v in result["max_abs_err"].items()))
    click.echo(f"wrote {out} ({', '.join(manifest.files)}) in {time.perf_counter() - t0:.1f} s")
    if sign_key is not None:
        try:
            signature = sign_dir(out, sign_key)
        except SignatureError as e:
            raise BadInput(f"wrote {out} but could not sign it: {e}") from None
        click.echo(f"signed {out} with {sign_key}: {signature.name}")


# -------------------------------------------------------------- verify ----


@main.command("verify", cls=OneLineErrors)
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--public-key", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The PEM public key of whoever signed the directory (vdeploy export --sign-key).")
def verify(model_dir: Path, public_key: Path) -> None:
    """Check that MODEL_DIR was signed with the private key of --public-key and is unchanged since.

    \b
    Then checks vdeploy.json as `vdeploy sample` would (format version, paths, every file's sha256).
    Exit 0: valid; 2: unsigned, signed by another key, modified, or an unusable manifest (one line).
    Needs vdeploy[signing].
    """
    from vdeploy.runtime import manifest as manifest_lib
    from vdeploy.runtime.signing import verify_dir

    try:
        verify_dir(model_dir, public_key)
        manifest = manifest_lib.load(model_dir)
    except manifest_lib.ManifestError as e:
        raise BadInput(str(e)) from None
    click.echo(f"{model_dir}: signed with the key of {public_key}, unchanged since; "
               f"{len(manifest.files)} files match vdeploy.json")


# -------------------------------------------------------------- parity ----


@main.command("parity", cls=OneLineErrors)
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="Model directory written by `vdeploy export`.")
@click.option("--ckpt", required=True, type=click.Path(path_type=Path), help="The checkpoint it was exported from.")
@click.option("--sampler", type=sampler_choice(), default="ddpm", show_default=True,
              help="ddpm: upstream's p_sample_loop on the torch side; the others: the numpy sampler around torch.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Sampler steps (default: the sampler's own; every training step for ddpm).")
@sampler_option_flags
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(1, 1024))
@click.option("--cond-scale", default=1.0, show_default=True, type=FiniteFloat(),
              help="Guidance scale (conditioned models).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds the noise and the embeddings.")
@click.option("--backend", default="cpu", show_default=True,
              type=backend_choice(), help="Runtime backend.")
@click.option("--precision", default="fp32", show_default=True, type=precision_choice(),
              help="What the runtime runs (bf16: --backend openvino).")
@click.option("--config", "config_spec", default=None,
              help="Architecture, where the checkpoint holds none (default: the model directory's).")
@click.option("--ema/--no-ema", default=True, show_default=True, help="Compare with the EMA or the raw weights.")
@click.option("--atol", default=None, type=FiniteFloat(min=0, min_open=True),
              help="Tolerance on every per-call and on the final max abs error.  [default: 1e-3 for fp32, 2e-2 "
                   "for tf32; fp16/bf16 are judged by --min-psnr]")
@click.option("--min-psnr", default=None, type=FiniteFloat(min=0),
              help="The least PSNR (dB) of the final video against PyTorch fp32.  [default: 35 for fp16, 30 for bf16 "
                   "(their per-call errors are reported); none for fp32/tf32]")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the report (per_call_max_abs_err, final_max_abs_err, psnr_db, ...) here.")
@click.option("--known", default=0, show_default=True, type=click.IntRange(min=0),
              help="Frame-conditioned parity: the first K frames known (seeded frames), sampled as "
                   "--conditioning says on both sides.")
@click.option("--conditioning", type=click.Choice(CONDITIONING), default="auto", show_default=True,
              help="With --known: 'trained' (the model's frames/mask inputs), 'replacement'; auto: trained where "
                   "the model has it.")
@click.option("--resample", default=0, show_default=True, type=click.IntRange(min=0),
              help="With --known: RePaint resampling rounds per step (ddpm, ddim).")
def parity(model_dir: Path, ckpt: Path, sampler: str, steps: int | None, batch_size: int,
           cond_scale: float, seed: int, backend: str, precision: str, config_spec: str | None, ema: bool,
           atol: float | None, min_psnr: float | None, json_path: Path | None, known: int = 0,
           conditioning: str = "auto",
           resample: int = 0, **flags) -> None:
    """Sample with PyTorch and with the runtime from the same noise; compare every denoiser call.

    Reports the max abs error of each call, of the final video and its PSNR; exits 1 when an error
    exceeds --atol or the PSNR is under --min-psnr (fp32/tf32 are judged by --atol, fp16/bf16 by the video's
    PSNR unless told otherwise; the report is still written), 2 on bad input. With --known K the first K frames are
    given (frame-conditioned sampling: vdeploy.export.parity.run_parity(known=K)).
    """
    options = sampler_options_of(flags)
    if not known and (conditioning != "auto" or resample):
        raise BadInput(f"{'--conditioning' if conditioning != 'auto' else '--resample'} needs --known")
    if known and (precision != "fp32" or config_spec is not None):
        raise BadInput("--known compares the fp32 graph with the checkpoint's own config: leave out --precision "
                       "and --config")
    require_extra("parity", "torch", "onnxruntime")
    from vdeploy.runtime.atomic import unwritable

    why = json_path is not None and unwritable(json_path)
    if why:  # found now, not after both sampling runs
        raise BadInput(f"--json {json_path}: cannot write there ({why})")
    _log_progress()
    from vdeploy.export import ExportError
    from vdeploy.export.parity import ParityError, criterion_text, run_parity
    from vdeploy.runtime.backends import BackendUnavailable

    failure = None
    try:
        report = run_parity(model_dir, ckpt, sampler=sampler, steps=steps, batch_size=batch_size,
                            cond_scale=cond_scale, seed=seed, backend=backend, precision=precision, ema=ema,
                            config=config_spec, atol=atol, min_psnr=min_psnr, progress=not known, options=options,
                            known=known,
                            resample=resample, conditioning=conditioning)
    except (ExportError, BackendUnavailable) as e:
        raise BadInput(str(e)) from None
    except ParityError as e:
        report, failure = e.report, str(e)
    _write_report(json_path, report)
    if known:
        click.echo(f"{report['sampler']} {report['steps']} steps, {known} known frame(s) by {report['conditioning']} "
                   f"conditioning on {backend} ({criterion_text(report)}): per-call max abs err "
                   f"{report['max_per_call_abs_err']:.2e} (worst of {report['calls']}), final "
                   f"{report['final_max_abs_err']:.2e}, known frames {report['known_frames_max_abs_err']:.2e}")
    else:
        psnr = "inf" if report["psnr_db"] is None else f"{report['psnr_db']:.1f}"
        click.echo(f"{report['sampler']} {report['steps']} steps on {report['backend']} ({report['precision']}, "
                   f"{criterion_text(report)}): per-call max abs err {report['max_per_call_abs_err']:.2e} (worst of "
                   f"{report['calls']}), final {report['final_max_abs_err']:.2e}, PSNR {psnr} dB; torch "
                   f"{report['seconds']['torch']} s, runtime {report['seconds']['runtime']} s")
    if failure:
        raise click.ClickException(failure)


def _write_report(json_path: Path | None, report: dict) -> None:
    import json

    from vdeploy.runtime.atomic import write_text

    if json_path is None:
        return
    try:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        write_text(json_path, json.dumps(report, indent=2) + "\n")
    except OSError as e:
        raise click.ClickException(f"cannot write {json_path}: {e.strerror or e} (an earlier file there is "
                                   "unchanged)") from None


# --------------------------------------------------------------- bench ----


@main.command("bench", context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
              add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """PyTorch vs the runtime: latency, sampling, cold start, quality (= python benchmarks/latency.py).

    \b
    Every option is passed on to vdeploy.bench; `vdeploy bench --help` lists them. Example:
      vdeploy bench --config small --json bench-out/latency.json --plot bench-out/latency.png
    """
    from vdeploy.bench import main as bench_main

    raise SystemExit(bench_main(list(args), prog="vdeploy bench"))


