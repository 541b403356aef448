"""Gaussian diffusion (DDPM) around a ``Unet3D`` denoiser: cosine schedule, training loss, sampling.

Faithful to ``video-diffusion-pytorch`` 0.6.3: the same buffers (names, float64 -> float32
values) so ``GaussianDiffusion`` state dicts load with ``strict=True`` both ways, the same loss,
posterior and thresholding, and under the same torch seed the same random draws in the same
order, so ``p_sample_loop`` reproduces the package's samples.

Added for parity with the numpy runtime:

* randomness from a ``torch.Generator`` or from explicit ``noise``: an iterable that yields x_T
  first and then one tensor per loop step (T-1 down to 0; the t=0 one is drawn but masked out,
  exactly as the seed draws it);
* ``callback(i, t, x)`` after every step (``i``: loop index 0..T-1, ``t``: timestep, ``x``: the
  new sample in model space [-1, 1]);
* a tqdm bar that ``progress=False`` turns off;
* ``cond`` may be a list of captions when a :class:`vdeploy.text.TextEncoder` is attached; for a denoiser with
  ``text_cross_attention`` the captions also give its ``text_tokens``/``text_mask`` (one encoder pass), and
  precomputed embeddings come with ``text_tokens=``/``text_mask=`` beside ``cond`` (sampling, ``p_losses``);
* ``prediction_type="v"``: the denoiser predicts v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022)
  instead of eps, so x_0 = sqrt(abar) x_t - sqrt(1 - abar) v never divides by a vanishing sqrt(abar);
  ``loss_weighting="min_snr"``: Min-SNR-gamma weights per sample (Hang et al. 2023). Both opt-in: the
  defaults are the seed's eps loss, unweighted, bit for bit;
* masked frame conditioning (MCVD, Voleti et al. 2022) for a denoiser built with ``frame_conditioning``:
  ``p_losses(..., mask=)`` gives the denoiser the clean video and a per-frame mask and averages the loss
  over the unknown frames only; sampling with ``frames=``, ``mask=`` gives the denoiser the known frames at
  every step, keeps the sample's known frames at q(x_t | x_0) (the forward-diffused truth the model saw in
  training, drawn with the noise each step draws anyway, so no extra random draws) and returns the given
  frames where they are known.

Notation (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"; cosine schedule from
Nichol & Dhariwal 2021): ``betas`` = beta_t, ``alphas_cumprod`` = alpha-bar_t,
q(x_t | x_0) = N(sqrt(alpha-bar_t) x_0, (1 - alpha-bar_t) I).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vdeploy.text import TextEncoder, is_list_str, standardize_for

StepCallback = Callable[[int, int, torch.Tensor], None]

PREDICTION_TYPES = ("eps", "v")  # what the denoiser predicts (the runtime's steps.to_eps_x0 converts the same)
LOSS_WEIGHTINGS = ("none", "min_snr")


def normalize_img(t: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]."""
    return t * 2 - 1


