"""Samplers as pure functions over one denoiser contract, k-diffusion style, each also a step machine; numpy is
the reference, and the same code runs on any array-API namespace (CuPy on a GPU: ``steps.array_namespace``).

The contract: ``eps = denoise(x, t, cond)`` with ``x`` float32 ``(b, c, f, h, w)``, ``t`` int64 ``(b,)``
(training timesteps, also for respaced samplers), ``cond`` float32 ``(b, D)`` or None; ``eps`` the
predicted noise, shaped like ``x``. A model trained with frame conditioning takes two more per-row inputs by
keyword, ``denoise(x, t, cond, frames=..., mask=...)`` (``vdeploy.runtime.frame_conditioning.conditioned_steps``
with ``trained=True``); a denoiser called without them samples plain generation. Every sampler returns the
final x0 estimate (in [-1, 1] when the denoised prediction is clipped) as float32.

Each sampler computes its per-step coefficients once, in float64, and casts them to float32 tables;
the loop only indexes them (host tables; a step's coefficients enter the arithmetic as Python floats, so a
starting sample ``x`` of another namespace keeps the whole run there: latent, history, clipping, guidance, noise
uploads, all with the numpy run's float32 operations). Randomness comes from explicit ``noise`` (an iterable of
arrays, one per step, in loop order) or an injected ``numpy.random.Generator``. ``callback`` gets, after every step,
``{"i": step index, "t": timestep, "x": the sample after the step, "x0": the denoised prediction,
"eps": the denoiser output}``.

Step machines. Every sampler ``name`` has a resumable form ``name_steps(x, betas, *, ...)``: the same
arguments less ``denoise``. Calling it checks them and precomputes the tables (bad arguments raise
there, before any step) and returns a generator, the machine, that speaks this protocol:

- it yields a ``StepRequest(x, t, cond, i, inputs)``: "evaluate the denoiser at ``x`` (float32 ``(b, c, f,
  h, w)``), ``t`` (int64 ``(b,)``), ``cond`` (float32 ``(b, D)``, or None) and ``inputs`` (None, or the
  frame-conditioned graph's per-row ``{"frames", "mask"}``)"; ``i`` is the step index, 0, 1, ..., steps - 1.
  Start it with ``next(machine)`` (or ``machine.send(None)``);
- it receives that ``eps`` (any array-like shaped like ``x``; cast to float32) by ``machine.send(eps)``,
  which advances one step, calls ``callback`` and answers with the next request;
- after the last step ``send`` raises ``StopIteration`` whose ``value`` is the final x0 (float32).

The machinery (``StepRequest``, ``drive``, ``step_loop``, ``to_eps_x0``, ``clip_x0``, guidance, noise sources)
lives in ``vdeploy.runtime.steps``, imported here; this module holds the samplers, their single steps and the
``SAMPLERS`` table. ``drive(machine, denoise)`` runs one machine with one denoiser call per request; each pure function
is exactly ``drive(name_steps(...), denoise)``. The machine never calls the denoiser, so a driver may
gather the requests of many machines (different samplers, steps or timesteps; same ``(c, f, h, w)``)
into one call, concatenating their ``x``, ``t``, ``cond`` and ``inputs`` along the batch, and send each
machine its rows of the output. A machine keeps all its state (sample, multistep history, noise source, tables)
local, assumes nothing about its driver, and copies nothing: it never writes into an array it was
given or has yielded (the starting noise, ``cond``, a request's ``x``, a received ``eps``, which may be
a view into a batched output), so requests and callback arrays stay valid after later steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from .schedule import SPACINGS, respace, respaced_betas, seed_buffers
from .steps import (Denoise, Machine, StepRequest, array_namespace, check_order, clip_x0, coefficient,  # noqa: F401
                    drive, guided, noise_source, start, step_loop, to_eps_x0)
from .unipc_multistep import VARIANTS, unipc, unipc_steps

f32 = lambda v: np.asarray(v, dtype=np.float32)  # noqa: E731


# ------------------------------------------------- the single steps ----
# One step of each single-step sampler as plain arithmetic on arrays, given its float32 coefficients: the step
# machines index their precomputed tables into it, and the RePaint redo (``frame_conditioning``) calls it
# between any two training levels with ``level_coefficients``.


def ddpm_step(x, output, c: Mapping, z, *, clip_denoised=True, dynamic_thres_percentile=None,
              prediction_type="eps"):
    """Ancestral DDPM: ``x_s ~ q(x_s | x_t, x0) = N(coef1 x0 + coef2 x_t, std^2)`` (Ho et al. 2020); ``z`` None:
    the mean (t = 0). ``c``: ``recip``, ``recipm1``, ``coef1``, ``coef2``, ``std``. Returns ``(x_s, x0, eps)``."""
    xp = array_namespace(x)
    c = {k: coefficient(v, xp) for k, v in c.items()}
    eps, x0 = to_eps_x0(output, x, c["recip"], c["recipm1"], prediction_type)
    if clip_denoised:
        x0 = clip_x0(x0, dynamic_thres_percentile)
    mean = c["coef1"] * x0 + c["coef2"] * x
    return (mean + c["std"] * z if z is not None else mean), x0, eps


def ddim_step(x, output, c: Mapping, z, *, clip_denoised=True, dynamic_thres_percentile=None,
              prediction_type="eps"):
    """DDIM (Song et al. 2021, eq. 12); a clipped x0 re-derives eps; ``z`` None: no noise (eta = 0). ``c``:
    ``recip``, ``recipm1``, ``eps_from_x``, ``eps_from_x0``, ``sqrt_a_prev``, ``dir_coef``, ``sigma``."""
    xp = array_namespace(x)
    c = {k: coefficient(v, xp) for k, v in c.items()}
    # "predicted x0" = (x_t - sqrt(1 - alpha_t) eps) / sqrt(alpha_t)
    eps, x0 = to_eps_x0(output, x, c["recip"], c["recipm1"], prediction_type)
    if clip_denoised:
        x0 = clip_x0(x0, dynamic_thres_percentile)
        eps = c["eps_from_x"] * x - c["eps_from_x0"] * x0
    # x_{t-1} = sqrt(alpha_{t-1}) x0 + sqrt(1 - alpha_{t-1} - sigma_t^2) eps + sigma_t z
    x = c["sqrt_a_prev"] * x0 + c["dir_coef"] * eps
    if z is not None:
        x += c["sigma"] * z  # x is this step's new array
    return x, x0, eps


def _ddpm_coefficients(a_t, a_s) -> dict:
    """ddpm's step coefficients from level ``abar_t`` to ``abar_s`` (float64 in, float32 out; the respaced
    chain's posterior, whose beta is ``1 - abar_t / abar_s``)."""
    beta = 1 - a_t / a_s
    return {"recip": f32(np.sqrt(1 / a_t)), "recipm1": f32(np.sqrt(1 / a_t - 1)),
            "coef1": f32(beta * np.sqrt(a_s) / (1 - a_t)), "coef2": f32((1 - a_s) * np.sqrt(1 - beta) / (1 - a_t)),
            "std": f32(np.sqrt(beta * (1 - a_s) / (1 - a_t)))}


