"""``vdeploy sample`` and ``vdeploy serve``: the torch-free runtime's commands."""

from __future__ import annotations

import time
from pathlib import Path

import click

from vdeploy.cli_options import (BadInput, FiniteFloat, OneLineErrors, auto_help, backend_choice, main,
                                 precision_choice, sampler_choice, sampler_option_flags, sampler_options_of)
# the tables every command reads its choices from (numpy-only modules: no torch, no onnxruntime)
from vdeploy.runtime.pipeline import CONDITIONING, DEFAULT_SAMPLER
from vdeploy.runtime.samplers import SAMPLERS


# -------------------------------------------------------------- sample ----


def _runtime_logging(quiet: bool) -> None:
    """The runtime's lines (backend chosen, timing) on stderr, unless --quiet."""
    import logging

    logger = logging.getLogger("vdeploy.runtime")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


@main.command("sample", cls=OneLineErrors)
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="Model directory written by `vdeploy export` (vdeploy.json is checked: version, sha256, shapes).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output .gif, or .mp4 (PyAV: the [video] extra); a batch becomes a grid, one video keeps its size.")
@click.option("--sampler", type=sampler_choice(), default=DEFAULT_SAMPLER, show_default=True,
              help="; ".join(f"{name}: {spec.summary}" for name, spec in SAMPLERS.items()) + ".")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Denoiser steps.  [default: the sampler's own; ddpm: every training timestep]")
@click.option("--seed", type=int, default=None, help="Seed for the noise: the same seed gives the same video.")
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(1, 1024),
              help="Videos to sample (with --text/--cond: one per prompt/row).")
@click.option("--cond-scale", default=1.0, show_default=True, type=FiniteFloat(),
              help="Classifier-free guidance scale (conditioned models; 1 = off).")
@click.option("--text", multiple=True, help="Prompt for text-conditioned models; repeat for several.")
@click.option("--cond", "cond_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Conditioning embeddings, a float .npy of shape (b, cond_dim).")
@click.option("--backend", type=backend_choice(), default="auto", show_default=True, help=auto_help())
@click.option("--precision", type=precision_choice(), default="fp32", show_default=True,
              help="fp16: the fp16 graph (ORT), the fp16 flag (TensorRT EP) or an fp16 plan; "
                   "bf16: OpenVINO's bfloat16 (CPUs with AVX512_BF16/AMX).")
@sampler_option_flags
@click.option("--fps", default=1000 / 120, type=FiniteFloat(min=0.1, max=100),
              help="Frames per second of the written video.  [default: 8.3, upstream's 120 ms a frame]")
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="onnxruntime CPU threads.  [default: physical cores]")
@click.option("--quiet", is_flag=True, help="No progress bar, no timing lines.")
@click.option("--label", is_flag=True,
              help="Write each --text prompt under its video (videos scaled up to at least 128 px wide).")
@click.option("--public-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Refuse the model directory unless it is signed with this PEM key's private key and unchanged "
                   "since (vdeploy export --sign-key); checked before anything in it is opened. "
                   "Needs vdeploy[signing].")
@click.option("--init", "init_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Known frames: a .gif (its last --init-frames frames are continued) or a .png (image-to-video), "
                   "resized and center-cropped as the training data; the video starts with them.")
@click.option("--init-frames", type=click.IntRange(min=1), default=None,
              help="How many of --init's frames are known.  [default: all, at most half the model's frames]")
@click.option("--length", type=click.IntRange(min=1), default=None,
              help="Frames of the written video; more than the model's are sampled window by window, each "
                   "conditioned on the last frames of the one before.  [default: the model's frame count]")
@click.option("--resample", default=0, show_default=True, type=click.IntRange(min=0),
              help="RePaint resampling rounds per step with --init (ddpm and ddim; 0: replacement only).")
@click.option("--conditioning", type=click.Choice(CONDITIONING), default="auto", show_default=True,
              help="How --init's frames condition the video: 'trained' (a model trained with frame conditioning "
                   "gets them as inputs), 'replacement' (training-free, any model); auto: trained where the model "
                   "has it.")
