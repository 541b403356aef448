"""The ``vdeploy`` command line: the one file that sees every stage.

Each command imports its stage inside its body, so ``vdeploy sample`` never loads torch.
Bad input (a missing file, a config that does not fit) is a one-line message and exit code 2.
"""

from __future__ import annotations

import click

# the tables every command reads its choices from (numpy-only modules: no torch, no onnxruntime)
from vdeploy.runtime.backends import BACKENDS
from vdeploy.runtime.pipeline import DEFAULT_SAMPLER
from vdeploy.runtime.samplers import SAMPLERS
from vdeploy.runtime.schedule import SPACINGS


class BadInput(click.ClickException):
    """A user error: printed as one line ``Error: ...``, exit code 2, no traceback."""

    exit_code = 2


def _require_extra(command: str, *modules: str) -> None:
    """Refuse, in one line naming the extra to install, a torch-side command on a runtime-only install.

    Looks the modules up without importing them, so it costs nothing where they are installed.
    """
    import importlib.util

    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: sys.modules[name] is None (import blocked)
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise BadInput(f"vdeploy {command} needs {', '.join(missing)}, which this install lacks (the runtime-only "
                       "install samples without torch): pip install 'vdeploy[train,export]'")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="vdeploy")
def main() -> None:
    """vdeploy: train a video-diffusion U-Net, export it to ONNX/TensorRT, sample it without torch.

    \b
    Typical flow:
      vdeploy data synth data/               # a synthetic GIF dataset with captions
      vdeploy train --data data/ --results results/ --config tiny
      vdeploy export --ckpt results/model-last.pt --out model/
      vdeploy sample --model model/ --out sample.gif
      vdeploy parity --model model/ --ckpt results/model-last.pt
    """


# ---------------------------------------------------------------- data ----

import math  # noqa: E402 (data/train sections)
import time  # noqa: E402
from pathlib import Path  # noqa: E402


class OneLineErrors(click.Command):
    """A command whose usage errors (missing or malformed options) are one line and exit code 2."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            raise BadInput(f"{e.format_message()} (see '{ctx.command_path} --help')") from None


class FiniteFloat(click.FloatRange):
    """``click.FloatRange`` that refuses nan and inf too (FloatRange lets nan through any bound)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            bounds = f" (expected {self._describe_range()})" if self._describe_range() else ""
            self.fail(f"{value!r} is not a finite number{bounds}", param, ctx)
        return rv

    def _describe_range(self) -> str:  # click shows it in --help; unbounded: nothing (not "x<=None")
        return super()._describe_range() if self.min is not None or self.max is not None else ""


@main.group()
def data() -> None:
    """Datasets: folders of GIFs with optional captions (name.txt beside name.gif)."""


@data.command("synth", cls=OneLineErrors)
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--num", default=64, show_default=True, type=click.IntRange(1, 1_000_000), help="Number of clips.")
@click.option("--frames", default=8, show_default=True, type=click.IntRange(1, 1024), help="Frames per clip.")
@click.option("--size", default=32, show_default=True, type=click.IntRange(8, 1024),
              help="Frame width and height in pixels.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed: the same arguments write the same data.")
@click.option("--overwrite", is_flag=True,
              help="OUT may already hold clips: its earlier NNNNN.gif/.txt files are deleted first.")
def data_synth(out: Path, num: int, frames: int, size: int, seed: int, overwrite: bool) -> None:
    """Write a synthetic dataset of moving coloured shapes to OUT.

    Each clip is OUT/NNNNN.gif (one red/green/blue/yellow circle, square or triangle crossing
    a black frame) with its caption in OUT/NNNNN.txt, e.g. "a red circle moving left".
    """
    from vdeploy.data import DataError, synth_dataset
    from vdeploy.runtime.atomic import unwritable

    if out.exists() and not out.is_dir():
        raise BadInput(f"{out} exists and is not a directory")
    why = unwritable(out, directory=True)
    if why:
        raise BadInput(f"cannot write the dataset to {out}: {why}")
    try:
        paths = synth_dataset(out, num=num, frames=frames, size=size, seed=seed, overwrite=overwrite)
    except DataError as e:
        raise BadInput(str(e).replace("(overwrite=True) ", "")) from None
    except OSError as e:
        raise click.ClickException(f"cannot write the dataset to {out}: {e.strerror or e}") from None
    click.echo(f"wrote {len(paths)} clips ({frames} frames, {size}x{size}) with captions to {out}")