def _ddim_coefficients(a_t, a_prev, eta) -> dict:
    """ddim's step coefficients from ``abar_t`` to ``abar_prev`` (paper notation: alpha_t is the cumulative
    product, sigma_t its eq. 16); float64 in, float32 out."""
    sigma = eta * np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    return {"recip": f32(np.sqrt(1 / a_t)), "recipm1": f32(np.sqrt(1 / a_t - 1)),
            "eps_from_x": f32(1 / np.sqrt(1 - a_t)), "eps_from_x0": f32(np.sqrt(a_t / (1 - a_t))),
            "sqrt_a_prev": f32(np.sqrt(a_prev)), "sigma": f32(sigma),
            "dir_coef": f32(np.sqrt(np.maximum(1 - a_prev - sigma**2, 0)))}  # eta > 1 would make it negative


def ddpm_level_step(x, output, a_t, a_s, draw, *, clip_denoised=True, dynamic_thres_percentile=None,
                    prediction_type="eps", **_):
    """``ddpm_step`` from training level ``abar_t`` to ``abar_s`` (per-row float64 arrays), noise from ``draw()``."""
    return ddpm_step(x, output, _ddpm_coefficients(a_t, a_s), draw(), clip_denoised=clip_denoised,
                     dynamic_thres_percentile=dynamic_thres_percentile, prediction_type=prediction_type)[0]


