"""Noise schedules in numpy: the seed's cosine betas, the buffers derived from them, and respacing.

Everything is computed in float64, as the seed computes it; tables that the samplers index are then
cast to float32, as the seed stores its buffers (``register_buffer(..., val.to(torch.float32))``).
"""

from __future__ import annotations

import numpy as np

SPACINGS = ("trailing", "leading", "linspace", "logsnr")


def cosine_beta_schedule(timesteps: int, s: float = 0.008) -> np.ndarray:
    """The cosine schedule of Nichol & Dhariwal 2021 exactly as the seed computes it (float64, clip 0.9999)."""
    steps = timesteps + 1
    x = np.linspace(0, timesteps, steps, dtype=np.float64)
    alphas_cumprod = np.cos(((x / timesteps) + s) / (1 + s) * np.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1 - (alphas_cumprod[1:] / alphas_cumprod[:-1])
    return np.clip(betas, 0, 0.9999)


def betas_from_spec(schedule: dict) -> np.ndarray:
    """The float64 betas of a manifest's ``schedule`` entry.

    The stored ``betas`` are used. When they are the cosine schedule that ``name``/``timesteps``/``s``
    describe, only rounded (e.g. written from the seed's float32 buffer), the exact float64 values are
    returned instead, since those are what the seed derives its tables from.

    Raises:
        ValueError: no betas for a schedule other than cosine, a length other than ``timesteps``,
            or values outside [0, 1).
    """
    timesteps = schedule.get("timesteps")
    name = schedule.get("name", "cosine")
    stored = schedule.get("betas")
    reference = None
    if name == "cosine" and isinstance(timesteps, int) and timesteps > 0:
        reference = cosine_beta_schedule(timesteps, schedule.get("s", 0.008))
    if stored is None:
        if reference is None:
            raise ValueError(f"schedule {name!r} has no betas and is not a cosine schedule with 'timesteps'")
        return reference
    try:
        betas = np.asarray(stored, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError("schedule betas are not a list of numbers") from None
    if betas.ndim != 1 or not len(betas):
        raise ValueError(f"schedule betas must be a non-empty list, got shape {betas.shape}")
    if timesteps is not None and len(betas) != timesteps:
        raise ValueError(f"schedule has {len(betas)} betas but timesteps={timesteps}")
    if not np.all(np.isfinite(betas)) or betas.min() < 0 or betas.max() >= 1:
        raise ValueError("schedule betas must lie in [0, 1)")
    if reference is not None and np.allclose(betas, reference, rtol=1e-6, atol=1e-9):
        return reference
    return betas


def seed_buffers(betas: np.ndarray) -> dict[str, np.ndarray]:
    """The seed's ``GaussianDiffusion`` buffers, by the seed's names: float64 maths, float32 results."""
    betas = np.asarray(betas, dtype=np.float64)
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.concatenate([[1.0], alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    buffers = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    }
    return {name: value.astype(np.float32) for name, value in buffers.items()}


def log_snr(betas: np.ndarray) -> np.ndarray:
    """The log signal-to-noise ratio of every training timestep, ``lambda_t = log(abar_t / (1 - abar_t))``
    (float64, non-increasing in t)."""
    abar = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    with np.errstate(divide="ignore"):
        return np.log(abar) - np.log1p(-abar)


def respace(num_timesteps: int, steps: int, spacing: str = "trailing", *, betas: np.ndarray | None = None) -> np.ndarray:
    """``steps`` distinct timesteps of the ``num_timesteps`` training timesteps, descending, as int64.

    ``trailing``, ``leading`` and ``linspace`` are the spacings of Lin et al. 2023 ("Common Diffusion Noise
    Schedules and Sample Steps are Flawed", Table 2), computed as diffusers' ``DDIMScheduler`` computes them
    (``steps_offset=0``):

    - ``trailing`` (default): ``round(T - i * T / steps) - 1``; starts at ``T - 1``, where the sampler's
      pure-noise start belongs.
    - ``leading``: ``i * (T // steps)``; ends at 0.
    - ``linspace``: ``round(linspace(0, T - 1, steps))``.
    - ``logsnr`` (needs ``betas``): uniform in log-SNR, the spacing DPM-Solver proposes (Lu et al. 2022):
      targets ``lambda*_k`` evenly from ``lambda(T - 1)`` to ``lambda(0)`` (``log_snr``), each mapped to the
      training timestep nearest in lambda (a tie goes to the noisier one). Where lambda jumps further
      between two adjacent timesteps than between targets, several targets share a timestep (the seed's
      cosine schedule: its last beta is clipped to 0.9999, so lambda(999) = -22.1 but lambda(998) = -12.9);
      then, from the noisy end, ``t_0 = T - 1`` and ``t_k = max(min(nearest_k, t_{k-1} - 1), steps - 1 - k)``:
      a target whose nearest timestep is taken gets the next smaller free one, and the lower bound leaves
      room for the rest, so any ``steps <= T`` gives distinct timesteps. Where no targets share one, these
      are diffusers' ``DPMSolverMultistepScheduler(use_lu_lambdas=True)`` timesteps.

    Raises:
        ValueError: ``steps`` outside ``[1, num_timesteps]`` (no distinct timesteps), an unknown spacing,
            or ``logsnr`` without ``num_timesteps`` betas.
    """
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be an integer in [1, {num_timesteps}], got {steps!r}")
    if spacing == "trailing":
        timesteps = np.round(num_timesteps - np.arange(steps) * (num_timesteps / steps)) - 1
    elif spacing == "leading":
        timesteps = (np.arange(steps) * (num_timesteps // steps))[::-1]
    elif spacing == "linspace":
        timesteps = np.round(np.linspace(0, num_timesteps - 1, steps))[::-1]
    elif spacing == "logsnr":
        timesteps = _logsnr_timesteps(num_timesteps, steps, betas)
    else:
        raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")
    timesteps = timesteps.astype(np.int64)
    if len(np.unique(timesteps)) != steps:
        raise ValueError(f"{steps} steps of {num_timesteps} with {spacing!r} spacing repeat a timestep")
    return timesteps


def _logsnr_timesteps(T: int, steps: int, betas) -> np.ndarray:
    """``respace``'s ``logsnr`` rule."""
    if betas is None:
        raise ValueError("spacing 'logsnr' needs the betas: respace(T, steps, 'logsnr', betas=betas)")
    lam = log_snr(betas)
    if lam.shape != (T,):
        raise ValueError(f"spacing 'logsnr' needs {T} betas, got shape {np.shape(betas)}")
    t = np.full(steps, T - 1, dtype=np.int64)
    if steps == 1:
        return t
    targets = np.linspace(lam[T - 1], lam[0], steps)
    ascending = lam[::-1]  # ascending[u] = lambda(T - 1 - u)
    hi = np.clip(np.searchsorted(ascending, targets), 1, T - 1)
    lo = hi - 1
    nearest = T - 1 - np.where(targets - ascending[lo] <= ascending[hi] - targets, lo, hi)
    for k in range(1, steps):
        t[k] = max(min(nearest[k], t[k - 1] - 1), steps - 1 - k)
    return t


def respaced_betas(betas: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """Betas of the chain that visits only ``timesteps`` (Nichol & Dhariwal 2021, section 4).

    ``timesteps`` in either order; the result is over them in ascending order, with
    ``1 - beta'_i = alphas_cumprod[t_i] / alphas_cumprod[t_{i-1}]`` so that the kept steps keep their
    ``alphas_cumprod``.
    """
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    kept = alphas_cumprod[np.sort(np.asarray(timesteps))]
    return 1.0 - kept / np.concatenate([[1.0], kept[:-1]])