# --------------------------------------------------------------- train ----


@main.command(cls=OneLineErrors)
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="Folder of GIFs (searched recursively); captions in name.txt beside name.gif.")
@click.option("--results", default="results", show_default=True, type=click.Path(path_type=Path),
              help="Output folder: model-N.pt checkpoints, model-last.pt, N.gif sample grids, log.jsonl.")
@click.option("--config", "config_spec", default=None,
              help="Model config: a preset (tiny, small, base) or a JSON file.  [default: tiny, or the "
                   "checkpoint's with --resume]")
@click.option("--steps", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Train until this many optimizer steps in all (a resumed run continues to it).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, 4096),
              help="Videos per micro-batch and process (under torchrun / accelerate launch).")
@click.option("--lr", default=2e-3, show_default=True, type=FiniteFloat(min=0, min_open=True),
              help="Adam learning rate (the seed's Trainer default is 1e-4, tuned for large models).")
@click.option("--grad-accum", default=1, show_default=True, type=click.IntRange(min=1),
              help="Micro-batches per optimizer step.")
@click.option("--mixed-precision", default=None, type=click.Choice(["no", "fp16", "bf16"]),
              help="Autocast precision, through accelerate (fp16 needs CUDA; bf16 runs on the CPU too).  "
                   "[default: the checkpoint's with --resume, else accelerate launch's/config's, else no]")