def ddim_level_step(x, output, a_t, a_s, draw, *, eta=0.0, clip_denoised=True, dynamic_thres_percentile=None,
                    prediction_type="eps", **_):
    """``ddim_step`` from training level ``abar_t`` to ``abar_s``; noise from ``draw()`` when ``eta > 0``."""
    return ddim_step(x, output, _ddim_coefficients(a_t, a_s, eta), draw() if eta > 0 else None,
                     clip_denoised=clip_denoised, dynamic_thres_percentile=dynamic_thres_percentile,
                     prediction_type=prediction_type)[0]


# ------------------------------------------------- the step machines ----


def ddpm_steps(
    x: np.ndarray,
    betas: np.ndarray,
    *,
    cond: np.ndarray | None = None,
    steps: int | None = None,
    spacing: str = "trailing",
    noise: Iterable[np.ndarray] | None = None,
    rng: np.random.Generator | None = None,
    clip_denoised: bool = True,
    dynamic_thres_percentile: float | None = None,
    prediction_type: str = "eps",
    callback: Callable[[dict], None] | None = None,
) -> Machine:
    """``ddpm`` as a step machine (see the module docstring)."""
    x, betas, cond = start(x, betas, cond)
    T = len(betas)
    if steps is None or steps == T:
        timesteps = np.arange(T - 1, -1, -1, dtype=np.int64)
    else:
        timesteps = respace(T, steps, spacing, betas=betas)
        betas = respaced_betas(betas, timesteps)
    tab = seed_buffers(betas)
    # q(x_{t-1} | x_t, x0) = N(coef1 * x0 + coef2 * x_t, exp(logvar)); x0 = sqrt(1/a_t) x_t - sqrt(1/a_t - 1) eps;
    # the tables run in the machine's step order (the chain's, reversed)
    coefs = {"recip": tab["sqrt_recip_alphas_cumprod"][::-1], "recipm1": tab["sqrt_recipm1_alphas_cumprod"][::-1],
             "coef1": tab["posterior_mean_coef1"][::-1], "coef2": tab["posterior_mean_coef2"][::-1],
             "std": np.exp(np.float32(0.5) * tab["posterior_log_variance_clipped"])[::-1]}
    draw = noise_source(noise, rng, x.shape, "ddpm", array_namespace(x))
    last = len(timesteps) - 1
    kw = {"clip_denoised": clip_denoised, "dynamic_thres_percentile": dynamic_thres_percentile,
          "prediction_type": prediction_type}

    def update(i, x, eps):
        z = draw(i)  # drawn at every step, the last too, as the seed draws it
        return ddpm_step(x, eps, {k: v[i] for k, v in coefs.items()}, z if i < last else None, **kw)  # t = 0: mean

    return step_loop(x, cond, timesteps, update, callback)


def ddpm(denoise: Denoise, x: np.ndarray, betas: np.ndarray, **kwargs) -> np.ndarray:
    """Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2), upstream's ``p_sample_loop`` step for step.

    Args:
        denoise: ``eps = denoise(x, t, cond)``.
        x: the starting noise x_T, float32 ``(b, c, f, h, w)``.
        betas: the float64 training betas (length T).
        cond: conditioning ``(b, D)`` passed to every call, or None.
        steps: None runs all T steps as the seed does; fewer run DDPM on the respaced chain
            (Nichol & Dhariwal 2021) over ``respace(T, steps, spacing, betas=betas)``.
        spacing: ``"trailing"`` (default), ``"leading"``, ``"linspace"`` or ``"logsnr"`` (see ``respace``).
        noise: one array per step, in loop order; the seed draws one at every step, including the
            last, where it is masked. Give the noise PyTorch drew to reproduce its run.
        rng: the generator drawing that noise when ``noise`` is None.
        clip_denoised: clamp the predicted x0 (upstream's default, True).
        dynamic_thres_percentile: upstream's dynamic thresholding when not None (with clipping).
        callback: called after every step with ``{"i", "t", "x", "x0", "eps"}``.

    Returns:
        The final sample x_0, float32.
    """
    return drive(ddpm_steps(x, betas, **kwargs), denoise)