def sample(model_dir: Path, out: Path, sampler: str, steps: int | None, seed: int | None, batch_size: int,
           cond_scale: float, text: tuple[str, ...], cond_file: Path | None, backend: str, precision: str, fps: float,
           threads: int | None, quiet: bool, init_file: Path | None = None, init_frames: int | None = None,
           length: int | None = None, resample: int = 0, public_key: Path | None = None, conditioning: str = "auto",
           label: bool = False, **flags) -> None:
    """Sample videos from an exported model directory, without torch.

    \b
    The sampling loop runs in numpy around the compiled denoiser (onnxruntime or TensorRT); the
    result, in [0, 1], is written to OUT. Examples:
      vdeploy sample --model model/ --out sample.gif --seed 0
      vdeploy sample --model model/ --out grid.gif --batch-size 4 --sampler ddim --steps 50
      vdeploy sample --model model/ --out ball.gif --text "a red circle moving left" --cond-scale 3
      vdeploy sample --model model/ --out next.gif --init clip.gif --init-frames 4 --sampler ddpm --resample 2
      vdeploy sample --model model/ --out long.gif --init first.png --length 24
    """
    from vdeploy.runtime import BackendUnavailable, ManifestError, Pipeline, save_gif, save_mp4
    from vdeploy.runtime.atomic import unwritable

    suffix = out.suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise BadInput(f"--out must end in .gif or .mp4, got '{out.name}'")
    if not out.parent.is_dir():
        raise BadInput(f"the directory of --out, {out.parent}, does not exist")
    why = unwritable(out)
    if why:
        raise BadInput(f"--out {out}: cannot write there ({why})")
    if text and cond_file:
        raise BadInput("pass either --text or --cond, not both")
    for prompt in text:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:  # argv bytes that are not UTF-8 arrive as lone surrogates
            raise BadInput(f"--text {prompt.encode('utf-8', 'surrogateescape')!r} is not UTF-8 text") from None
    if label and not text:
        raise BadInput("--label writes the --text prompts under the videos: give --text")
    cond = _read_cond(cond_file) if cond_file is not None else None
    if init_file is None and (init_frames is not None or resample or conditioning != "auto"):
        flag = "--init-frames" if init_frames is not None else "--resample" if resample else "--conditioning"
        raise BadInput(f"{flag} needs --init (the known frames)")
    _runtime_logging(quiet)
    t0 = time.perf_counter()
    try:
        pipe = Pipeline.from_dir(model_dir, backend=backend, precision=precision, threads=threads,
                                 public_key=public_key)
        if (text or cond is not None) and pipe.cond_dim is None:
            raise BadInput(f"{'--text' if text else '--cond'}: {model_dir} is an unconditional model (no cond_dim): "
                           "it samples without prompts or embeddings; leave the option out")
        run = dict(batch_size=batch_size, cond=cond, text=list(text) or None, cond_scale=cond_scale,
                   sampler=sampler, steps=steps, progress=not quiet, **sampler_options_of(flags))
        f = pipe.shape[1]
        known = _read_init(init_file, pipe.shape, init_frames) if init_file is not None else None
        method = None
        if known is not None:
            run.update(resample=resample, conditioning=conditioning)
            method = conditioning if conditioning != "auto" else (
                "trained" if pipe.frame_conditioned else "replacement")
        if length is not None and length > f:
            video = pipe.extend(known, frames=length, overlap=known.shape[1] if known is not None else max(1, f // 2),
                                seed=seed, **run)
        else:
            if known is not None and length is not None and length < known.shape[1]:
                raise BadInput(f"--length {length} is shorter than the {known.shape[1]} known frames of --init")
            video = pipe(seed=seed, frames=known, **run)[:, :, :length]
    except (ManifestError, BackendUnavailable, ValueError) as e:
        raise BadInput(str(e)) from None
    except MemoryError:
        raise BadInput(f"out of memory sampling {batch_size} video(s) from {model_dir}: lower --batch-size") from None
    written = video
    if label:  # one prompt per video, or one prompt for the whole batch
        from vdeploy.runtime.video import caption

        written = caption(video, text if len(text) == len(video) else [text[0]] * len(video))
    try:
        (save_gif if suffix == ".gif" else save_mp4)(written, out, fps=fps)
    except (OSError, RuntimeError) as e:
        kept = "; the earlier file there is unchanged" if out.exists() else ""
        raise BadInput(f"cannot write {out}: {getattr(e, 'strerror', None) or e}{kept}") from None
    b, _, f, h, w = video.shape
    known_text = f", {known.shape[1]} known frame(s) by {method} conditioning" if known is not None else ""
    click.echo(f"wrote {out} ({b} video{'s' if b > 1 else ''}, {f} frames, {h}x{w}) with {sampler} "
               f"on {pipe.backend_name}{known_text} in {time.perf_counter() - t0:.1f} s")


def _read_init(path: Path, shape: tuple, count: int | None):
    """``--init FILE``: the known frames ``(c, k, size, size)`` in [0, 1], the file's last ``k`` frames resized and
    center-cropped as the training data (``vdeploy.data``, no torch)."""
    import numpy as np
    from PIL import Image

    from vdeploy.data import CHANNELS_TO_MODE, DataError, read_gif, resize_center_crop

    c, f, size, _ = shape
    if c not in CHANNELS_TO_MODE:
        raise BadInput(f"--init: this model samples {c}-channel videos; an image reads as 1, 3 or 4 channels")
    suffix = path.suffix.lower()
    try:
        if suffix == ".gif":
            frames = read_gif(path, channels=c)
        elif suffix == ".png":
            with Image.open(path) as im:
                if im.format != "PNG":
                    raise BadInput(f"--init {path} is {im.format or 'an unknown format'}, not a PNG")
                a = np.asarray(im.convert(CHANNELS_TO_MODE[c]))
            frames = (a[..., None] if a.ndim == 2 else a)[None]
        else:
            raise BadInput(f"--init must be a .gif or .png file, got '{path.name}'")
    except DataError as e:
        raise BadInput(f"--init: {e}") from None
    except (OSError, ValueError) as e:
        raise BadInput(f"--init: cannot read {path}: {e}") from None
    n = frames.shape[0]
    k = count if count is not None else min(n, max(1, f // 2))
    if k >= f:
        raise BadInput(f"--init-frames {k}: this model samples {f} frames, so at most {f - 1} can be known "
                       "(longer videos: --length)")
    if k > n:
        raise BadInput(f"--init-frames {k}: {path} has {n} frame{'s' if n > 1 else ''}")
    frames = resize_center_crop(np.ascontiguousarray(frames[n - k:]), size)
    return frames.transpose(3, 0, 1, 2).astype(np.float32) / 255


def _read_cond(path: Path):
    """``--cond FILE``: a finite float array of shape (b, cond_dim) or (cond_dim,), at least one row."""
    import numpy as np

    try:
        cond = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise BadInput(f"cannot read --cond {path}: {e}") from None
    if not isinstance(cond, np.ndarray):
        cond.close()
        raise BadInput(f"--cond {path} is a .npz archive: expected one .npy array of shape (b, cond_dim)")
    if cond.dtype.kind not in "fiu":
        raise BadInput(f"--cond {path} holds {cond.dtype} values: expected floats of shape (b, cond_dim)")
    if cond.ndim not in (1, 2) or cond.size == 0:
        raise BadInput(f"--cond {path} has shape {cond.shape}: expected (b, cond_dim) with at least one row")
    with np.errstate(over="ignore"):
        cond = cond.astype(np.float32)  # what the graph takes (a float64 1e300 becomes inf here)
    if not np.isfinite(cond).all():
        raise BadInput(f"--cond {path} holds NaN or Inf (as float32): embeddings must be finite")
    return cond


# --------------------------------------------------------------- serve ----


def _require_serve_extra(extra: str, *modules: str) -> None:
    """Refuse in one line, naming the extra, where the serving stack is not installed."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise BadInput(f"vdeploy serve needs {', '.join(missing)}, which this install lacks: "
                       f"pip install 'vdeploy[{extra}]'")


@main.command("serve", cls=OneLineErrors)
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="Model directory written by `vdeploy export`.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port (0: a free one).")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 4096),
              help="U-Net rows per denoiser call and active at once (a request is b rows, 2b with guidance).")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(0, 1_000_000),
              help="Requests waiting to join the batch; past it: 429 with Retry-After.")
@click.option("--backend", type=backend_choice(), default="auto", show_default=True,
              help="What runs the denoiser (as vdeploy sample --backend).")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="onnxruntime CPU threads.  [default: physical cores]")
@click.option("--batching", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              is_flag=False, flag_value="on",
              help="Step-level batching across requests; auto: on where warm-up measures the cost per row falling "
                   "with the batch (a GPU), off where it is flat (a CPU); off: one request at a time, as vdeploy "
                   "sample runs it. --batching alone: on.")
@click.option("--buckets", default=None, metavar="SIZES",
              help="Batch sizes every batched call is padded to, e.g. 1,2,4,8 (each warmed at start).  "
                   "[default: 1,2,4,... up to --max-batch]")
@click.option("--timeout", default=600.0, show_default=True, type=FiniteFloat(min=0, min_open=True),
              help="Seconds a request may take, queue included (then 504).")
@click.option("--grace", default=30.0, show_default=True, type=FiniteFloat(min=0),
              help="On SIGTERM: seconds to finish in-flight requests (new ones get 503); the rest get 503.")
@click.option("--max-videos", default=16, show_default=True, type=click.IntRange(1, 4096),
              help="Videos one request may ask for (batch_size, prompts or cond rows).")
@click.option("--max-body", default=None, type=click.IntRange(min=1), metavar="BYTES",
              help="Largest request body (past it: 413, before the body is read).  [default: the largest legal "
                   "request's: --max-videos videos of known frames at the model's size, 32 bytes a number]")
@click.option("--client-timeout", default=30.0, show_default=True, type=FiniteFloat(min=0, min_open=True),
              help="Seconds a request's head may take to arrive, and the longest pause in its body (then 408).")
@click.option("--api-key-file", default=None, type=click.Path(path_type=Path, dir_okay=False),
              help="Require Authorization: Bearer <key> on every endpoint but /healthz (401 otherwise); the key "
                   "is the file's text.  [default: $VDEPLOY_API_KEY if set, else no key]")
@click.option("--metrics-open", is_flag=True, help="With an API key: /metrics answers without it (for scrapers).")
@click.option("--ray", "use_ray", is_flag=True, help="Run on Ray Serve (extra [ray]): --replicas copies of the app.")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(1, 1024),
              help="With --ray: replicas, each one pipeline and batcher.")
@click.option("--quiet", is_flag=True, help="Warnings only in the log.")
def serve_cmd(model_dir: Path, host: str, port: int, max_batch: int, max_queue: int, backend: str,
              threads: int | None, batching: str, buckets: str | None, timeout: float, grace: float,
              max_videos: int, max_body: int | None, client_timeout: float, api_key_file: Path | None,
              metrics_open: bool, use_ray: bool, replicas: int, quiet: bool) -> None:
    """Serve a model directory over HTTP: POST /v1/videos, /healthz, /readyz, /metrics.

    \b
    Requests at different steps share each denoiser call (step-level batching). Examples:
      vdeploy serve --model model/ --port 8000
      curl -s localhost:8000/v1/videos -H 'Content-Type: application/json' \
           -d '{"prompt": "a red circle moving left", "steps": 25}' -o out.gif
      vdeploy serve --model model/ --ray --replicas 2
    """
    _require_serve_extra("serve", "starlette", "uvicorn", "prometheus_client")
    if replicas > 1 and not use_ray:
        raise BadInput("--replicas needs --ray (one process serves one replica)")
    _runtime_logging(quiet)
    import logging

    logging.getLogger("vdeploy.runtime.serve").setLevel(logging.WARNING if quiet else logging.INFO)
    if buckets is not None:
        from vdeploy.runtime.serve.buckets import bucket_sizes

        try:
            buckets = ",".join(map(str, bucket_sizes(buckets, max_batch)))
        except ValueError as e:
            raise BadInput(f"--buckets: {e}") from None
    from vdeploy.runtime.serve.auth import read_key

    try:
        api_key = read_key(api_key_file)
    except ValueError as e:
        raise BadInput(str(e)) from None
    if metrics_open and api_key is None:
        raise BadInput("--metrics-open needs an API key (--api-key-file FILE or $VDEPLOY_API_KEY)")
    settings = dict(backend=backend, threads=threads, max_batch=max_batch, max_queue=max_queue, batching=batching,
                    buckets=buckets, timeout=timeout, max_videos=max_videos, grace=grace, max_body=max_body,
                    client_timeout=client_timeout, api_key=api_key, metrics_open=metrics_open)
    if use_ray:
        _require_serve_extra("ray", "ray")
        from vdeploy.runtime.serve.ray_app import run as ray_run

        ray_run(model_dir, host=host, port=port, replicas=replicas, **settings)
        return
    from vdeploy.runtime import BackendUnavailable, ManifestError, Pipeline
    from vdeploy.runtime.serve.app import Service, serve

    try:
        pipe = Pipeline.from_dir(model_dir, backend=backend, threads=threads)
    except (ManifestError, BackendUnavailable, ValueError) as e:
        raise BadInput(str(e)) from None
    service = Service(pipe=pipe, **{k: v for k, v in settings.items() if k not in ("backend", "threads")})
    try:
        serve(service, host, port, log_level="warning" if quiet else "info")
    except OSError as e:  # the port is taken, the address is not ours
        raise BadInput(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    finally:
        pipe.close()