@click.option("--amp", is_flag=True, help="Same as --mixed-precision fp16 (the seed's name for it).")
@click.option("--save-every", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Checkpoint and sample grid every this many steps (and at the end).")
@click.option("--resume", is_flag=True,
              help="Continue from the newest checkpoint in --results with its settings (flags given override "
                   "them), on any number of processes (the global batch kept where it divides).")
@click.option("--overwrite", is_flag=True,
              help="Start afresh even though --results holds an earlier run's checkpoints (they are deleted).")
@click.option("--text-encoder", default=None, metavar="DIR|default",
              help="Condition on captions through this local text encoder ('default': the bundled MiniLM). "
                   "Sets the model's cond_dim to the encoder width.")
@click.option("--sample-rows", default=2, show_default=True, type=click.IntRange(1, 16),
              help="Milestone samples form a rows x rows grid (the seed's default is 4).")
@click.option("--ema-decay", default=0.995, show_default=True, type=FiniteFloat(0, 1))
@click.option("--ema-start", default=2000, show_default=True, type=click.IntRange(min=0),
              help="Step from which the EMA averages (before it, it copies the weights).")
@click.option("--ema-every", default=10, show_default=True, type=click.IntRange(min=1),
              help="Update the EMA every this many steps.")
@click.option("--cond-scale", default=1.0, show_default=True, type=FiniteFloat(),
              help="Classifier-free guidance scale for the milestone samples of a conditional model.")
@click.option("--max-grad-norm", default=None, type=FiniteFloat(min=0, min_open=True), help="Clip gradients to this norm.")
@click.option("--max-bad-steps", default=5, show_default=True, type=click.IntRange(1, 10_000),
              help="A step with a NaN/Inf loss or gradient is skipped; this many in a row stop training "
                   "(the last good checkpoint is kept).")
@click.option("--null-cond-prob", default=0.1, show_default=True, type=FiniteFloat(0, 1),
              help="Caption dropout for classifier-free guidance (conditional models only).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds the weights, the data order and the noise.")
@click.option("--cpu", is_flag=True, help="Train on the CPU even where CUDA is available.")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(0, 256), help="Data loader processes.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train(data_dir: Path, results: Path, config_spec: str | None, steps: int, batch_size: int, lr: float,
          grad_accum: int, amp: bool, save_every: int, resume: bool, overwrite: bool, text_encoder: str | None,
          sample_rows: int,
          ema_decay: float, ema_start: int, ema_every: int, cond_scale: float, max_grad_norm: float | None,
          null_cond_prob: float, seed: int,
          cpu: bool, workers: int, quiet: bool, mixed_precision: str | None, max_bad_steps: int) -> None:
    """Train a video-diffusion U-Net on a folder of GIFs.

    Runs as one process, or as several under torchrun or accelerate launch (one per GPU; gloo
    processes on the CPU): --batch-size is then per process, and N processes train what one
    does with N times the batch (see the README, "Training on several GPUs or machines").

    \b
    Examples:
      vdeploy train --data demo/data --results demo/results --config tiny
      vdeploy train --data demo/data --results demo/results --text-encoder default
      vdeploy train --data demo/data --results demo/results --steps 2000 --resume
      torchrun --standalone --nproc-per-node 2 -m vdeploy.cli train --data demo/data --results demo/results
    """
    import logging
    import os

    from vdeploy import config as vconfig
    from vdeploy.runtime.atomic import unwritable

    # ---- everything that can be checked before torch is imported
    _require_extra("train", "torch", "accelerate", "safetensors")
    if data_dir.exists() and not data_dir.is_dir():
        raise BadInput(f"--data {data_dir} is a file, not a directory: pass the folder that holds the GIFs")
    if not data_dir.is_dir():
        raise BadInput(f"data folder {data_dir} does not exist")
    if results.exists() and not results.is_dir():
        raise BadInput(f"--results {results} exists and is not a directory")
    why = unwritable(results, directory=True)
    if why:
        raise BadInput(f"--results {results}: cannot write there ({why})")
    if resume and overwrite:
        raise BadInput("--resume and --overwrite exclude each other")
    if amp and mixed_precision not in (None, "fp16"):
        raise BadInput(f"--amp is --mixed-precision fp16; it contradicts --mixed-precision {mixed_precision}")
    # torchrun and accelerate launch set RANK; only the first process touches the results folder
    main_process = os.environ.get("RANK", "0") == "0"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    earlier = sorted(results.glob("model-*.pt")) if results.is_dir() else []
    if earlier and not resume:
        if not overwrite:
            raise BadInput(f"{results} holds checkpoints of an earlier run ({earlier[-1].name}, ...): add --resume to "
                           "continue it, --overwrite to start afresh, or pick another --results")
        for pattern in ("model-*.pt", "[0-9]*.gif", "[0-9]*.txt", "sample-last.gif", "log.jsonl"):
            for old in results.glob(pattern) if main_process else ():
                old.unlink()
    try:
        config = vconfig.load(config_spec or "tiny") if (config_spec or not resume) else None
    except vconfig.ConfigError as e:
        raise BadInput(str(e)) from None

    import torch

    from vdeploy import checkpoint as ckpt_io
    from vdeploy.data import DataError, Dataset
    from vdeploy.diffusion import GaussianDiffusion
    from vdeploy.model import Unet3D
    from vdeploy.text import TextEncoderError, load_text_encoder
    from vdeploy.trainer import NonFiniteTrainingError, Trainer

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    resume_path, stored, notes = None, None, []
    if resume:
        resume_path = ckpt_io.latest_checkpoint(results)
        if resume_path is None:
            raise BadInput(f"--resume: no checkpoint (model-*.pt) in {results}")
        try:
            stored = ckpt_io.load_checkpoint(resume_path)
        except ckpt_io.CheckpointError as e:
            raise BadInput(str(e)) from None
        try:
            stored_config = None if stored.get("config") is None else vconfig.resolve(dict(stored["config"]))
        except (vconfig.ConfigError, TypeError, ValueError) as e:
            raise BadInput(f"{resume_path}: its stored model config is invalid: {e}") from None
        if stored_config is None:
            if config is None:
                raise BadInput(f"{resume_path} carries no model config: pass --config")
        elif config is not None and _config_core(config) != _config_core(stored_config):
            raise BadInput(f"--config {config_spec} differs from the config {resume_path} was trained with; "
                           "leave out --config to resume")
        else:
            config = stored_config
        if text_encoder is None and stored.get("text_encoder"):
            text_encoder = stored["text_encoder"]
        # the run continues with its own settings unless a flag says otherwise
        ctx = click.get_current_context()
        kept = {k: v for k, v in (stored.get("trainer") or {}).items()
                if k in _RESUMED and ctx.get_parameter_source(_RESUMED[k]) == click.core.ParameterSource.DEFAULT}
        steps = kept.get("train_num_steps", steps)
        batch_size = kept.get("train_batch_size", batch_size)
        lr = kept.get("train_lr", lr)
        grad_accum = kept.get("gradient_accumulate_every", grad_accum)
        amp = kept.get("amp", amp)
        save_every = kept.get("save_and_sample_every", save_every)
        ema_decay = kept.get("ema_decay", ema_decay)
        ema_start = kept.get("step_start_ema", ema_start)
        ema_every = kept.get("update_ema_every", ema_every)
        max_grad_norm = kept.get("max_grad_norm", max_grad_norm)
        max_bad_steps = kept.get("max_bad_steps", max_bad_steps)
        seed = kept.get("seed", seed)
        null_cond_prob = kept.get("null_cond_prob", null_cond_prob)
        cond_scale = kept.get("cond_scale", cond_scale)
        sample_rows = kept.get("num_sample_rows", sample_rows)
        # precision is one setting: --amp, --mixed-precision or accelerate launch's choice replace the stored one
        if "ACCELERATE_MIXED_PRECISION" not in os.environ and "amp" in kept and (
                "mixed_precision" in kept or "mixed_precision" not in stored["trainer"]):
            amp, mixed_precision = kept["amp"], kept.get("mixed_precision")
        # a run resumed on another number of processes keeps its global batch where it divides
        stored_world = int((stored.get("trainer") or {}).get("num_processes") or 1)
        if "train_batch_size" in kept and stored_world != world:
            if batch_size * stored_world % world == 0:
                batch_size = batch_size * stored_world // world
                notes.append(f"resuming a {stored_world}-process run on {world}: --batch-size {batch_size} per "
                             f"process keeps its global batch of {batch_size * world}")
            else:
                notes.append(f"resuming a {stored_world}-process run on {world}: its global batch of "
                             f"{batch_size * stored_world} does not divide, so it becomes {batch_size * world}")
    save_every = min(save_every, steps)
    precision = "fp16" if amp else (mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION") or "no")
    on_cpu = (cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
              or not torch.cuda.is_available())
    if precision == "fp16" and on_cpu:
        raise BadInput("fp16 mixed precision (--amp, --mixed-precision fp16) needs a CUDA GPU: "
                       "use --mixed-precision bf16 on the CPU")

    # ---- the text encoder sets cond_dim
    encoder = None
    wants_cond = text_encoder is not None or config["cond_dim"] is not None or config["use_bert_text_cond"]
    if wants_cond:
        try:
            encoder = load_text_encoder(None if text_encoder in (None, "default") else text_encoder)
        except TextEncoderError as e:
            raise BadInput(str(e)) from None
        if config["use_bert_text_cond"]:
            from vdeploy.model import BERT_MODEL_DIM

            if encoder.dim != BERT_MODEL_DIM:
                raise BadInput(f"use_bert_text_cond needs a {BERT_MODEL_DIM}-wide encoder (BERT-base); "
                               f"{encoder.path} is {encoder.dim}-wide: set cond_dim instead")
        elif config["cond_dim"] is None:
            config = vconfig.resolve({**config, "cond_dim": encoder.dim})
        elif config["cond_dim"] != encoder.dim:
            raise BadInput(f"config cond_dim={config['cond_dim']} but the text encoder {encoder.path} is "
                           f"{encoder.dim}-wide")

    # ---- does the config fit the data?
    try:
        ds = Dataset(data_dir, config["image_size"], channels=config["channels"], num_frames=config["num_frames"])
        shortest = ds.shortest(16)
    except DataError as e:
        raise BadInput(str(e)) from None
    if shortest < config["num_frames"]:
        raise BadInput(f"the config wants num_frames={config['num_frames']} but videos in {data_dir} have "
                       f"{shortest} frames: use a config with num_frames <= {shortest}")
    captioned = sum(c is not None for c in ds.captions)
    if encoder is not None and captioned < len(ds):
        raise BadInput(f"a conditional model needs a caption for every video; {len(ds) - captioned} of "
                       f"{len(ds)} in {data_dir} have none")

    torch.manual_seed(seed)
    unet = Unet3D(**vconfig.unet_kwargs(config))
    diffusion = GaussianDiffusion(unet, **vconfig.diffusion_kwargs(config), text_encoder=encoder)
    try:
        trainer = Trainer(
            diffusion, data_dir, train_batch_size=batch_size, train_lr=lr, train_num_steps=steps,
            gradient_accumulate_every=grad_accum, amp=amp, save_and_sample_every=save_every, results_folder=results,
            num_sample_rows=sample_rows, max_grad_norm=max_grad_norm, ema_decay=ema_decay, step_start_ema=ema_start,
            update_ema_every=ema_every, config=config, seed=seed, null_cond_prob=null_cond_prob,
            cond_scale=cond_scale, num_workers=workers, progress=not quiet, cpu=cpu,
            mixed_precision=None if amp else mixed_precision, max_bad_steps=max_bad_steps,
        )
    except (ValueError, TypeError) as e:  # settings a --resume'd checkpoint stored (NaN lr, ...), data errors
        where = f" (settings stored in {resume_path})" if resume_path is not None else ""
        raise BadInput(f"{e}{where}") from None
    if resume_path is not None:
        try:
            trainer.load(resume_path)
        except (ckpt_io.CheckpointError, RuntimeError) as e:
            raise BadInput(f"cannot resume from {resume_path}: {str(e).splitlines()[0]}") from None
    n_params = sum(p.numel() for p in unet.parameters())
    cond_note = f", conditioned on captions via {encoder.path}" if encoder is not None else ""
    acc = trainer.accelerator
    echo = click.echo if acc.is_main_process else (lambda *args, **kwargs: None)
    for note in notes:
        echo(note)
    procs = f" x {acc.num_processes} processes" if acc.num_processes > 1 else ""
    echo(f"{len(ds)} videos ({captioned} captioned) in {data_dir}; model {n_params / 1e6:.2f}M params"
         f"{cond_note}; device {trainer.device.type}{procs}; precision {trainer.mixed_precision}; "
         f"steps {trainer.step} -> {steps}")
    if trainer.step >= steps:
        echo(f"already at step {trainer.step} >= --steps {steps}: nothing to do")
        return
    start, first = time.perf_counter(), trainer.step
    losses: list[float] = []
    try:
        trainer.train(log_fn=lambda log: losses.append(log["loss"]))
    except (NonFiniteTrainingError, ckpt_io.CheckpointError) as e:  # NaN training; a refused or failed save
        raise click.ClickException(str(e)) from None
    except OSError as e:  # a sample grid or the log could not be written (a full disk)
        raise click.ClickException(f"training stopped at step {trainer.step}: cannot write "
                                   f"{e.filename or results}: {e.strerror or e}") from None
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and "allocate" not in str(e) and "out of memory" not in str(e):
            raise
        raise click.ClickException(f"out of memory at step {trainer.step}: lower --batch-size ({batch_size}) or "
                                   "use a smaller --config") from None
    secs = time.perf_counter() - start
    if trainer.interrupted:
        echo(f"interrupted: saved {results / ckpt_io.LAST_NAME} at step {trainer.step}; continue with --resume",
             err=True)
        raise SystemExit(130)
    tail = losses[-50:]
    echo(f"trained {trainer.step - first} steps in {secs:.0f}s; final loss {losses[-1]:.4f} "
         f"(mean of last {len(tail)}: {sum(tail) / len(tail):.4f})")
    echo(f"checkpoint: {results / ckpt_io.LAST_NAME}")
    if (results / "sample-last.gif").exists():
        echo(f"samples:    {results / 'sample-last.gif'}")


# checkpoint["trainer"] key -> the train option that overrides it on --resume
_RESUMED = {
    "train_num_steps": "steps", "train_batch_size": "batch_size", "train_lr": "lr",
    "gradient_accumulate_every": "grad_accum", "amp": "amp", "save_and_sample_every": "save_every",
    "ema_decay": "ema_decay", "step_start_ema": "ema_start", "update_ema_every": "ema_every",
    "max_grad_norm": "max_grad_norm", "seed": "seed", "null_cond_prob": "null_cond_prob",
    "cond_scale": "cond_scale", "num_sample_rows": "sample_rows", "mixed_precision": "mixed_precision",
    "max_bad_steps": "max_bad_steps",
}


def _config_core(config: dict) -> dict:
    """A config without cond_dim (which --text-encoder sets) for comparisons."""
    return {k: v for k, v in config.items() if k != "cond_dim"}



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
@click.option("--cfg", is_flag=True, help="Also export denoiser_cfg.onnx: cond and null in one call, cond_scale input.")
@click.option("--fp16", is_flag=True, help="Also export denoiser_fp16.onnx (float16, fp32 I/O; softmax/norm stats fp32).")
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
def export_cmd(ckpt: Path, out: Path, config_spec: str | None, ema: bool, opset: int, cfg: bool, fp16: bool,
               optimize: str, static_size: bool, atol: float, fp16_atol: float, text_encoder: Path | None,
               tensorrt: bool, trt_fp32: bool, min_shapes: str | None, opt_shapes: str | None, max_shapes: str | None,
               timing_cache: Path | None, workspace: int, sign_key: Path | None) -> None:
    """Export a checkpoint's denoiser to a checked model directory (ONNX, optional TensorRT).

    \b
    Writes OUT/denoiser.onnx (x, t[, cond] -> eps; batch, height and width dynamic, frames fixed),
    optionally denoiser_cfg.onnx (--cfg), denoiser_fp16.onnx (--fp16), a TensorRT plan (--tensorrt),
    null_cond_emb.npy and text_encoder/ for conditioned models, and vdeploy.json. Every graph is
    checked (onnx.checker, names, shapes) and compared with PyTorch at batch 1 and 3; the export
    fails, leaving nothing behind, when an error exceeds --atol.
    """
    _require_extra("export", "torch", "onnx", "onnxruntime")
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
            ckpt, out, config=config_spec, ema=ema, opset=opset, cfg=cfg, fp16=fp16, optimize=optimize,
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
              help="Output .gif (or .mp4 with PyAV/imageio-ffmpeg installed); a batch becomes a grid.")