def ddim_steps(
    x: np.ndarray,
    betas: np.ndarray,
    *,
    steps: int = 25,
    eta: float = 0.0,
    cond: np.ndarray | None = None,
    spacing: str = "trailing",
    noise: Iterable[np.ndarray] | None = None,
    rng: np.random.Generator | None = None,
    clip_denoised: bool = True,
    dynamic_thres_percentile: float | None = None,
    prediction_type: str = "eps",
    callback: Callable[[dict], None] | None = None,
) -> Machine:
    """``ddim`` as a step machine (see the module docstring)."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.integer, np.floating)) or not 0 <= eta <= 1:
        # eta > 1 adds more noise than DDPM's posterior and a huge one overflows to NaN videos
        raise ValueError(f"eta must be a number in [0, 1] (0: deterministic DDIM, 1: DDPM's posterior variance), "
                         f"got {eta!r}"[:200])
    x, betas, cond = start(x, betas, cond)
    timesteps = respace(len(betas), steps, spacing, betas=betas)
    alphas_cumprod = np.cumprod(1.0 - betas)
    a_t = alphas_cumprod[timesteps]
    coefs = _ddim_coefficients(a_t, np.concatenate([alphas_cumprod[timesteps[1:]], [1.0]]), eta)
    draw = noise_source(noise, rng, x.shape, "ddim", array_namespace(x)) if eta > 0 else None
    kw = {"clip_denoised": clip_denoised, "dynamic_thres_percentile": dynamic_thres_percentile,
          "prediction_type": prediction_type}

    def update(i, x, eps):
        return ddim_step(x, eps, {k: v[i] for k, v in coefs.items()}, draw(i) if draw is not None else None, **kw)

    return step_loop(x, cond, timesteps, update, callback)


def ddim(denoise: Denoise, x: np.ndarray, betas: np.ndarray, **kwargs) -> np.ndarray:
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12) on respaced timesteps.

    ``eta = 0`` is deterministic; ``eta = 1`` has DDPM's posterior variance. The last step goes to
    ``alpha = 1`` and returns the clean x0 prediction. A clipped x0 re-derives eps from it (so the step
    stays on the line from x0 to x_t, as diffusers' ``use_clipped_model_output=True``).

    Args:
        steps, spacing: the timesteps, ``respace(T, steps, spacing, betas=betas)`` (default 25, trailing).
        eta: the stochasticity; with ``eta > 0`` one noise array per step is drawn from ``noise``/``rng``.
        The rest as in ``ddpm``.
    """
    return drive(ddim_steps(x, betas, **kwargs), denoise)