def unnormalize_img(t: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1]."""
    return (t + 1) * 0.5


def extract(a: torch.Tensor, t: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
    """``a[t]`` per batch element, shaped to broadcast against ``x_shape``."""
    b = t.shape[0]
    return a.gather(-1, t).reshape(b, *((1,) * (len(x_shape) - 1)))


def cosine_beta_schedule(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17), float64 betas clipped to [0, 0.9999]."""
    steps = timesteps + 1
    x = torch.linspace(0, timesteps, steps, dtype=torch.float64)
    alphas_cumprod = torch.cos(((x / timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1 - (alphas_cumprod[1:] / alphas_cumprod[:-1])
    return torch.clip(betas, 0, 0.9999)


class GaussianDiffusion(nn.Module):
    """DDPM training and ancestral sampling around ``denoise_fn`` (a ``Unet3D``).

    Args:
        denoise_fn: ``eps = denoise_fn(x, t, cond=None, ...)`` with ``forward_with_cond_scale``.
        image_size, num_frames: the video shape the model is trained for.
        text_use_bert_cls: embed captions as the [CLS] vector instead of the token mean.
        channels: video channels.
        timesteps: diffusion steps T.
        loss_type: ``"l1"`` or ``"l2"`` between the true and predicted noise.
        use_dynamic_thres: Imagen's dynamic thresholding of the predicted x_0 while sampling.
        dynamic_thres_percentile: the percentile of |x_0| used as the threshold.
        text_encoder: optional :class:`vdeploy.text.TextEncoder` for captions as ``cond``; kept
            outside the module tree (no state-dict keys).
        prediction_type: what the denoiser predicts, ``"eps"`` (the seed's) or ``"v"``.
        loss_weighting: ``"none"`` (the seed's plain mean) or ``"min_snr"``: each sample's loss weighted by
            ``min(snr, gamma) / snr`` (eps) or ``min(snr, gamma) / (snr + 1)`` (v), snr = abar / (1 - abar).
        min_snr_gamma: gamma of ``"min_snr"``.
    """

    def __init__(
        self,
        denoise_fn: nn.Module,
        *,
        image_size: int,
        num_frames: int,
        text_use_bert_cls: bool = False,
        channels: int = 3,
        timesteps: int = 1000,
        loss_type: str = "l1",
        use_dynamic_thres: bool = False,
        dynamic_thres_percentile: float = 0.9,
        text_encoder: TextEncoder | None = None,
        prediction_type: str = "eps",
        loss_weighting: str = "none",
        min_snr_gamma: float = 5.0,
    ):
        super().__init__()
        if loss_type not in ("l1", "l2"):
            raise ValueError(f"loss_type must be 'l1' or 'l2', got {loss_type!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}")
        if not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be positive, got {min_snr_gamma!r}")
        self.prediction_type = prediction_type
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = float(min_snr_gamma)
        self.channels = channels
        self.image_size = image_size
        self.num_frames = num_frames
        self.denoise_fn = denoise_fn

        betas = cosine_beta_schedule(timesteps)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)

        self.num_timesteps = int(betas.shape[0])
        self.loss_type = loss_type

        def register_buffer(name: str, val: torch.Tensor) -> None:  # computed in float64, stored float32
            self.register_buffer(name, val.to(torch.float32))

        register_buffer("betas", betas)
        register_buffer("alphas_cumprod", alphas_cumprod)
        register_buffer("alphas_cumprod_prev", alphas_cumprod_prev)

        # q(x_t | x_{t-1}) and friends
        register_buffer("sqrt_alphas_cumprod", torch.sqrt(alphas_cumprod))
        register_buffer("sqrt_one_minus_alphas_cumprod", torch.sqrt(1.0 - alphas_cumprod))
        register_buffer("log_one_minus_alphas_cumprod", torch.log(1.0 - alphas_cumprod))
        register_buffer("sqrt_recip_alphas_cumprod", torch.sqrt(1.0 / alphas_cumprod))
        register_buffer("sqrt_recipm1_alphas_cumprod", torch.sqrt(1.0 / alphas_cumprod - 1))

        # posterior q(x_{t-1} | x_t, x_0): variance beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        register_buffer("posterior_variance", posterior_variance)
        # log clipped: the variance is 0 at the start of the chain
        register_buffer("posterior_log_variance_clipped", torch.log(posterior_variance.clamp(min=1e-20)))
        register_buffer("posterior_mean_coef1", betas * torch.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod))
        register_buffer(
            "posterior_mean_coef2", (1.0 - alphas_cumprod_prev) * torch.sqrt(alphas) / (1.0 - alphas_cumprod)
        )

        self.text_use_bert_cls = text_use_bert_cls
        self.use_dynamic_thres = use_dynamic_thres
        self.dynamic_thres_percentile = dynamic_thres_percentile
        self.text_encoder = text_encoder

    # ------------------------------------------------------------ text ----

    @property
    def text_encoder(self) -> TextEncoder | None:
        return self.__dict__.get("_text_encoder")

    @text_encoder.setter
    def text_encoder(self, encoder: TextEncoder | None) -> None:
        null = getattr(self.denoise_fn, "null_cond_emb", None)
        if encoder is not None and isinstance(null, torch.Tensor) and null.shape[-1] != encoder.dim:
            raise ValueError(
                f"text encoder {encoder.path} embeds to {encoder.dim} dims but the denoiser's cond_dim is "
                f"{null.shape[-1]}: build the Unet3D with cond_dim={encoder.dim}"
            )
        self.__dict__["_text_encoder"] = encoder  # not a submodule: no state-dict keys

    def embed_text(self, cond, device: torch.device | None = None):
        """Captions -> embeddings through the attached encoder; tensors and None pass through."""
        if not is_list_str(cond):
            return cond
        if self.text_encoder is None:
            raise ValueError("cond is a list of captions but no text encoder is attached (text_encoder=...)")
        device = device if device is not None else self.betas.device
        # a text_standardize model's caption map (identity for any other): cond lives in the mapped space
        return standardize_for(self.denoise_fn, self.text_encoder(cond, return_cls_repr=self.text_use_bert_cls,
                                                                  device=device))

    def text_inputs(self, cond, text_tokens=None, text_mask=None, device: torch.device | None = None):
        """``cond`` (captions, an embedding or None) and token inputs -> ``(cond, text_kw)`` for the denoiser.

        Captions go through the attached encoder: a denoiser with ``text_cross_attention`` gets the pooled vector
        as ``cond`` and ``text_kw = {"text_tokens", "text_mask"}`` (``TextEncoder.encode``); any other the pooled
        vector alone (:meth:`embed_text`). Tensors pass through; ``text_kw`` holds the token inputs given.
        """
        device = device if device is not None else self.betas.device
        if is_list_str(cond) and getattr(self.denoise_fn, "text_cross_attention", False):
            if text_tokens is not None or text_mask is not None:
                raise ValueError("captions give their own text_tokens/text_mask: pass embeddings with them instead")
            if self.text_encoder is None:
                raise ValueError("cond is a list of captions but no text encoder is attached (text_encoder=...)")
            cond, text_tokens, text_mask = self.text_encoder.encode(
                cond, self.denoise_fn.text_max_tokens, return_cls_repr=self.text_use_bert_cls, device=device)
            cond = standardize_for(self.denoise_fn, cond)
        else:
            cond = self.embed_text(cond, device)
        given = (("text_tokens", text_tokens), ("text_mask", text_mask))
        return cond, {k: torch.as_tensor(v).to(device) for k, v in given if v is not None}

    # ------------------------------------------------- forward process ----

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        if noise is None:
            noise = _randn(x_start.shape, x_start.device, x_start.dtype, generator)
        return (
            extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def replace_known(self, x: torch.Tensor, frames: torch.Tensor, mask: torch.Tensor, t: torch.Tensor,
                      noise: torch.Tensor) -> torch.Tensor:
        """``x`` with its known frames (``mask``: ``(b, f)`` or ``(b, 1, f, 1, 1)``, nonzero = known) replaced by
        ``q(x_t | frames)`` drawn with ``noise``: the replacement step of conditioned sampling, shared by
        ``p_sample_loop`` and the torch reference of ``vdeploy parity --known`` (the runtime's draw order)."""
        return torch.where(_known(mask, x.shape), self.q_sample(frames, t, noise=noise), x)

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_0 = sqrt(1 / abar_t) x_t - sqrt(1 / abar_t - 1) eps."""
        return (
            extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise
        )

    def predict_start_from_output(self, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """x_0 from the denoiser's output: eps (``predict_start_from_noise``) or v: x_0 = sqrt(abar_t) x_t -
        sqrt(1 - abar_t) v."""
        if self.prediction_type == "eps":
            return self.predict_start_from_noise(x_t, t, output)
        return (extract(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
                - extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * output)

    def training_target(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the denoiser learns to predict: eps, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
        if self.prediction_type == "eps":
            return noise
        return (extract(self.sqrt_alphas_cumprod, t, x_start.shape) * noise
                - extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * x_start)

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss weights ``(b,)`` of ``"min_snr"`` (None for ``"none"``): min(snr, gamma) / snr for eps,
        min(snr, gamma) / (snr + 1) for v (Hang et al. 2023, both the same weight on the x_0 error)."""
        if self.loss_weighting == "none":
            return None
        abar = self.alphas_cumprod.double()[t]
        snr = abar / (1 - abar)
        clipped = snr.clamp(max=self.min_snr_gamma)
        w = clipped / snr if self.prediction_type == "eps" else clipped / (snr + 1)
        return w.float()

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        posterior_mean = (
            extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        posterior_variance = extract(self.posterior_variance, t, x_t.shape)
        posterior_log_variance_clipped = extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return posterior_mean, posterior_variance, posterior_log_variance_clipped

    # ------------------------------------------------- reverse process ----

    def p_mean_variance(self, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool, cond=None, cond_scale: float = 1.0,
                        frames: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                        text_tokens: torch.Tensor | None = None, text_mask: torch.Tensor | None = None):
        """Mean and variance of p(x_{t-1} | x_t) with x_0 predicted from eps and thresholded.

        Static thresholding clamps x_0 to [-1, 1]; dynamic (Imagen) clamps to [-s, s] and divides
        by s, s = max(1, the ``dynamic_thres_percentile`` quantile of |x_0| per sample).
        ``frames`` (model space [-1, 1], ``(b, c, f, h, w)``) and ``mask`` (``(b, f)``, 1 = known) go to a
        frame-conditioned denoiser; ``text_tokens`` and ``text_mask`` to one with ``text_cross_attention``.
        """
        frame_kw = {} if frames is None and mask is None else {"frames": frames, "mask": mask}
        if text_tokens is not None or text_mask is not None:
            frame_kw.update(text_tokens=text_tokens, text_mask=text_mask)
        output = self.denoise_fn.forward_with_cond_scale(x, t, cond=cond, cond_scale=cond_scale, **frame_kw)
        x_recon = self.predict_start_from_output(x, t, output)
        if clip_denoised:
            s = 1.0
            if self.use_dynamic_thres:
                s = torch.quantile(x_recon.flatten(1).abs(), self.dynamic_thres_percentile, dim=-1)
                s.clamp_(min=1.0)
                s = s.view(-1, *((1,) * (x_recon.ndim - 1)))
            x_recon = x_recon.clamp(-s, s) / s
        return self.q_posterior(x_start=x_recon, x_t=x, t=t)

    @torch.inference_mode()
    def p_sample(self, x: torch.Tensor, t: torch.Tensor, cond=None, cond_scale: float = 1.0, clip_denoised: bool = True,
                 *, noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 frames: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                 text_tokens: torch.Tensor | None = None, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One ancestral step x_t -> x_{t-1} = mean + exp(log_var / 2) * z, z = 0 where t == 0.

        ``noise`` is z; drawn (from ``generator`` or torch's global RNG) when not given.
        With ``frames`` (model space [-1, 1]) and ``mask`` (``(b, f)``, 1 = known) for a frame-conditioned
        denoiser: the denoiser sees them, and the known frames of x_{t-1} are q(x_{t-1} | frames) drawn with
        the same z, ``sqrt(abar_{t-1}) frames + sqrt(1 - abar_{t-1}) z`` (the frames themselves after t = 0).
        ``text_tokens``/``text_mask``: a ``text_cross_attention`` denoiser's token inputs (:meth:`forward`'s).
        """
        b = x.shape[0]
        model_mean, _, model_log_variance = self.p_mean_variance(
            x=x, t=t, clip_denoised=clip_denoised, cond=cond, cond_scale=cond_scale, frames=frames, mask=mask,
            text_tokens=text_tokens, text_mask=text_mask,
        )
        if noise is None:
            noise = _randn(x.shape, x.device, x.dtype, generator)
        nonzero_mask = (1 - (t == 0).float()).reshape(b, *((1,) * (x.ndim - 1)))
        out = model_mean + nonzero_mask * (0.5 * model_log_variance).exp() * noise
        if frames is not None:
            # abar_{t-1}: alphas_cumprod_prev[t], 1 at t = 0 (so the known frames come out exact)
            abar_prev = extract(self.alphas_cumprod_prev, t, x.shape)
            known = abar_prev.sqrt() * frames + (1 - abar_prev).sqrt() * nonzero_mask * noise
            out = torch.where(_known(mask, x.shape), known, out)
        return out

    @torch.inference_mode()
    def p_sample_loop(
        self,
        shape: tuple[int, ...],
        cond=None,
        cond_scale: float = 1.0,
        *,
        generator: torch.Generator | None = None,
        noise: Iterable[torch.Tensor] | None = None,
        callback: StepCallback | None = None,
        progress: bool = True,
        frames: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """DDPM ancestral sampling over all T steps; returns the video in [0, 1].

        Args:
            shape: ``(batch, channels, frames, height, width)``.
            cond: conditioning embedding ``(batch, cond_dim)`` (or captions, see :meth:`embed_text`).
            cond_scale: classifier-free guidance scale (1 = off).
            generator: the source of all random draws (default: torch's global RNG, drawing
                exactly what the seed draws).
            noise: instead of drawing: an iterable yielding x_T first, then one tensor per step
                in loop order (T + 1 tensors in all; the last, for t=0, is masked out).
            callback: ``callback(i, t, x)`` after each step, ``x`` the new sample in [-1, 1].
            progress: show a tqdm bar.
            frames: known frames for a frame-conditioned denoiser, ``shape`` videos in [0, 1] (values at
                unknown frames are ignored); they reach the denoiser at every step, the sample's known
                frames are kept at q(x_t | frames) (drawn with x_T and each step's noise: no extra draws),
                and the result holds them unchanged.
            mask: ``(batch, frames)`` float or bool, 1 where ``frames`` is known; required with ``frames``.
            text_tokens, text_mask: with an embedding ``cond``, a ``text_cross_attention`` denoiser's token inputs
                ``(batch, text_max_tokens, cond_dim)`` and ``(batch, text_max_tokens)`` (captions give their own).
        """
        if generator is not None and noise is not None:
            raise ValueError("pass either generator or noise, not both")
        device = self.betas.device
        cond, text_kw = self.text_inputs(cond, text_tokens, text_mask, device)
        given = None
        if frames is not None or mask is not None:
            given, frames, mask = self._check_frames(frames, mask, shape, device)
        noise_iter = _NoiseStream(noise, shape, device) if noise is not None else None
        b = shape[0]
        img = noise_iter.next("x_T") if noise_iter else _randn(shape, device, torch.float32, generator)
        if frames is not None:  # the first call's known frames: q(x_{T-1} | frames) with x_T's draw
            t_first = torch.full((b,), self.num_timesteps - 1, device=device, dtype=torch.long)
            img = self.replace_known(img, frames, mask, t_first, noise=img)
        steps = reversed(range(0, self.num_timesteps))
        bar = tqdm(steps, desc="sampling loop time step", total=self.num_timesteps, disable=not progress, leave=False)
        for i, t in enumerate(bar):
            z = noise_iter.next(f"step {i} (t={t})") if noise_iter else None
            img = self.p_sample(img, torch.full((b,), t, device=device, dtype=torch.long), cond=cond,
                                cond_scale=cond_scale, noise=z, generator=generator, frames=frames, mask=mask, **text_kw)
            if callback is not None:
                callback(i, t, img)
        video = unnormalize_img(img)
        if given is not None:  # exactly the given frames, not their round trip through [-1, 1]
            video = torch.where(_known(mask, shape), given, video)
        return video

    def _check_frames(self, frames, mask, shape, device):
        """Validate ``sample``'s known frames: ``(frames in [0, 1], frames in [-1, 1], mask)`` on ``device``."""
        if not getattr(self.denoise_fn, "frame_conditioning", False):
            raise ValueError("frames/mask need a denoiser built with frame_conditioning=True (config "
                             "'frame_conditioning': true, trained so); this one is not")
        if frames is None or mask is None:
            raise ValueError("pass frames and mask together (the mask says which frames are known)")
        frames, mask = torch.as_tensor(frames), torch.as_tensor(mask)
        if tuple(frames.shape) != tuple(shape):
            raise ValueError(f"frames must have the sample's shape {tuple(shape)} (values at unknown frames are "
                             f"ignored), got {tuple(frames.shape)}")
        if tuple(mask.shape) != tuple(shape[:1]) + tuple(shape[2:3]):
            raise ValueError(f"mask must have shape (batch, frames) = {(shape[0], shape[2])}, got {tuple(mask.shape)}")
        given = frames.to(device=device, dtype=torch.float32)
        return given, normalize_img(given), mask.to(device=device, dtype=torch.float32)

    @torch.inference_mode()
    def sample(
        self,
        cond=None,
        cond_scale: float = 1.0,
        batch_size: int = 16,
        *,
        generator: torch.Generator | None = None,
        noise: Iterable[torch.Tensor] | None = None,
        callback: StepCallback | None = None,
        progress: bool = True,
        frames: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sample ``(batch, channels, num_frames, image_size, image_size)`` videos in [0, 1].

        ``cond`` (an embedding or, with a text encoder attached, a list of captions) fixes the
        batch size, and so do ``frames`` (known frames, videos in [0, 1]) with their ``mask``
        ``(batch, num_frames)``; the keyword arguments are those of :meth:`p_sample_loop`.
        """
        device = next(self.denoise_fn.parameters()).device
        cond, text_kw = self.text_inputs(cond, text_tokens, text_mask, device)
        batch_size = cond.shape[0] if cond is not None else frames.shape[0] if frames is not None else batch_size
        shape = (batch_size, self.channels, self.num_frames, self.image_size, self.image_size)
        return self.p_sample_loop(shape, cond=cond, cond_scale=cond_scale, generator=generator, noise=noise,
                                  callback=callback, progress=progress, frames=frames, mask=mask, **text_kw)

    @torch.inference_mode()
    def interpolate(self, x1: torch.Tensor, x2: torch.Tensor, t: int | None = None, lam: float = 0.5, *,
                    cond=None, cond_scale: float = 1.0, generator: torch.Generator | None = None,
                    progress: bool = True, text_tokens: torch.Tensor | None = None,
                    text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Noise ``x1`` and ``x2`` (model space) to step ``t``, mix them by ``lam`` and denoise back.

        Returns the result in model space [-1, 1], as the seed does.
        """
        if x1.shape != x2.shape:
            raise ValueError(f"x1 and x2 must have the same shape, got {tuple(x1.shape)} and {tuple(x2.shape)}")
        b, device = x1.shape[0], x1.device
        t = self.num_timesteps - 1 if t is None else t
        t_batched = torch.full((b,), t, device=device, dtype=torch.long)
        xt1, xt2 = (self.q_sample(x, t=t_batched, generator=generator) for x in (x1, x2))
        img = (1 - lam) * xt1 + lam * xt2
        cond, text_kw = self.text_inputs(cond, text_tokens, text_mask, device)
        for i in tqdm(reversed(range(0, t)), desc="interpolation sample time step", total=t, disable=not progress,
                      leave=False):
            img = self.p_sample(img, torch.full((b,), i, device=device, dtype=torch.long), cond=cond,
                                cond_scale=cond_scale, generator=generator, **text_kw)
        return img

    # ------------------------------------------------------------ loss ----

    def p_losses(self, x_start: torch.Tensor, t: torch.Tensor, cond=None, noise: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """The denoising loss (l1 or l2) between the target (the noise, or v) and the denoiser's prediction,
        per sample weighted by ``loss_weights`` when ``loss_weighting`` is ``"min_snr"``.

        Args:
            x_start: clean videos in model space [-1, 1].
            t: ``(b,)`` long diffusion steps.
            cond: conditioning embeddings (or captions, see :meth:`embed_text`).
            noise: the noise (drawn with torch's global RNG when None).
            mask: ``(b, f)``, 1 = known frame, for a frame-conditioned denoiser (MCVD): it gets
                ``frames=x_start, mask=mask``, and the loss is the mean over the unknown frames only
                (a row without known frames is plain generation; known frames add nothing).
            **kwargs: to the denoiser (``null_cond_prob``, ``focus_present_mask``, ``text_tokens``, ``text_mask``,
                ...).
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        cond, text_kw = self.text_inputs(cond, kwargs.pop("text_tokens", None), kwargs.pop("text_mask", None),
                                         x_start.device)
        kwargs.update(text_kw)
        target = self.training_target(x_start, t, noise)
        weights = self.loss_weights(t)
        if mask is None:
            x_recon = self.denoise_fn(x_noisy, t, cond=cond, **kwargs)
            if weights is None:  # the seed's loss, exactly
                if self.loss_type == "l1":
                    return F.l1_loss(target, x_recon)
                return F.mse_loss(target, x_recon)
            err = (target - x_recon).abs() if self.loss_type == "l1" else (target - x_recon) ** 2
            return (err.flatten(1).mean(1) * weights).mean()
        x_recon = self.denoise_fn(x_noisy, t, cond=cond, frames=x_start, mask=mask, **kwargs)
        err = (target - x_recon).abs() if self.loss_type == "l1" else (target - x_recon) ** 2
        b, c, f, h, w = err.shape
        unknown = 1 - mask.to(err.dtype).reshape(b, 1, f, 1, 1)
        if weights is not None:
            unknown = unknown * weights.reshape(b, 1, 1, 1, 1)
        # the (weighted) mean over the unknown frames' elements; all frames known (nothing to learn): 0
        count = ((1 - mask.to(err.dtype)).sum() * (c * h * w)).clamp(min=1)
        return (err * unknown).sum() / count

    def forward(self, x: torch.Tensor, *args, t: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Training loss for videos ``x`` in [0, 1], shape ``(b, channels, num_frames, image_size, image_size)``.

        Draws t uniformly (torch's global RNG, as the seed) unless ``t`` (``(b,)`` long) is given,
        normalizes to [-1, 1] and calls :meth:`p_losses` (``noise``, ``cond``, ``mask``, ``null_cond_prob``,
        ``focus_present_mask``, ``prob_focus_present`` pass through).
        """
        expected = (self.channels, self.num_frames, self.image_size, self.image_size)
        if x.ndim != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"expected videos of shape (batch, {', '.join(map(str, expected))}) "
                f"(channels, frames, height, width), got {tuple(x.shape)}"
            )
        b, device = x.shape[0], x.device
        if t is None:
            t = torch.randint(0, self.num_timesteps, (b,), device=device).long()
        x = normalize_img(x)
        return self.p_losses(x, t, *args, **kwargs)


def _known(mask: torch.Tensor, shape) -> torch.Tensor:
    """A ``(b, f)`` known-frame mask as bool ``(b, 1, f, 1, 1)``, to select frames of ``shape`` videos."""
    return (mask != 0).reshape(shape[0], 1, shape[2], 1, 1)


def _randn(shape, device: torch.device, dtype: torch.dtype, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise from ``generator`` (on its own device, then moved) or the global RNG."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, device=generator.device, dtype=dtype, generator=generator).to(device)


class _NoiseStream:
    """Explicit noise for :meth:`GaussianDiffusion.p_sample_loop`: checks shape, moves to the device."""

    def __init__(self, noise: Iterable[torch.Tensor], shape: tuple[int, ...], device: torch.device):
        self._it: Iterator = iter(noise)
        self.shape = tuple(shape)
        self.device = device

    def next(self, what: str) -> torch.Tensor:
        try:
            z = next(self._it)
        except StopIteration:
            raise ValueError(f"explicit noise ran out at {what}: it must yield x_T and then one tensor per "
                             "step") from None
        z = torch.as_tensor(z)
        if tuple(z.shape) != self.shape:
            raise ValueError(f"explicit noise for {what} has shape {tuple(z.shape)}, expected {self.shape}")
        return z.to(device=self.device, dtype=torch.float32)