@click.option("--sampler", type=click.Choice(list(SAMPLERS)), default=DEFAULT_SAMPLER, show_default=True,
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
@click.option("--backend", type=click.Choice(["auto", *BACKENDS]), default="auto", show_default=True,
              help="auto: the fastest that runs here (" + " > ".join(
                  name for _, name in sorted((s.auto_rank, n) for n, s in BACKENDS.items() if s.auto_rank is not None))
              + ").")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="fp16: the fp16 graph (ORT), the fp16 flag (TensorRT EP) or an fp16 plan; "
                   "bf16: OpenVINO's bfloat16 (CPUs with AVX512_BF16/AMX).")
@click.option("--eta", default=None, type=FiniteFloat(min=0),
              help="DDIM stochasticity (0 = deterministic, the default); samplers with an eta option only.")
@click.option("--spacing", default=None, type=click.Choice(SPACINGS),
              help="How the steps are spread over the training timesteps.  [default: the sampler's own]")
@click.option("--order", default=None, type=click.IntRange(1, 3),
              help="Solver order of the multistep samplers (dpmpp, unipc).  [default: the sampler's own]")
@click.option("--variant", default=None, type=click.Choice(["bh1", "bh2"]), help="UniPC's B(h).  [default: bh2]")
@click.option("--fps", default=1000 / 120, type=FiniteFloat(min=0.1, max=100),
              help="Frames per second of the written video.  [default: 8.3, the seed's 120 ms a frame]")
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="onnxruntime CPU threads.  [default: physical cores]")
@click.option("--quiet", is_flag=True, help="No progress bar, no timing lines.")
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
def sample(model_dir: Path, out: Path, sampler: str, steps: int | None, seed: int | None, batch_size: int,
           cond_scale: float, text: tuple[str, ...], cond_file: Path | None, backend: str, precision: str,
           eta: float | None, spacing: str | None, order: int | None, variant: str | None, fps: float,
           threads: int | None, quiet: bool, init_file: Path | None = None, init_frames: int | None = None, length: int | None = None,
           resample: int = 0, public_key: Path | None = None) -> None:
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
    cond = _read_cond(cond_file) if cond_file is not None else None
    if init_file is None and (init_frames is not None or resample):
        raise BadInput(f"{'--init-frames' if init_frames is not None else '--resample'} needs --init (the known frames)")
    _runtime_logging(quiet)
    t0 = time.perf_counter()
    try:
        pipe = Pipeline.from_dir(model_dir, backend=backend, precision=precision, threads=threads,
                                 public_key=public_key)
        if (text or cond is not None) and pipe.cond_dim is None:
            raise BadInput(f"{'--text' if text else '--cond'}: {model_dir} is an unconditional model (no cond_dim): "
                           "it samples without prompts or embeddings; leave the option out")
        run = dict(batch_size=batch_size, cond=cond, text=list(text) or None, cond_scale=cond_scale,
                   sampler=sampler, steps=steps, progress=not quiet, eta=eta, spacing=spacing, order=order,
                   variant=variant)
        f = pipe.shape[1]
        known = _read_init(init_file, pipe.shape, init_frames) if init_file is not None else None
        if known is not None:
            run["resample"] = resample
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
    try:
        (save_gif if suffix == ".gif" else save_mp4)(video, out, fps=fps)
    except (OSError, RuntimeError) as e:
        kept = "; the earlier file there is unchanged" if out.exists() else ""
        raise BadInput(f"cannot write {out}: {getattr(e, 'strerror', None) or e}{kept}") from None
    b, _, f, h, w = video.shape
    click.echo(f"wrote {out} ({b} video{'s' if b > 1 else ''}, {f} frames, {h}x{w}) with {sampler} "
               f"on {pipe.backend_name} in {time.perf_counter() - t0:.1f} s")


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