def dpmpp_steps(
    x: np.ndarray,
    betas: np.ndarray,
    *,
    steps: int = 25,
    order: int = 2,
    cond: np.ndarray | None = None,
    spacing: str = "trailing",
    clip_denoised: bool = True,
    dynamic_thres_percentile: float | None = None,
    prediction_type: str = "eps",
    callback: Callable[[dict], None] | None = None,
) -> Machine:
    """``dpmpp`` as a step machine (see the module docstring)."""
    check_order(order)
    x, betas, cond = start(x, betas, cond)
    timesteps = respace(len(betas), steps, spacing, betas=betas)
    alphas_cumprod = np.cumprod(1.0 - betas)[timesteps]
    # paper notation: alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t);
    # the final point t_M has alpha = 1, sigma = 0, lambda = +inf.
    alpha = np.concatenate([np.sqrt(alphas_cumprod), [1.0]])
    sigma = np.concatenate([np.sqrt(1 - alphas_cumprod), [0.0]])
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)
    h = lam[1:] - lam[:-1]  # h_i = lambda_{t_i} - lambda_{t_{i-1}}, +inf on the last step
    n = len(timesteps)
    # each step's order: warm-up 1, 2, ...; first order on the last step (to sigma = 0) and, under 15
    # steps, at most second on the one before (diffusers' lower_order_final)
    k = np.minimum(order, np.arange(1, n + 1))
    k[-1] = 1
    if n < 15 and n >= 2:
        k[-2] = min(k[-2], 2)
    recip, recipm1 = f32(1 / alpha[:n]), f32(sigma[:n] / alpha[:n])  # x0 = (x - sigma eps) / alpha
    ratio = f32(sigma[1:] / sigma[:n])  # sigma_{t_i} / sigma_{t_{i-1}}
    phi = f32(-alpha[1:] * np.expm1(-h))  # alpha_{t_i} (1 - e^{-h_i})
    # x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} + alpha_{t_i} (1 - e^{-h_i}) D_i, with D_i the
    # weighted sum w[i, 0] x0_i + w[i, 1] x0_{i-1} + w[i, 2] x0_{i-2} of the last k_i data predictions
    w = np.zeros((n, 3))
    w[:, 0] = 1
    for i in np.flatnonzero(k == 2):
        # 2nd order (Algorithm 2): D_i = (1 + 1/(2 r_i)) x0_i - 1/(2 r_i) x0_{i-1}, r_i = h_{i-1} / h_i
        half_inv_r = h[i] / (2 * h[i - 1])
        w[i, :2] = 1 + half_inv_r, -half_inv_r
    for i in np.flatnonzero(k == 3):
        # 3rd order: D = D0 + B/A D1 + C/A D2 over the divided differences of x0_i, x0_{i-1}, x0_{i-2}
        r0, r1 = h[i - 1] / h[i], h[i - 2] / h[i]
        e = np.expm1(-h[i])
        A, B, C = -e, e / h[i] + 1, -((e + h[i]) / h[i] ** 2 - 0.5)  # each times alpha_{t_i}
        a0, a1, q, p = 1 / r0, 1 / r1, r0 / (r0 + r1), 1 / (r0 + r1)
        w[i] = (
            A + B * (a0 + q * a0) + C * p * a0,
            -B * (a0 + q * (a0 + a1)) - C * p * (a0 + a1),
            B * q * a1 + C * p * a1,
        )
        w[i] /= A
    w = f32(w)
    history = []  # the data predictions x0_i, x0_{i-1}, ... (newest first), at most `order`

    def update(i, x, eps):
        eps, x0 = to_eps_x0(eps, x, recip[i], recipm1[i], prediction_type)
        if clip_denoised:
            x0 = clip_x0(x0, dynamic_thres_percentile)
        history.insert(0, x0)
        del history[order:]
        wi = [float(v) for v in w[i]]  # Python floats: float32 arithmetic in any namespace
        if k[i] == 1:
            d = x0
        elif k[i] == 2:
            d = wi[0] * x0 + wi[1] * history[1]
        else:
            d = wi[0] * x0 + wi[1] * history[1] + wi[2] * history[2]
        # x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i
        x = float(ratio[i]) * x + float(phi[i]) * d
        return x, x0, eps

    return step_loop(x, cond, timesteps, update, callback)


def dpmpp(denoise: Denoise, x: np.ndarray, betas: np.ndarray, **kwargs) -> np.ndarray:
    """DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++", Algorithm 2 for 2M), data prediction.

    Deterministic. ``order=2`` (default) is DPM-Solver++(2M); ``order=3`` the third-order multistep
    (``dpmpp3m``); ``order=1`` is DDIM. The first steps warm up (orders 1, 2, ...), the last (to sigma = 0,
    which returns x0) is first order and, under 15 steps, the one before it at most second order, as in
    diffusers' ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=order)``.
    Clipping applies to the data prediction x0 before the update.

    Args:
        steps, spacing: the timesteps, ``respace(T, steps, spacing, betas=betas)`` (default 25, trailing).
        order: 1, 2 or 3. The rest as in ``ddpm``.
    """
    return drive(dpmpp_steps(x, betas, **kwargs), denoise)


