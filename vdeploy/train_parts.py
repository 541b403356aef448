"""The trainer's small parts, each its own concern: the EMA, the resumable data order, the captions embedded once,
the frame-conditioning masks, the log trimming on resume, graceful Ctrl-C, the indexed dataset wrapper and the
``Accelerator`` set-up."""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vdeploy.data import DataError, Dataset
from vdeploy.text import fit_standardizer, standardize_for

logger = logging.getLogger("vdeploy.trainer")  # the trainer's log, as before these parts moved here


def num_to_groups(num: int, divisor: int) -> list[int]:
    """``num`` split into chunks of at most ``divisor`` (the seed's helper)."""
    groups, remainder = divmod(num, divisor)
    return [divisor] * groups + ([remainder] if remainder > 0 else [])


class EMA:
    """Exponential moving average of parameters: ``ma = beta * ma + (1 - beta) * current`` (the seed's)."""

    def __init__(self, beta: float):
        self.beta = beta

    @torch.no_grad()
    def update_model_average(self, ma_model: nn.Module, current_model: nn.Module) -> None:
        for current, ma in zip(current_model.parameters(), ma_model.parameters()):
            ma.data = self.update_average(ma.data, current.data)

    def update_average(self, old, new):
        if old is None:
            return new
        return old * self.beta + (1 - self.beta) * new


