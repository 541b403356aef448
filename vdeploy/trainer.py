"""The trainer: the seed's ``Trainer`` on ``accelerate``, with checkpoints that resume exactly.

Same constructor arguments and defaults as ``video-diffusion-pytorch`` 0.6.3 (EMA 0.995 from step
2000 every 10 steps, Adam 1e-4, gradient accumulation, AMP, ``max_grad_norm``, a checkpoint and
a sample GIF grid every ``save_and_sample_every`` steps). What it adds:

* any device (CPU, CUDA) and multi-process launches (``torchrun``, ``accelerate launch``): N
  processes with ``train_batch_size`` b take the same steps as one process with N*b (same data,
  same noise, so the same weights to float32 round-off), and checkpoints resume across process
  counts; mixed precision and gradient accumulation go through ``accelerate``;
* atomic checkpoints with the optimizer, scaler, RNG states, data order and model config, so a
  resumed run continues bit for bit where it stopped (single process, ``num_workers=0``);
* a deterministic data order: a seeded permutation per epoch, resumable from a sample count;
* deterministic training noise: each video's t and noise (and caption dropout, focus-present
  draws) come from a generator seeded by (seed, step, micro-batch, its place in the global
  batch), so they depend neither on the process count nor on where a run was resumed;
* caption conditioning through the diffusion model's text encoder, embeddings cached once (for a U-Net with
  ``text_cross_attention`` also the token embeddings and masks, once per distinct caption; caption dropout
  replaces both by their learned nulls);
* masked frame conditioning (MCVD, Voleti et al. 2022) for a U-Net built with ``frame_conditioning``:
  every clip is trained for generation, prediction (the first k frames known) or interpolation (the
  first and last known), drawn with ``mask_probs`` from its own generator like its noise;
* ``model-last.pt`` (and ``sample-last.gif``) pointing at the newest milestone;
* a tqdm bar with the loss and it/s, and ``log.jsonl`` with one line per step.

Differences from the seed, on purpose: ``step`` in a checkpoint counts completed optimizer steps
(the seed saved the index of the step in progress, so its resume repeated one step); the sample
grid is drawn from a fixed generator (the same noise at every milestone, and training
randomness untouched); horizontal flips (off by default) flip whole clips, not single frames;
the training noise comes from per-video generators (above), not torch's global RNG; ``amp`` is
fp16 and needs CUDA (``mixed_precision="bf16"`` is the CPU's).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from vdeploy import checkpoint as ckpt_io
from vdeploy import config as vconfig
from vdeploy.runtime import atomic
from vdeploy.data import Dataset, video_tensor_to_gif
from vdeploy.diffusion import GaussianDiffusion
from vdeploy.train_parts import (  # noqa: F401 (EMA, DataOrder, num_to_groups: public names of this module)
    DEFAULT_MASK_PROBS,
    EMA,
    DataOrder,
    _GracefulStop,
    _Indexed,
    _log_lines_until,
    _make_accelerator,
    check_high_noise_share,
    check_mask_probs,
    embed_captions,
    frame_masks,
    high_noise_band,
    high_noise_timesteps,
    num_to_groups,
)

logger = logging.getLogger(__name__)


class Trainer:
    """Train a :class:`~vdeploy.diffusion.GaussianDiffusion` on a folder of GIFs.

    The first arguments and their defaults are the seed's (``num_frames`` is accepted and, as
    in the seed, the model's own frame count is used). vdeploy's additions are keyword-only:

    Args:
        config: the resolved flat model config (vdeploy.config) stored in checkpoints; when
            given, it must agree with the diffusion model.
        seed: seeds the data order and the milestone sample noise.
        null_cond_prob: probability of dropping the caption (classifier-free guidance training).
        cond_scale: guidance scale for the milestone samples of a conditional model.
        horizontal_flip: flip whole clips left-right at random.
        num_workers: DataLoader worker processes (0: load in the main process; exact resume
            needs 0 when flips are on).
        progress: show the tqdm bar.
        accelerator: an ``accelerate.Accelerator`` to use instead of building one.
        cpu: force the CPU even where CUDA is present.
        mixed_precision: ``"no"``, ``"fp16"`` (CUDA only; what the seed's ``amp=True`` means) or
            ``"bf16"``; None: ``amp``'s choice, else what ``accelerate launch`` / ``accelerate config``
            set (ACCELERATE_MIXED_PRECISION), else ``"no"``.
        max_bad_steps: an optimizer step whose loss or gradient is NaN/Inf is skipped (a warning, and
            ``skipped_steps`` in ``log.jsonl``); this many in a row stop training with
            :class:`NonFiniteTrainingError`, leaving the last good checkpoint as it is.
        mask_probs: for a U-Net built with ``frame_conditioning``: the probabilities ``(generation,
            prediction, interpolation)`` of each clip's known-frame mask (normalized; default
            ``DEFAULT_MASK_PROBS``). The loss covers the unknown frames only; milestone samples are plain
            generation. Refused for a model without frame conditioning.
        high_noise_share: the probability in [0, 1] that a clip trains in the high-noise band (SNR below
            :data:`~vdeploy.train_parts.HIGH_NOISE_MAX_SNR`, where sampling from pure noise starts) from its
            caption alone: no known frame (:func:`~vdeploy.train_parts.high_noise_timesteps`; an extra uniform
            per clip). 0 (default): the seed's uniform draw, with the same numbers as before.
    """

    def __init__(
        self,
        diffusion_model: GaussianDiffusion,
        folder,
        *,
        ema_decay: float = 0.995,
        num_frames: int = 16,
        train_batch_size: int = 32,
        train_lr: float = 1e-4,
        train_num_steps: int = 100000,
        gradient_accumulate_every: int = 2,
        amp: bool = False,
        step_start_ema: int = 2000,
        update_ema_every: int = 10,
        save_and_sample_every: int = 1000,
        results_folder="./results",
        num_sample_rows: int = 4,
        max_grad_norm: float | None = None,
        config: dict | None = None,
        seed: int = 0,
        null_cond_prob: float = 0.0,
        cond_scale: float = 1.0,
        horizontal_flip: bool = False,
        num_workers: int = 0,
        progress: bool = True,
        accelerator=None,
        cpu: bool = False,
        mixed_precision: str | None = None,
        max_bad_steps: int = 5,
        mask_probs: tuple[float, float, float] | None = None,
        high_noise_share: float = 0.0,
    ):
        if train_batch_size < 1 or gradient_accumulate_every < 1 or save_and_sample_every < 1:
            raise ValueError("train_batch_size, gradient_accumulate_every and save_and_sample_every must be >= 1")
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {max_bad_steps}")
        numbers = {"ema_decay": ema_decay, "train_lr": train_lr, "max_grad_norm": max_grad_norm,
                   "null_cond_prob": null_cond_prob, "cond_scale": cond_scale}
        bad = [f"{k}={v!r}" for k, v in numbers.items() if v is not None and not math.isfinite(v)]
        if bad:  # a NaN setting trains a NaN model while the printed loss looks normal
            raise ValueError(f"Trainer settings must be finite numbers: {', '.join(bad)}")
        if amp and mixed_precision not in (None, "fp16"):
            raise ValueError(f"amp=True is fp16 mixed precision; it contradicts mixed_precision={mixed_precision!r}")
        if accelerator is None:
            accelerator = _make_accelerator("fp16" if amp else mixed_precision, cpu)
        if accelerator.gradient_accumulation_steps not in (1, gradient_accumulate_every):
            raise ValueError(f"the accelerator accumulates {accelerator.gradient_accumulation_steps} micro-batches but "
                             f"gradient_accumulate_every={gradient_accumulate_every}")
        accelerator.gradient_accumulation_steps = gradient_accumulate_every  # accelerate.accumulate() counts them
        if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
            raise ValueError("fp16 mixed precision needs a CUDA GPU (accelerate would silently train in float32 on "
                             "the CPU): use bf16 on the CPU")
        self.accelerator = accelerator
        self.device = self.accelerator.device
        self.mixed_precision = accelerator.mixed_precision

        self.ema = EMA(ema_decay)
        self.update_ema_every = update_ema_every
        self.step_start_ema = step_start_ema
        self.save_and_sample_every = save_and_sample_every
        self.batch_size = train_batch_size
        self.image_size = diffusion_model.image_size
        self.gradient_accumulate_every = gradient_accumulate_every
        self.train_num_steps = train_num_steps
        self.amp = amp
        self.max_grad_norm = max_grad_norm
        self.max_bad_steps = max_bad_steps
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite loss or gradient (this run)
        self.num_sample_rows = num_sample_rows
        self.null_cond_prob = null_cond_prob
        self.cond_scale = cond_scale
        self.seed = seed
        self.progress = progress
        self.config = dict(config) if config is not None else None
        if self.config is not None:
            _check_config_matches(self.config, diffusion_model)

        self.ds = Dataset(
            folder, diffusion_model.image_size, channels=diffusion_model.channels,
            num_frames=diffusion_model.num_frames, horizontal_flip=horizontal_flip,
        )
        logger.info("found %d videos as gif files at %s", len(self.ds), folder)

        unet = diffusion_model.denoise_fn
        self.has_cond = bool(getattr(unet, "has_cond", False))
        self.frame_conditioning = bool(getattr(unet, "frame_conditioning", False))
        if mask_probs is not None and not self.frame_conditioning:
            raise ValueError("mask_probs is for a frame-conditioned model (config 'frame_conditioning': true); "
                             "this model has no frame conditioning")
        self.mask_probs = (check_mask_probs(DEFAULT_MASK_PROBS if mask_probs is None else mask_probs,
                                            diffusion_model.num_frames) if self.frame_conditioning else None)
        self.high_noise_share = check_high_noise_share(high_noise_share)
        self.high_noise_band = high_noise_band(diffusion_model.alphas_cumprod.cpu())
        self.text_encoder = diffusion_model.text_encoder
        self.text_tokens = bool(getattr(unet, "text_cross_attention", False))
        # the captions embedded once: pooled vectors per item; a token model's tokens and masks per distinct caption
        self.cond_table = self.caption_rows = self.token_table = self.token_mask_table = None
        if self.has_cond:
            (self.cond_table, self.caption_rows, self.token_table,
             self.token_mask_table) = embed_captions(self.ds, diffusion_model, self.text_tokens, self.device)

        self.data_order = DataOrder(len(self.ds), seed=seed)
        self.consumed = 0  # samples of the data order the batches handed out so far used (all processes)
        self.num_workers = num_workers
        self._batches = None

        opt = torch.optim.Adam(diffusion_model.parameters(), lr=train_lr)
        self.model, self.opt = self.accelerator.prepare(diffusion_model, opt)
        self.ema_model = copy.deepcopy(self.unwrapped_model).requires_grad_(False)
        self.step = 0
        self.interrupted = False  # set when a Ctrl-C stopped train() early (after saving)

        self.results_folder = Path(results_folder)
        if self.accelerator.is_main_process:
            self.results_folder.mkdir(exist_ok=True, parents=True)
        self.reset_parameters()

    # ------------------------------------------------------------ parts ----

    @property
    def unwrapped_model(self) -> GaussianDiffusion:
        return self.accelerator.unwrap_model(self.model)

    def text_of(self, idx) -> dict:
        """The cached token inputs ``{"text_tokens", "text_mask"}`` of dataset items ``idx`` (a token model's;
        ``{}`` otherwise)."""
        if self.token_table is None:
            return {}
        rows = self.caption_rows[torch.as_tensor(idx, device=self.device)]
        return {"text_tokens": self.token_table[rows], "text_mask": self.token_mask_table[rows]}

    def _batch_iter(self):
        """Batches ``(video, index)`` for this process, following :attr:`data_order` from now on."""
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        order, b = self.data_order, self.batch_size

        def index_batches():
            while True:
                yield order.take(b * world)[rank * b : (rank + 1) * b]

        if self.num_workers == 0:
            for idx in index_batches():
                yield torch.stack([self.ds[i] for i in idx]), torch.tensor(idx)
        else:
            loader = torch.utils.data.DataLoader(
                _Indexed(self.ds), batch_sampler=index_batches(), num_workers=self.num_workers,
                pin_memory=self.device.type == "cuda", persistent_workers=True,
            )
            yield from loader

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next training batch on the device, with its caption embeddings (or None)."""
        video, idx = self._next_indexed()
        return video, self.cond_table[idx] if self.cond_table is not None else None

    def _next_indexed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next training batch on the device and its dataset indices (on the device)."""
        if self._batches is None:
            self.consumed = self.data_order.consumed
            self._batches = self._batch_iter()
        video, idx = next(self._batches)
        # counted here, not in the data order, which DataLoader workers read ahead of training
        self.consumed += self.batch_size * self.accelerator.num_processes
        return video.to(self.device, non_blocking=True), idx.to(self.device)

    def step_noise(self, micro: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The random draws of micro-batch ``micro`` of the current step, for this process's videos.

        Video k of the global batch (this process holds ``rank * batch_size`` onwards) draws its
        t, its noise and two uniforms (caption dropout, focus on the present), and for a
        frame-conditioned model two more (the mask's kind, the number of known frames), and with a
        ``high_noise_share`` one more (is it moved into the high-noise band, and to which step), from a
        generator seeded by ``(seed, step, micro, k)``: one process with N*b videos draws what N
        with b do, and a resumed run what an uninterrupted one would.

        Returns:
            ``t`` ``(b,)`` long, ``noise`` ``(b, c, f, h, w)`` float32, ``u`` ``(b, 2)`` (``(b, 4)`` with
            frame conditioning, one more column with a high-noise share) in [0, 1).
        """
        m = self.unwrapped_model
        shape = (m.channels, m.num_frames, m.image_size, m.image_size)
        first = self.accelerator.process_index * batch_size
        n_uniform = (4 if self.frame_conditioning else 2) + (self.high_noise_share > 0)
        t, noise, u = [], [], []
        for k in range(first, first + batch_size):
            seq = np.random.SeedSequence([self.seed % 2**63, self.step, micro, k])
            g = torch.Generator(self.device).manual_seed(int(seq.generate_state(1, np.uint64)[0] >> 1))
            t.append(torch.randint(0, m.num_timesteps, (1,), generator=g, device=self.device))
            noise.append(torch.randn(shape, generator=g, device=self.device))
            u.append(torch.rand(n_uniform, generator=g, device=self.device))
        t, u = torch.cat(t), torch.stack(u)
        return high_noise_timesteps(t, u[:, -1], self.high_noise_share, self.high_noise_band), torch.stack(noise), u

    def _loss_kwargs(self, micro: int, data: torch.Tensor, cond, prob_focus_present: float, focus_present_mask,
                     text: dict | None = None):
        """The model's keyword arguments for one micro-batch: its t and noise, caption dropout,
        focus-present and known-frame masks drawn here (:meth:`step_noise`) rather than inside the model;
        ``text``: a token model's ``{"text_tokens", "text_mask"}`` (:meth:`text_of`), dropped with the caption."""
        t, noise, u = self.step_noise(micro, data.shape[0])
        kwargs = {"t": t, "noise": noise, "focus_present_mask": focus_present_mask}
        if self.frame_conditioning:
            kwargs["mask"] = frame_masks(u[:, 2:4], data.shape[2], self.mask_probs)[0]
            if self.high_noise_share > 0:  # the clips moved into the high-noise band learn from the caption alone
                kwargs["mask"][u[:, -1] < self.high_noise_share] = 0
        if focus_present_mask is None and prob_focus_present > 0:
            kwargs["focus_present_mask"] = u[:, 1] < prob_focus_present  # the denoiser's prob_mask_like
        if self.has_cond:
            text = dict(text or {})
            if self.null_cond_prob > 0:  # as the denoiser's own dropout: the learned null embedding
                unet = self.unwrapped_model.denoise_fn
                drop = u[:, 0] < self.null_cond_prob
                cond = torch.where(drop[:, None], unet.null_cond_emb.to(cond.dtype), cond)
                if text:  # and the null token sequence for the same rows: null means null for both
                    text["text_tokens"], text["text_mask"] = unet.drop_text(drop, text["text_tokens"],
                                                                            text["text_mask"])
            kwargs.update(cond=cond, null_cond_prob=0.0, **text)
        return kwargs

    # -------------------------------------------------------------- EMA ----

    def reset_parameters(self) -> None:
        self.ema_model.load_state_dict(self.unwrapped_model.state_dict())

    def step_ema(self) -> None:
        if self.step < self.step_start_ema:
            self.reset_parameters()
            return
        self.ema.update_model_average(self.ema_model, self.unwrapped_model)

    # ------------------------------------------------------ checkpoints ----

    def checkpoint_dict(self) -> dict:
        """Everything a resume needs, in the layout of :mod:`vdeploy.checkpoint`."""
        scaler = self.accelerator.scaler
        return ckpt_io.make_checkpoint(
            step=self.step,
            model=self.unwrapped_model.state_dict(),
            ema=self.ema_model.state_dict(),
            optimizer=self.opt.state_dict(),
            scaler=scaler.state_dict() if scaler is not None else {},
            config=self.config,
            data={**self.data_order.state_dict(), "consumed": self.consumed if self._batches is not None
                  else self.data_order.consumed},
            text_encoder=str(self.text_encoder.path) if self.text_encoder is not None else None,
            trainer={
                "ema_decay": self.ema.beta, "train_batch_size": self.batch_size,
                "train_lr": self.opt.param_groups[0]["lr"], "train_num_steps": self.train_num_steps,
                "gradient_accumulate_every": self.gradient_accumulate_every, "amp": self.amp,
                "step_start_ema": self.step_start_ema, "update_ema_every": self.update_ema_every,
                "save_and_sample_every": self.save_and_sample_every, "max_grad_norm": self.max_grad_norm,
                "max_bad_steps": self.max_bad_steps,
                "seed": self.seed, "null_cond_prob": self.null_cond_prob, "cond_scale": self.cond_scale,
                "num_sample_rows": self.num_sample_rows, "num_processes": self.accelerator.num_processes,
                "mixed_precision": self.mixed_precision,
                "mask_probs": list(self.mask_probs) if self.mask_probs is not None else None,
                "high_noise_share": self.high_noise_share,
            },
        )

    def save(self, milestone) -> Path | None:
        """Write ``model-{milestone}.pt`` atomically and point ``model-last.pt`` at it (main process)."""
        self.accelerator.wait_for_everyone()
        path = None
        if self.accelerator.is_main_process:
            path = ckpt_io.save_checkpoint(self.checkpoint_dict(), self.results_folder / f"model-{milestone}.pt")
            if path.name != ckpt_io.LAST_NAME:
                ckpt_io.link_atomic(path, self.results_folder / ckpt_io.LAST_NAME)
        self.accelerator.wait_for_everyone()
        return path

    def load(self, milestone=-1, **kwargs) -> Path:
        """Resume from ``model-{milestone}.pt``, the newest checkpoint (``-1``, as in the seed), or a path.

        vdeploy checkpoints restore everything (weights, EMA, optimizer, scaler, RNG states, data
        order, step); the seed's ``model-N.pt`` restores weights, EMA, scaler and step, and the
        optimizer starts afresh. ``kwargs`` go to ``load_state_dict`` (e.g. ``strict``).
        """
        if isinstance(milestone, int):
            if milestone == -1:
                path = ckpt_io.latest_checkpoint(self.results_folder)
                if path is None:
                    raise ckpt_io.CheckpointError(f"no checkpoint (model-*.pt) in {self.results_folder} to resume from")
            else:
                path = self.results_folder / f"model-{milestone}.pt"
        else:
            path = Path(milestone)
        data = ckpt_io.load_checkpoint(path, map_location="cpu")
        if data.get("config") is not None and self.config is not None:
            stored = {k: v for k, v in data["config"].items()}
            try:  # a config stored before a key existed has that key's default
                stored = vconfig.resolve(stored)
            except vconfig.ConfigError:
                pass
            diff = sorted(k for k in set(stored) | set(self.config) if stored.get(k) != self.config.get(k))
            if diff:
                raise ckpt_io.CheckpointError(
                    f"{path} was trained with a different model config ({', '.join(diff)} differ)"
                )
        self.unwrapped_model.load_state_dict(data["model"], **kwargs)
        self.ema_model.load_state_dict(data["ema"] if data.get("ema") is not None else data["model"], **kwargs)
        if data.get("optimizer"):
            self.opt.load_state_dict(data["optimizer"])
        elif data["format"] != "state_dict":
            warnings.warn(f"{path} has no optimizer state (a video-diffusion-pytorch checkpoint?): "
                          "Adam starts afresh", stacklevel=2)
        scaler = self.accelerator.scaler
        if scaler is not None and data.get("scaler"):
            scaler.load_state_dict(data["scaler"])
        if data.get("data"):
            self.data_order.load_state_dict(data["data"])
            self._batches = None
        if data.get("rng"):
            ckpt_io.set_rng_state(data["rng"])
        self.step = int(data.get("step") or 0)
        logger.info("resumed from %s at step %d", path, self.step)
        return path

    # -------------------------------------------------------- numerics ----

    def _nonfinite(self, loss_value: float) -> str | None:
        """What is not finite in this step ("loss nan", "gradient"), or None.

        Every process sees the same reduced loss and the same all-reduced gradients, so all decide
        alike. With fp16's gradient scaler, overflowing gradients are the scaler's business (it skips
        the step itself and lowers its scale), so only the loss is checked there.
        """
        if not math.isfinite(loss_value):
            return f"loss {loss_value}"
        if self.accelerator.scaler is not None:
            return None
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            return "gradient NaN/Inf"
        return None

    def _skip_step(self, bad: str, in_a_row: int, logfile, t0: float) -> None:
        """Skip this optimizer step (gradients dropped, weights untouched); stop after max_bad_steps in a row."""
        self.opt.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        log = {"step": self.step, "loss": None, "skipped": bad, "skipped_steps": self.skipped_steps,
               "bad_in_a_row": in_a_row}
        if logfile is not None:
            logfile.write(json.dumps({**log, "time": round(time.perf_counter() - t0, 3)}) + "\n")
            logfile.flush()
        if in_a_row >= self.max_bad_steps:
            last = ckpt_io.latest_checkpoint(self.results_folder)
            kept = f"the last good checkpoint, {last}, is kept" if last else "no checkpoint had been written yet"
            raise NonFiniteTrainingError(
                f"training stopped at step {self.step}: {in_a_row} optimizer steps in a row had a non-finite "
                f"loss or gradient (last: {bad}); {kept}. Lower the learning rate, set max_grad_norm, or check "
                "the data")
        logger.warning("step %d: %s; skipped this optimizer step (%d in a row, stopping at %d)",
                       self.step + 1, bad, in_a_row, self.max_bad_steps)

    # ---------------------------------------------------------- samples ----

    def sample_captions(self, n: int) -> list[str]:
        """``n`` captions for milestone samples: spread over the dataset's distinct captions."""
        unique = sorted(set(self.ds.captions))
        return [unique[(i * max(1, len(unique) // n)) % len(unique)] for i in range(n)]

    @torch.inference_mode()
    def sample_grid(self, path) -> Path:
        """Sample ``num_sample_rows ** 2`` videos with the EMA model and write them as one GIF grid."""
        rows = self.num_sample_rows
        num_samples = rows**2
        generator = torch.Generator().manual_seed(self.seed)
        captions = self.sample_captions(num_samples) if self.has_cond else None
        videos, start = [], 0
        for n in num_to_groups(num_samples, self.batch_size):
            cond = None
            text = {}
            if captions is not None:  # the cached embeddings of these captions
                items = [self.ds.captions.index(c) for c in captions[start : start + n]]
                cond, text = self.cond_table[items], self.text_of(items)
            videos.append(self.ema_model.sample(cond=cond, cond_scale=self.cond_scale, batch_size=n,
                                                generator=generator, progress=self.progress, **text).float().cpu())
            start += n
        v = torch.nn.functional.pad(torch.cat(videos), (2, 2, 2, 2))
        _, c, f, h, w = v.shape
        grid = v.reshape(rows, rows, c, f, h, w).permute(2, 3, 0, 4, 1, 5).reshape(c, f, rows * h, rows * w)
        path = Path(path)
        video_tensor_to_gif(grid, path)
        if captions is not None:
            path.with_suffix(".txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
        return path

    # ------------------------------------------------------------- loop ----

    def train(self, prob_focus_present: float = 0.0, focus_present_mask=None, log_fn: Callable = lambda log: None):
        """Train until ``train_num_steps`` optimizer steps, saving and sampling at each milestone.

        ``prob_focus_present``, ``focus_present_mask`` and ``log_fn(dict)`` as in the seed.
        Returns the loss of the last step.
        """
        assert callable(log_fn)
        acc = self.accelerator
        main = acc.is_main_process
        log_path = self.results_folder / "log.jsonl"
        logfile = None
        if main:  # a fresh run starts a fresh log; a resumed one drops lines past its checkpoint
            kept = _log_lines_until(log_path, self.step) if self.step else []
            atomic.write_text(log_path, "".join(kept))  # a kill here leaves the old log or the new one
            logfile = open(log_path, "a", encoding="utf-8")
        bar = tqdm(total=self.train_num_steps, initial=self.step, desc="training", disable=not (self.progress and main),
                   dynamic_ncols=True)
        avg, loss_value = None, math.nan
        t0 = time.perf_counter()
        stop = _GracefulStop()
        agreed_stop = False  # several processes stop together, at a step they all agreed on
        bad_in_a_row = 0  # consecutive optimizer steps skipped for a non-finite loss or gradient
        try:
            while self.step < self.train_num_steps:
                if agreed_stop or (acc.num_processes == 1 and stop.requested):
                    self.interrupted = True
                    saved = str(self.save("last"))
                    log_fn({"step": self.step, "loss": loss_value, "checkpoint": saved, "stopped": True})
                    if main:
                        logger.warning("interrupted: saved %s at step %d", self.results_folder / ckpt_io.LAST_NAME,
                                       self.step)
                    break
                self.model.train()
                losses = []
                acc.step = 0  # accelerate's micro-batch count: it syncs gradients on the last of each step
                for i in range(self.gradient_accumulate_every):
                    data, idx = self._next_indexed()
                    cond = self.cond_table[idx] if self.cond_table is not None else None
                    kwargs = self._loss_kwargs(i, data, cond, prob_focus_present, focus_present_mask,
                                               text=self.text_of(idx))
                    with acc.accumulate(self.model):  # no_sync but on the last; backward divides by the count
                        with acc.autocast():
                            loss = self.model(data, **kwargs)
                        acc.backward(loss)
                    losses.append(loss.detach())
                loss_mean = torch.stack(losses).float().mean()
                if acc.num_processes > 1:  # the global batch's loss, and one stop decision for all processes
                    stopping = torch.tensor(float(stop.requested), device=self.device)
                    both = acc.reduce(torch.stack([loss_mean, stopping]), "mean")
                    loss_mean, agreed_stop = both[0], bool(both[1] > 0)
                loss_value = float(loss_mean)
                bad = self._nonfinite(loss_value)
                if bad:
                    bad_in_a_row += 1
                    self._skip_step(bad, bad_in_a_row, logfile, t0)
                    continue
                bad_in_a_row = 0

                if self.max_grad_norm is not None:
                    acc.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)

                if self.step % self.update_ema_every == 0:
                    self.step_ema()
                self.step += 1

                avg = loss_value if avg is None else 0.98 * avg + 0.02 * loss_value
                log = {"step": self.step, "loss": loss_value}
                if self.skipped_steps:
                    log["skipped_steps"] = self.skipped_steps
                if self.step % self.save_and_sample_every == 0:
                    milestone = self.step // self.save_and_sample_every
                    if main:
                        sample = self.sample_grid(self.results_folder / f"{milestone}.gif")
                        ckpt_io.link_atomic(sample, self.results_folder / "sample-last.gif")
                        log["sample"] = str(sample)
                    log["checkpoint"] = str(self.save(milestone))
                elif self.step == self.train_num_steps:
                    log["checkpoint"] = str(self.save("last"))
                if logfile is not None:
                    logfile.write(json.dumps({**log, "time": round(time.perf_counter() - t0, 3)}) + "\n")
                    logfile.flush()
                bar.set_postfix(loss=f"{loss_value:.4f}", avg=f"{avg:.4f}")
                bar.update(1)
                log_fn(log)
        finally:
            stop.restore()
            bar.close()
            if logfile is not None:
                logfile.close()
        logger.info("training completed")
        return loss_value


class NonFiniteTrainingError(FloatingPointError):
    """Training stopped: ``max_bad_steps`` optimizer steps in a row had a NaN/Inf loss or gradient."""


def _check_config_matches(config: dict, model: GaussianDiffusion) -> None:
    pairs = {"image_size": model.image_size, "num_frames": model.num_frames, "channels": model.channels,
             "timesteps": model.num_timesteps, "loss_type": model.loss_type}
    bad = [f"{k}={config[k]!r} vs model {v!r}" for k, v in pairs.items() if k in config and config[k] != v]
    if bad:
        raise ValueError(f"config does not match the diffusion model: {', '.join(bad)}")