# -------------------------------------------------------------- parity ----


@main.command("parity", cls=OneLineErrors)
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="Model directory written by `vdeploy export`.")
@click.option("--ckpt", required=True, type=click.Path(path_type=Path), help="The checkpoint it was exported from.")
@click.option("--sampler", type=click.Choice(list(SAMPLERS)), default="ddpm", show_default=True,
              help="ddpm: the seed's p_sample_loop on the torch side; the others: the numpy sampler around torch.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Sampler steps (default: the sampler's own; every training step for ddpm).")
@click.option("--spacing", default=None, type=click.Choice(SPACINGS), help="Timestep spacing (both sides).")
@click.option("--order", default=None, type=click.IntRange(1, 3), help="Multistep solver order (dpmpp, unipc).")
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(1, 1024))
@click.option("--cond-scale", default=1.0, show_default=True, type=FiniteFloat(),
              help="Guidance scale (conditioned models).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds the noise and the embeddings.")
@click.option("--backend", default="cpu", show_default=True,
              type=click.Choice(["auto", *BACKENDS]), help="Runtime backend.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "bf16"]),
              help="What the runtime runs (bf16: --backend openvino).")
@click.option("--config", "config_spec", default=None,
              help="Architecture, where the checkpoint holds none (default: the model directory's).")