class DataOrder:
    """An endless, deterministic stream of sample indices: a seeded permutation per epoch.

    Its whole state is ``(seed, consumed)``, so a resumed run continues the same order. Each
    step takes ``batch_size * num_processes`` indices; process ``rank`` keeps its slice.
    """

    def __init__(self, n: int, seed: int = 0, consumed: int = 0):
        self.n, self.seed, self.consumed = n, int(seed), int(consumed)
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perm

    def take(self, count: int) -> list[int]:
        out = []
        for k in range(self.consumed, self.consumed + count):
            out.append(int(self._permutation(k // self.n)[k % self.n]))
        self.consumed += count
        return out

    def state_dict(self) -> dict:
        return {"seed": self.seed, "consumed": self.consumed, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("n", self.n)) != self.n:
            warnings.warn(
                f"the dataset has {self.n} videos but the checkpoint's data order was for {state['n']}: "
                "the order continues, but not the one the first run would have followed",
                stacklevel=2,
            )
        self.seed, self.consumed = int(state["seed"]), int(state["consumed"])
        self._epoch = -1


# masked frame conditioning (MCVD, Voleti et al. 2022): what each clip of a batch is trained for
MASK_KINDS = ("generation", "prediction", "interpolation")
DEFAULT_MASK_PROBS = (0.4, 0.4, 0.2)


def embed_captions(ds: Dataset, diffusion_model, tokens: bool, device):
    """The dataset's captions through ``diffusion_model``'s text encoder, once per distinct caption:
    ``(cond_table, caption_rows, token_table, token_mask_table)``: the pooled vector of every item, and for a token
    model (``tokens``) each item's row into the per-caption token embeddings and masks (else three Nones).

    Raises:
        DataError: an item has no caption.
        ValueError: the diffusion model has no text encoder.
    """
    missing = [p for p, c in zip(ds.paths, ds.captions) if not c]
    if missing:
        raise DataError(
            f"the model is conditional (cond_dim) but {len(missing)} of {len(ds)} videos have no caption "
            f"(.txt beside the .gif), e.g. {missing[0]}"
        )
    if diffusion_model.text_encoder is None:
        raise ValueError("the model is conditional but the diffusion model has no text encoder attached")
    unique = sorted(set(ds.captions))
    encoder, cls = diffusion_model.text_encoder, diffusion_model.text_use_bert_cls
    unet = diffusion_model.denoise_fn
    embs, token_parts, masks = [], [], []
    for i in range(0, len(unique), 256):
        # the encoder's own (unmapped) vectors: the same calls as GaussianDiffusion.embed_text/text_inputs make
        if tokens:  # one encoder pass: the pooled vector and the tokens
            cond, text_tokens, text_mask = encoder.encode(unique[i : i + 256], unet.text_max_tokens,
                                                          return_cls_repr=cls, device=torch.device("cpu"))
            token_parts.append(text_tokens)
            masks.append(text_mask)
        else:
            cond = encoder(unique[i : i + 256], return_cls_repr=cls, device=torch.device("cpu"))
        embs.append(cond)
    by_caption = dict(zip(unique, torch.cat(embs)))
    cond_table = torch.stack([by_caption[c] for c in ds.captions])
    mode = getattr(unet, "text_standardize", "none")
    if mode != "none":  # the caption map, fitted on every item's caption, into the U-Net's buffers, then applied
        mean, proj = fit_standardizer(cond_table, mode)
        unet.text_mean.copy_(mean)
        unet.text_proj.copy_(proj)
        cond_table = standardize_for(unet, cond_table)
        logger.info("text_standardize %s: fitted on %d captions", mode, len(ds.captions))
    cond_table = cond_table.to(device)
    logger.info("embedded %d distinct captions once", len(unique))
    if not tokens:
        return cond_table, None, None, None
    row = {c: i for i, c in enumerate(unique)}
    caption_rows = torch.tensor([row[c] for c in ds.captions], device=device)
    return cond_table, caption_rows, torch.cat(token_parts).to(device), torch.cat(masks).to(device)


def check_mask_probs(probs, num_frames: int) -> tuple[float, float, float]:
    """``(generation, prediction, interpolation)`` probabilities, validated and normalized to sum 1.

    Raises:
        ValueError: not three finite non-negative numbers with a positive sum, or a kind with a positive
            probability that ``num_frames`` frames cannot hold (prediction needs 2, interpolation 3: with 2
            frames both would be known and nothing left to learn).
    """
    try:
        values = [float(p) for p in probs]
    except (TypeError, ValueError):
        values = []
    if len(values) != 3 or not all(math.isfinite(p) and p >= 0 for p in values) or sum(values) <= 0:
        raise ValueError(f"mask_probs must be three finite non-negative numbers (generation, prediction, "
                         f"interpolation) with a positive sum, got {probs!r}")
    for kind, p, need in zip(MASK_KINDS[1:], values[1:], (2, 3)):
        if p > 0 and num_frames < need:
            raise ValueError(f"mask_probs gives {kind} probability {p:g}, but {kind} needs at least {need} frames "
                             f"and the model has {num_frames}: give it probability 0")
    total = sum(values)
    return tuple(p / total for p in values)


# the high-noise band: the levels whose signal-to-noise ratio abar / (1 - abar) is below this, where a sample from
# pure noise holds almost nothing of the clip yet, so the caption alone must set its layout and motion (the cosine
# schedule at 100 levels: t >= 93, the first seven of the default sampler's 13 logsnr steps)
HIGH_NOISE_MAX_SNR = 1e-2


def check_high_noise_share(share) -> float:
    """``high_noise_share`` validated: a finite number in [0, 1].

    Raises:
        ValueError: anything else.
    """
    try:
        value = float(share)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"high_noise_share must be a number in [0, 1], got {share!r}")
    return value


def high_noise_band(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The timesteps of the high-noise band: those with SNR below :data:`HIGH_NOISE_MAX_SNR` (at least the last)."""
    snr = alphas_cumprod.double() / (1 - alphas_cumprod.double())
    band = torch.nonzero(snr < HIGH_NOISE_MAX_SNR).flatten()
    return band if len(band) else torch.tensor([len(alphas_cumprod) - 1])


def high_noise_timesteps(t: torch.Tensor, u: torch.Tensor, share: float, band: torch.Tensor) -> torch.Tensor:
    """A share of the clips moved into the high-noise band, to be trained from the caption alone.

    A clip with ``u < share`` takes ``t`` uniform over ``band`` (``u / share`` picks which), the others keep their
    uniform draw. The band is where sampling from pure noise spends its first steps; a uniform draw gives it a
    few clips in a hundred, and most of them learn from known frames, not from the caption: the trainer makes the
    moved clips (``u < share``) caption-only, with no known frame: there the v target is nearly the clip itself,
    and only the caption tells which way it moves.

    Args:
        t: ``(b,)`` long, the uniform draw.
        u: ``(b,)`` uniforms in [0, 1).
        share: probability in [0, 1] that a clip is moved (0: ``t`` unchanged, none moved).
        band: the band's timesteps (:func:`high_noise_band`).

    Returns:
        ``t`` with the moved clips' steps.
    """
    if share <= 0:
        return t
    pick = (u.double() / share * len(band)).floor().long().clamp(0, len(band) - 1)
    return torch.where(u < share, band.to(t.device)[pick].to(t.dtype), t)


def frame_masks(u: torch.Tensor, num_frames: int, probs) -> tuple[torch.Tensor, torch.Tensor]:
    """Known-frame masks for a batch of clips from two uniforms each.

    ``u[:, 0]`` picks the kind with ``probs`` (:data:`MASK_KINDS`): generation knows no frame; prediction the
    first k frames, ``k = 1 + floor(u[:, 1] * (f - 1))`` uniform in 1..f-1; interpolation the first and the
    last frame. A kind of probability 0 is never picked.

    Args:
        u: ``(b, 2)`` uniforms in [0, 1).
        num_frames: frames per clip ``f``.
        probs: normalized ``(generation, prediction, interpolation)`` probabilities.

    Returns:
        ``mask`` ``(b, f)`` float32 (1 = known) and ``kind`` ``(b,)`` long (an index into :data:`MASK_KINDS`).
    """
    device = u.device
    cum = torch.tensor(probs, dtype=torch.float64).cumsum(0)[:2].to(device)
    last = max(i for i, p in enumerate(probs) if p > 0)  # float round-off in cum never reaches past it
    kind = (u[:, :1].double() >= cum).sum(dim=1).clamp(max=last)
    k = (1 + (u[:, 1].double() * (num_frames - 1)).floor().long()).clamp(1, max(num_frames - 1, 1))
    pos = torch.arange(num_frames, device=device)
    prediction = pos[None, :] < k[:, None]
    interpolation = ((pos == 0) | (pos == num_frames - 1))[None, :].expand_as(prediction)
    mask = torch.where((kind == 1)[:, None], prediction, (kind == 2)[:, None] & interpolation)
    return mask.float(), kind


def _log_lines_until(path: Path, step: int) -> list[str]:
    """The lines of a ``log.jsonl`` up to ``step`` (a crashed run may have logged past its checkpoint)."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    return kept


class _GracefulStop:
    """The first Ctrl-C asks the loop to stop at the next step boundary (and save); a second one
    interrupts at once. Only in the main thread, where signal handlers can be set."""

    def __init__(self):
        self.requested = False
        self._installed = threading.current_thread() is threading.main_thread()
        if self._installed:
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step and saving model-last.pt (Ctrl-C again to abort now)", file=sys.stderr)

    def restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
            self._installed = False


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds[i], i


def _make_accelerator(mixed_precision: str | None, cpu: bool):
    """An ``Accelerator`` for this process, alone or one of those ``torchrun`` / ``accelerate launch``
    started (gloo on the CPU, NCCL on CUDA). ``mixed_precision`` None: accelerate's launch/config setting."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    if mixed_precision not in (None, "no", "fp16", "bf16"):
        raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', not {mixed_precision!r}")
    use_cuda = torch.cuda.is_available() and not cpu
    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        # a second trainer in the same single process (tests, notebooks) may want other settings
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=mixed_precision, cpu=not use_cuda)
