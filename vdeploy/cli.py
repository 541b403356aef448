"""The ``vdeploy`` command line: the training-half commands (data, train), and the entry point.

The group and its shared option types are ``cli_options.py``; the commands of the other stages live beside it,
one module per concern, and register on its ``main``: ``cli_model.py`` (export, verify, parity, bench) and
``cli_runtime.py`` (sample, serve). This module imports them (so ``vdeploy.cli:main`` has every command); they
import only ``cli_options``. Each command
imports its stage inside its body, so ``vdeploy sample`` never loads torch. Bad input (a missing file, a
config that does not fit) is a one-line message and exit code 2.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import click

from vdeploy import config as vconfig  # torch-free: the presets for --help
from vdeploy.cli_options import (  # noqa: F401 (the shared group and types, also imported from here)
    BadInput, FiniteFloat, OneLineErrors, main, require_extra,
)


# ---------------------------------------------------------------- data ----

class MaskProbs(click.ParamType):
    """``G,P,I``: three finite non-negative numbers with a positive sum, normalized to sum 1."""

    name = "G,P,I"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        parts = str(value).split(",")
        try:
            probs = [float(p) for p in parts]
        except ValueError:
            probs = []
        if len(probs) != 3 or not all(math.isfinite(p) and p >= 0 for p in probs) or sum(probs) <= 0:
            self.fail(f"{value!r} is not three finite non-negative numbers G,P,I (generation, prediction, "
                      "interpolation) with a positive sum, e.g. 0.4,0.4,0.2", param, ctx)
        return tuple(p / sum(probs) for p in probs)


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
              help=f"Model config: a preset ({', '.join(vconfig.PRESETS)}) or a JSON file.  [default: tiny, or the "
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
@click.option("--frame-conditioning", is_flag=True,
              help="Train with masked frame conditioning (MCVD): the model also takes known frames and a per-frame "
                   "mask, so it generates, predicts (first frames known, image-to-video) and interpolates (first "
                   "and last known). Sets the config's frame_conditioning (a checkpoint's config is kept with "
                   "--resume).")
@click.option("--mask-probs", default=None, type=MaskProbs(),
              help="With frame conditioning: how often a training clip is generation, prediction (the first k "
                   "frames known, k uniform in 1..f-1) or interpolation (first and last known), normalized.  "
                   "[default: 0.4,0.4,0.2, or the checkpoint's with --resume]")
@click.option("--high-noise-share", default=0.0, show_default=True, type=FiniteFloat(0, 1),
              help="Share of training clips trained from the caption alone (no known frame) at the noisiest "
                   "steps (SNR < 0.01), where sampling from pure noise starts and only the caption can set the "
                   "clip's layout and motion (0: the seed's uniform draw; kept with --resume).")
@click.option("--sample-rows", default=2, show_default=True, type=click.IntRange(1, 16),
              help="Milestone samples form a rows x rows grid (the seed's default is 4).")
@click.option("--ema-decay", default=0.995, show_default=True, type=FiniteFloat(0, 1))
@click.option("--ema-start", default=2000, show_default=True, type=click.IntRange(min=0),
              help="Step from which the EMA averages (before it, it copies the weights).")
@click.option("--ema-every", default=10, show_default=True, type=click.IntRange(min=1),
              help="Update the EMA every this many steps.")
@click.option("--cond-scale", default=1.0, show_default=True, type=FiniteFloat(),
              help="Classifier-free guidance scale for the milestone samples of a conditional model.")
@click.option("--max-grad-norm", default=None, type=FiniteFloat(min=0, min_open=True),
              help="Clip gradients to this norm.")
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
          cpu: bool, workers: int, quiet: bool, mixed_precision: str | None, max_bad_steps: int,
          frame_conditioning: bool, mask_probs: tuple[float, float, float] | None,
          high_noise_share: float) -> None:
    """Train a video-diffusion U-Net on a folder of GIFs.

    Runs as one process, or as several under torchrun or accelerate launch (one per GPU; gloo
    processes on the CPU): --batch-size is then per process, and N processes train what one
    does with N times the batch (see the README, "Training on several GPUs or machines").

    \b
    Examples:
      vdeploy train --data demo/data --results demo/results --config tiny
      vdeploy train --data demo/data --results demo/results --text-encoder default
      vdeploy train --data demo/data --results demo/results --frame-conditioning --mask-probs 0.4,0.4,0.2
      vdeploy train --data demo/data --results demo/results --text-encoder default --high-noise-share 0.3
      vdeploy train --data demo/data --results demo/results --steps 2000 --resume
      torchrun --standalone --nproc-per-node 2 -m vdeploy.cli train --data demo/data --results demo/results
    """
    import logging
    import os

    from vdeploy.runtime.atomic import unwritable

    # ---- everything that can be checked before torch is imported
    require_extra("train", "torch", "accelerate", "safetensors")
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
        if config is not None and frame_conditioning:
            config = vconfig.resolve({**config, "frame_conditioning": True})
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
        if frame_conditioning and not config["frame_conditioning"]:
            raise BadInput(f"--frame-conditioning: {resume_path} was trained without frame conditioning, and a "
                           "resumed run keeps its model; start a new run (another --results) to add it")
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
        if kept.get("mask_probs") is not None:
            mask_probs = tuple(kept["mask_probs"])
        high_noise_share = kept.get("high_noise_share", high_noise_share)
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
    if mask_probs is not None and not config["frame_conditioning"]:
        raise BadInput("--mask-probs needs a frame-conditioned model: add --frame-conditioning (or a config with "
                       "\"frame_conditioning\": true)")
    save_every = min(save_every, steps)
    precision = "fp16" if amp else (mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION") or "no")
    on_cpu = (cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
              or not torch.cuda.is_available())
    if precision == "fp16" and on_cpu:
        raise BadInput("fp16 mixed precision (--amp, --mixed-precision fp16) needs a CUDA GPU: "
                       "use --mixed-precision bf16 on the CPU")

    # ---- the text encoder sets cond_dim
    encoder = None
    wants_cond = (text_encoder is not None or config["cond_dim"] is not None or config["use_bert_text_cond"]
                  or config["text_cross_attention"])  # the tokens come from the text encoder too
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
            mixed_precision=None if amp else mixed_precision, max_bad_steps=max_bad_steps, mask_probs=mask_probs,
            high_noise_share=high_noise_share,
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
    if trainer.mask_probs is not None:
        cond_note += (", frame-conditioned (generation/prediction/interpolation "
                      f"{'/'.join(f'{p:.2g}' for p in trainer.mask_probs)})")
    if trainer.high_noise_share > 0:
        band = trainer.high_noise_band
        cond_note += (f", {trainer.high_noise_share:.0%} of the clips caption-only at steps {int(band[0])}-"
                      f"{int(band[-1])}")
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
    "max_bad_steps": "max_bad_steps", "mask_probs": "mask_probs", "high_noise_share": "high_noise_share",
}


def _config_core(config: dict) -> dict:
    """A config without cond_dim (which --text-encoder sets) for comparisons."""
    return {k: v for k, v in config.items() if k != "cond_dim"}


# the other stages' commands register on `main` (vdeploy.cli_options) when their modules are imported
from vdeploy import cli_model, cli_runtime  # noqa: E402,F401

if __name__ == "__main__":  # python -m vdeploy.cli (torchrun)
    main()