@click.option("--ema/--no-ema", default=True, show_default=True, help="Compare with the EMA or the raw weights.")
@click.option("--atol", default=None, type=FiniteFloat(min=0, min_open=True),
              help="Tolerance on every per-call and on the final max abs error.  [default: 1e-3; 0.25 for bf16]")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the report (per_call_max_abs_err, final_max_abs_err, psnr_db, ...) here.")
def parity(model_dir: Path, ckpt: Path, sampler: str, steps: int | None, spacing: str | None, order: int | None,
           batch_size: int,
           cond_scale: float, seed: int, backend: str, precision: str, config_spec: str | None, ema: bool,
           atol: float | None, json_path: Path | None) -> None:
    """Sample with PyTorch and with the runtime from the same noise; compare every denoiser call.

    Reports the max abs error of each call, of the final video and its PSNR; exits 1 when an error
    exceeds --atol (the report is still written), 2 on bad input.
    """
    _require_extra("parity", "torch", "onnxruntime")
    from vdeploy.runtime.atomic import unwritable, write_text

    why = json_path is not None and unwritable(json_path)
    if why:  # found now, not after both sampling runs
        raise BadInput(f"--json {json_path}: cannot write there ({why})")
    _log_progress()
    import json

    from vdeploy.export import ExportError
    from vdeploy.export.parity import ParityError, run_parity
    from vdeploy.runtime.backends import BackendUnavailable

    failure = None
    try:
        report = run_parity(model_dir, ckpt, sampler=sampler, steps=steps, batch_size=batch_size,
                            cond_scale=cond_scale, seed=seed, backend=backend, precision=precision, ema=ema,
                            config=config_spec, atol=atol, progress=True,
                            options={"spacing": spacing, "order": order})
    except (ExportError, BackendUnavailable) as e:
        raise BadInput(str(e)) from None
    except ParityError as e:
        report, failure = e.report, str(e)
    if json_path is not None:
        try:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            write_text(json_path, json.dumps(report, indent=2) + "\n")
        except OSError as e:
            raise click.ClickException(f"cannot write {json_path}: {e.strerror or e} (an earlier file there is "
                                       "unchanged)") from None
    psnr = "inf" if report["psnr_db"] is None else f"{report['psnr_db']:.1f}"
    click.echo(f"{report['sampler']} {report['steps']} steps on {report['backend']} ({report['precision']}, atol "
               f"{report['atol']:g}): per-call max abs err "
               f"{report['max_per_call_abs_err']:.2e} (worst of {report['calls']}), final {report['final_max_abs_err']:.2e}, "
               f"PSNR {psnr} dB; torch {report['seconds']['torch']} s, runtime {report['seconds']['runtime']} s")
    if failure:
        raise click.ClickException(failure)


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
@click.option("--backend", type=click.Choice(["auto", *BACKENDS]), default="auto", show_default=True,
              help="What runs the denoiser (as vdeploy sample --backend).")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="onnxruntime CPU threads.  [default: physical cores]")