def dpmpp3m_steps(x: np.ndarray, betas: np.ndarray, **kwargs) -> Machine:
    """``dpmpp3m`` as a step machine: ``dpmpp_steps(..., order=3)``."""
    return dpmpp_steps(x, betas, order=3, **kwargs)


def dpmpp3m(denoise: Denoise, x: np.ndarray, betas: np.ndarray, **kwargs) -> np.ndarray:
    """DPM-Solver++(3M): ``dpmpp`` at ``order=3`` (Lu et al. 2022, the third-order multistep update of
    DPM-Solver, arXiv:2206.00927, in data prediction; diffusers' ``solver_order=3``)."""
    return drive(dpmpp3m_steps(x, betas, **kwargs), denoise)


@dataclass(frozen=True)
class SamplerOption:
    """One keyword option a sampler takes, typed: it generates the click flag (``vdeploy sample``/``parity``)
    and the server's request field, and checks the value.

    Args:
        name: the keyword (``--name`` on the command line, with ``_`` as ``-``; the JSON field ``name``).
        kind: ``int``, ``float`` or ``str``.
        help: one line for ``--help``.
        choices: the values a ``str`` option takes.
        min, max: the closed range of a number (None: unbounded).
    """

    name: str
    kind: type
    help: str
    choices: tuple = ()
    min: float | None = None
    max: float | None = None

    def check(self, value):
        """``value`` as this option's type, or a ValueError worded as the command line's (click's) messages."""
        if self.kind is str:
            if value not in self.choices:
                raise ValueError(f"{value!r} is not one of {', '.join(repr(c) for c in self.choices)}")
            return value
        number = (int, float) if self.kind is float else int
        if isinstance(value, bool) or not isinstance(value, number):
            raise ValueError(f"{value!r} is not a valid {'float' if self.kind is float else 'integer'}")
        value = self.kind(value)
        if self.kind is float and not np.isfinite(value):
            raise ValueError(f"{value!r} is not a finite number")
        lo, hi = self.min, self.max
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bound = f"{lo}<=x<={hi}" if lo is not None and hi is not None else f"x>={lo}" if lo is not None \
                else f"x<={hi}"
            raise ValueError(f"{value} is not in the range {bound}")
        return value


# the options the built-in samplers share (one definition each)
SPACING = SamplerOption("spacing", str, "How the steps are spread over the training timesteps.", SPACINGS)
ORDER = SamplerOption("order", int, "Solver order of the multistep samplers.", min=1, max=3)
ETA = SamplerOption("eta", float, "DDIM stochasticity (0 = deterministic, the default).", min=0.0)
VARIANT = SamplerOption("variant", str, "UniPC's B(h).", VARIANTS)


@dataclass(frozen=True)
class SamplerSpec:
    """One entry of the samplers table, read by the Pipeline (``SamplerRun``), parity, the CLI, the server and
    the benchmark.

    Args:
        fn: the pure function ``fn(denoise, x, betas, *, cond, steps, clip_denoised,
            dynamic_thres_percentile, prediction_type, callback, **options) -> x0``.
        stepper: its step machine, ``stepper(x, betas, *, <the same keywords>)`` (the module docstring
            has the protocol); ``fn(denoise, ...) == drive(stepper(...), denoise)`` bit for bit.
        default_steps: steps when the caller gives none (None: every training timestep).
        draws_noise: takes per-step noise (``noise``/``rng``): ancestral or ``eta > 0``.
        options: the further keyword options a caller may set, typed (``SamplerOption``s; stored by name).
            Each generates a flag of ``vdeploy sample``/``parity`` and a field of the server's requests.
        summary: one line for ``--help`` and the docs.
        defaults: option values the Pipeline, the CLI and parity use when the caller gives none (the pure
            function's own keyword defaults stay as they are), chosen by the benchmark's quality table.
        level_step: for single-step samplers, the step between any two training levels,
            ``level_step(x, eps, abar_t, abar_s, draw, **kwargs) -> x_s``: RePaint resampling redoes steps with it
            (``vdeploy.runtime.frame_conditioning``); None for multistep samplers (replacement only).
    """

    fn: Callable[..., np.ndarray]
    stepper: Callable[..., Machine]
    default_steps: int | None
    draws_noise: bool
    options: Mapping[str, SamplerOption]
    summary: str
    defaults: Mapping[str, object] = field(default_factory=dict)
    level_step: Callable | None = None

    def __post_init__(self):
        if not isinstance(self.options, Mapping):  # a tuple of SamplerOption
            object.__setattr__(self, "options", {option.name: option for option in self.options})