@click.option("--batching/--no-batching", default=False, show_default=True,
              help="Step-level batching across requests (off: one request at a time, each as vdeploy sample runs it; "
                   "off is the default: on 2 CPU cores batching measured 0.5-1.1x the throughput, README "
                   "'Serving'; try it on a GPU).")
@click.option("--timeout", default=600.0, show_default=True, type=FiniteFloat(min=0, min_open=True),
              help="Seconds a request may take, queue included (then 504).")
@click.option("--grace", default=30.0, show_default=True, type=FiniteFloat(min=0),
              help="On SIGTERM: seconds to finish in-flight requests (new ones get 503); the rest get 503.")
@click.option("--max-videos", default=16, show_default=True, type=click.IntRange(1, 4096),
              help="Videos one request may ask for (batch_size, prompts or cond rows).")
@click.option("--ray", "use_ray", is_flag=True, help="Run on Ray Serve (extra [ray]): --replicas copies of the app.")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(1, 1024),
              help="With --ray: replicas, each one pipeline and batcher.")
@click.option("--quiet", is_flag=True, help="Warnings only in the log.")
def serve_cmd(model_dir: Path, host: str, port: int, max_batch: int, max_queue: int, backend: str,
              threads: int | None, batching: bool, timeout: float, grace: float, max_videos: int, use_ray: bool,
              replicas: int, quiet: bool) -> None:
    """Serve a model directory over HTTP: POST /v1/videos, /healthz, /readyz, /metrics.

    \b
    Requests at different steps share each denoiser call (step-level batching). Examples:
      vdeploy serve --model model/ --port 8000
      curl -s localhost:8000/v1/videos -d '{"prompt": "a red circle moving left", "steps": 25}' -o out.gif
      vdeploy serve --model model/ --ray --replicas 2
    """
    _require_serve_extra("serve", "starlette", "uvicorn", "prometheus_client")
    if replicas > 1 and not use_ray:
        raise BadInput("--replicas needs --ray (one process serves one replica)")
    _runtime_logging(quiet)
    import logging

    logging.getLogger("vdeploy.runtime.serve").setLevel(logging.WARNING if quiet else logging.INFO)
    settings = dict(backend=backend, threads=threads, max_batch=max_batch, max_queue=max_queue, batching=batching,
                    timeout=timeout, max_videos=max_videos, grace=grace)
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


if __name__ == "__main__":
    main()