SAMPLERS: dict[str, SamplerSpec] = {
    # the default: with logsnr spacing, 13 steps reach the PSNR that 25 trailing steps had (README, "Samplers")
    "dpmpp": SamplerSpec(dpmpp, dpmpp_steps, 13, False, (SPACING, ORDER),
                         "DPM-Solver++ 2M (Lu et al. 2022; order 1-3), deterministic", {"spacing": "logsnr"}),
    "dpmpp3m": SamplerSpec(dpmpp3m, dpmpp3m_steps, 25, False, (SPACING,),
                           "DPM-Solver++ 3M (Lu et al. 2022), deterministic"),
    "unipc": SamplerSpec(unipc, unipc_steps, 25, False, (SPACING, ORDER, VARIANT),
                         "UniPC predictor-corrector (Zhao et al. 2023; bh2, order 2), deterministic"),
    "ddim": SamplerSpec(ddim, ddim_steps, 25, True, (ETA, SPACING),
                        "DDIM (Song et al. 2021); eta > 0 adds noise", level_step=ddim_level_step),
    "ddpm": SamplerSpec(ddpm, ddpm_steps, None, True, (SPACING,),
                        "upstream's ancestral DDPM loop (all timesteps)", level_step=ddpm_level_step),
}


def sampler_options() -> dict[str, SamplerOption]:
    """Every option of the samplers table by name (each name once; the samplers taking it in
    ``samplers_taking``): what ``vdeploy sample``/``parity`` turn into flags."""
    out: dict[str, SamplerOption] = {}
    for spec in SAMPLERS.values():
        for name, option in spec.options.items():
            out.setdefault(name, option)
    return out


def samplers_taking(name: str) -> list[str]:
    """The samplers whose table entry lists option ``name``."""
    return [sampler for sampler, spec in SAMPLERS.items() if name in spec.options]


def request_fields(body: Mapping) -> dict:
    """The sampler options of a request body (the server's JSON): every option of the table whose name is in
    ``body`` and not None, type- and range-checked by its ``SamplerOption``.

    Raises:
        OptionError: the first bad value (``.field`` names it, ``.message`` says why).
    """
    out = {}
    for name, option in sampler_options().items():
        if body.get(name) is not None:
            try:
                out[name] = option.check(body[name])
            except ValueError as e:
                raise OptionError(name, str(e)) from None
    return out


class OptionError(ValueError):
    """A bad sampler option value: ``field`` (its name) and ``message``."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def sampler_spec(name: str) -> SamplerSpec:
    """The table entry of ``name``, or a ValueError naming the samplers there are."""
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {name!r}") from None


def sampler_kwargs(name: str, steps: int, options: dict, *, noise=None, rng=None) -> dict:
    """The keyword arguments for ``SAMPLERS[name].fn`` (and ``.stepper``) beyond the common ones: the caller's ``options``
    (each one the spec accepts; None values dropped) and, for samplers that draw noise, ``noise``/``rng``.

    Raises:
        ValueError: an option this sampler does not take, or per-step noise for a deterministic one.
    """
    spec = sampler_spec(name)
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        takes = ", ".join(spec.options) or "none"
        raise ValueError(f"sampler {name!r} takes no option {', '.join(unknown)} (its options: {takes})")
    kwargs = {"steps": steps, **spec.defaults, **options}
    if spec.draws_noise:
        kwargs.update(noise=noise, rng=rng)
    elif noise is not None:
        raise ValueError(f"sampler {name!r} is deterministic: it takes no per-step noise")
    return kwargs
