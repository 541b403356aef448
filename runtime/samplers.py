"""Samplers as pure numpy functions over one denoiser contract, k-diffusion style, each also a step machine.

The contract: ``eps = denoise(x, t, cond)`` with ``x`` float32 ``(b, c, f, h, w)``, ``t`` int64 ``(b,)``
(training timesteps, also for respaced samplers), ``cond`` float32 ``(b, D)`` or None; ``eps`` the
predicted noise, shaped like ``x``. A model trained with frame conditioning takes two more per-row inputs by
keyword, ``denoise(x, t, cond, frames=..., mask=...)`` (``vdeploy.runtime.conditioning.conditioned_steps``
with ``trained=True``); a denoiser called without them samples plain generation. Every sampler returns the
final x0 estimate (in [-1, 1] when the denoised prediction is clipped) as float32.

Each sampler computes its per-step coefficients once, in float64, and casts them to float32 tables;
the loop only indexes them. Randomness comes from explicit ``noise`` (an iterable of arrays, one per
step, in loop order) or an injected ``numpy.random.Generator``. ``callback`` gets, after every step,
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

``drive(machine, denoise)`` runs one machine with one denoiser call per request; each pure function
is exactly ``drive(name_steps(...), denoise)``. The machine never calls the denoiser, so a driver may
gather the requests of many machines (different samplers, steps or timesteps; same ``(c, f, h, w)``)
into one call, concatenating their ``x``, ``t``, ``cond`` and ``inputs`` along the batch, and send each
machine its rows of the output. A machine keeps all its state (sample, multistep history, noise source, tables)
local, assumes nothing about its driver, and copies nothing: it never writes into an array it was
given or has yielded (the starting noise, ``cond``, a request's ``x``, a received ``eps``, which may be
a view into a batched output), so requests and callback arrays stay valid after later steps.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from .schedule import respace, respaced_betas, seed_buffers

Denoise = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], np.ndarray]


@dataclass(frozen=True)
class StepRequest:
    """One denoiser evaluation a step machine asks for: ``eps = denoise(x, t, cond)``.

    Attributes:
        x: float32 ``(b, c, f, h, w)``, the sample at this step (the machine never writes into it).
        t: int64 ``(b,)``, the training timestep of every row.
        cond: float32 ``(b, D)``, or None for an unconditional run.
        i: the step index, 0 to steps - 1.
        inputs: None, or the per-row inputs of a frame-conditioned graph by role: ``{"frames": float32
            (b, c, f, h, w) in [-1, 1], "mask": float32 (b, f), 1 = known}``, passed as keywords to the denoiser.
    """

    x: np.ndarray
    t: np.ndarray
    cond: np.ndarray | None
    i: int
    inputs: Mapping[str, np.ndarray] | None = None


Machine = Generator[StepRequest, np.ndarray, np.ndarray]


def drive(machine: Machine, denoise: Denoise) -> np.ndarray:
    """Run a step machine to its end, one ``denoise`` call per request; returns its final x0."""
    send, eps = machine.send, None
    while True:
        try:
            request = send(eps)
        except StopIteration as done:
            return done.value
        eps = denoise(request.x, request.t, request.cond, **(request.inputs or {}))


def _machine(x: np.ndarray, cond, timesteps: np.ndarray, update, callback) -> Machine:
    """The step loop every sampler shares: one request per timestep, then ``x, x0, eps = update(i, x, eps)``."""
    b = x.shape[0]
    for i, t in enumerate(timesteps):
        eps = np.asarray((yield StepRequest(x, np.full((b,), t, dtype=np.int64), cond, i)), dtype=np.float32)
        if eps.shape != x.shape:
            raise ValueError(f"step {i}: eps has shape {eps.shape}, expected {x.shape} (the request's x)")
        x, x0, eps = update(i, x, eps)
        if callback is not None:
            callback({"i": i, "t": int(t), "x": x, "x0": x0, "eps": eps})
    return x


def guided(denoise: Denoise, null_cond: np.ndarray, cond_scale: float) -> Denoise:
    """Classifier-free guidance (Ho & Salimans 2022) as a denoiser, exactly upstream's ``forward_with_cond_scale``.

    Two calls: with ``cond`` and with the learned null embedding, combined as
    ``null + (cond - null) * cond_scale``. At ``cond_scale == 1`` it is the conditional call alone.
    """
    null_cond = np.asarray(null_cond, dtype=np.float32).reshape(1, -1)
    cond_scale = float(cond_scale)  # a Python float keeps float32 arithmetic float32
    if cond_scale == 1:
        return denoise

    def guided_denoise(x, t, cond, **inputs):
        if cond is None:
            raise ValueError("classifier-free guidance needs a cond")
        eps = denoise(x, t, cond, **inputs)
        null = denoise(x, t, np.broadcast_to(null_cond, cond.shape), **inputs)  # the same known frames
        return null + (eps - null) * cond_scale

    return guided_denoise


def clip_x0(x0: np.ndarray, dynamic_thres_percentile: float | None = None) -> np.ndarray:
    """The seed's ``clip_denoised``: clamp to [-1, 1], or its dynamic thresholding (Saharia et al. 2022).

    Dynamic: ``s`` = the percentile of ``|x0|`` per sample (``np.quantile`` linear, as ``torch.quantile``),
    at least 1; ``x0`` is clamped to ``[-s, s]`` and divided by ``s``. Works in place on ``x0``.
    """
    if dynamic_thres_percentile is None:
        return np.clip(x0, -1.0, 1.0, out=x0)
    b = x0.shape[0]
    s = np.quantile(np.abs(x0).reshape(b, -1), dynamic_thres_percentile, axis=-1)
    s = np.maximum(s, 1.0).astype(x0.dtype).reshape(b, *(1,) * (x0.ndim - 1))
    np.clip(x0, -s, s, out=x0)
    x0 /= s
    return x0


def _noise_source(noise: Iterable[np.ndarray] | None, rng: np.random.Generator | None, shape, what: str):
    """A function returning the next per-step noise array: from ``noise`` if given, else from ``rng``."""
    if noise is not None:
        it = iter(noise)

        def draw(i):
            try:
                z = next(it)
            except StopIteration:
                raise ValueError(f"{what}: `noise` ran out at step {i}; it needs one array per step") from None
            z = np.asarray(z, dtype=np.float32)
            if z.shape != shape:
                raise ValueError(f"{what}: noise for step {i} has shape {z.shape}, expected {shape}")
            return z

        return draw
    rng = rng if rng is not None else np.random.default_rng()
    return lambda i: rng.standard_normal(shape, dtype=np.float32)


def _start(x: np.ndarray, betas: np.ndarray, cond):
    x = np.asarray(x, dtype=np.float32)  # no copy: nothing writes into x (the caller's noise stays untouched)
    if x.ndim != 5:
        raise ValueError(f"x must be (b, c, f, h, w), got shape {x.shape}")
    if cond is not None:
        cond = np.asarray(cond, dtype=np.float32)
    return x, np.asarray(betas, dtype=np.float64), cond


def _check_order(order) -> None:
    if not isinstance(order, (int, np.integer)) or isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")


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
    callback: Callable[[dict], None] | None = None,
) -> Machine:
    """``ddpm`` as a step machine (see the module docstring)."""
    x, betas, cond = _start(x, betas, cond)
    T = len(betas)
    if steps is None or steps == T:
        timesteps = np.arange(T - 1, -1, -1, dtype=np.int64)
    else:
        timesteps = respace(T, steps, spacing, betas=betas)
        betas = respaced_betas(betas, timesteps)
    tab = seed_buffers(betas)
    # q(x_{t-1} | x_t, x0) = N(coef1 * x0 + coef2 * x_t, exp(logvar)); x0 = sqrt(1/a_t) x_t - sqrt(1/a_t - 1) eps
    recip, recipm1 = tab["sqrt_recip_alphas_cumprod"], tab["sqrt_recipm1_alphas_cumprod"]
    coef1, coef2 = tab["posterior_mean_coef1"], tab["posterior_mean_coef2"]
    std = np.exp(np.float32(0.5) * tab["posterior_log_variance_clipped"])
    draw = _noise_source(noise, rng, x.shape, "ddpm")
    n = len(timesteps)

    def update(i, x, eps):
        j = n - 1 - i  # index into the (possibly respaced) chain's tables
        x0 = recip[j] * x - recipm1[j] * eps
        if clip_denoised:
            clip_x0(x0, dynamic_thres_percentile)
        mean = coef1[j] * x0 + coef2[j] * x
        z = draw(i)
        x = mean + std[j] * z if j > 0 else mean  # no noise at t = 0 (the seed's nonzero_mask)
        return x, x0, eps

    return _machine(x, cond, timesteps, update, callback)


def ddpm(denoise: Denoise, x: np.ndarray, betas: np.ndarray, **kwargs) -> np.ndarray:
    """Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2), the seed's ``p_sample_loop`` step for step.

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
        clip_denoised: clamp the predicted x0 (the seed's default, True).
        dynamic_thres_percentile: the seed's dynamic thresholding when not None (with clipping).
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
    callback: Callable[[dict], None] | None = None,
) -> Machine:
    """``ddim`` as a step machine (see the module docstring)."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.integer, np.floating)) or not 0 <= eta <= 1:
        # eta > 1 adds more noise than DDPM's posterior and a huge one overflows to NaN videos
        raise ValueError(f"eta must be a number in [0, 1] (0: deterministic DDIM, 1: DDPM's posterior variance), "
                         f"got {eta!r}"[:200])
    x, betas, cond = _start(x, betas, cond)
    timesteps = respace(len(betas), steps, spacing, betas=betas)
    alphas_cumprod = np.cumprod(1.0 - betas)
    # paper notation: alpha_t here is the cumulative product (the paper's alpha_t), sigma_t its eq. 16
    a_t = alphas_cumprod[timesteps]
    a_prev = np.concatenate([alphas_cumprod[timesteps[1:]], [1.0]])
    sigma = eta * np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    f32 = lambda v: np.asarray(v, dtype=np.float32)  # noqa: E731
    recip, recipm1 = f32(np.sqrt(1 / a_t)), f32(np.sqrt(1 / a_t - 1))
    eps_from_x, eps_from_x0 = f32(1 / np.sqrt(1 - a_t)), f32(np.sqrt(a_t / (1 - a_t)))
    sqrt_a_prev, sigma32 = f32(np.sqrt(a_prev)), f32(sigma)
    dir_coef = f32(np.sqrt(np.maximum(1 - a_prev - sigma**2, 0)))  # eta > 1 would make it negative
    draw = _noise_source(noise, rng, x.shape, "ddim") if eta > 0 else None

    def update(i, x, eps):
        # "predicted x0" = (x_t - sqrt(1 - alpha_t) eps) / sqrt(alpha_t)
        x0 = recip[i] * x - recipm1[i] * eps
        if clip_denoised:
            clip_x0(x0, dynamic_thres_percentile)
            eps = eps_from_x[i] * x - eps_from_x0[i] * x0
        # x_{t-1} = sqrt(alpha_{t-1}) x0 + sqrt(1 - alpha_{t-1} - sigma_t^2) eps + sigma_t z
        x = sqrt_a_prev[i] * x0 + dir_coef[i] * eps
        if draw is not None:
            x += sigma32[i] * draw(i)  # x is this step's new array
        return x, x0, eps

    return _machine(x, cond, timesteps, update, callback)


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
    callback: Callable[[dict], None] | None = None,
) -> Machine:
    """``dpmpp`` as a step machine (see the module docstring)."""
    _check_order(order)
    x, betas, cond = _start(x, betas, cond)
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
    f32 = lambda v: np.asarray(v, dtype=np.float32)  # noqa: E731
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
        x0 = recip[i] * x - recipm1[i] * eps
        if clip_denoised:
            clip_x0(x0, dynamic_thres_percentile)
        history.insert(0, x0)
        del history[order:]
        wi = w[i]
        if k[i] == 1:
            d = x0
        elif k[i] == 2:
            d = wi[0] * x0 + wi[1] * history[1]
        else:
            d = wi[0] * x0 + wi[1] * history[1] + wi[2] * history[2]
        # x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i
        x = ratio[i] * x + phi[i] * d
        return x, x0, eps

    return _machine(x, cond, timesteps, update, callback)


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
class SamplerSpec:
    """One entry of the samplers table, read by the Pipeline, parity, the CLI and the benchmark.

    Args:
        fn: the pure function ``fn(denoise, x, betas, *, cond, steps, clip_denoised,
            dynamic_thres_percentile, callback, **options) -> x0``.
        stepper: its step machine, ``stepper(x, betas, *, <the same keywords>)`` (the module docstring
            has the protocol); ``fn(denoise, ...) == drive(stepper(...), denoise)`` bit for bit.
        default_steps: steps when the caller gives none (None: every training timestep).
        draws_noise: takes per-step noise (``noise``/``rng``): ancestral or ``eta > 0``.
        options: the further keyword options a caller may set (``spacing``, ``eta``, ``order``...).
        summary: one line for ``--help`` and the docs.
        defaults: option values the Pipeline, the CLI and parity use when the caller gives none (the pure
            function's own keyword defaults stay as they are), chosen by the benchmark's quality table.
    """

    fn: Callable[..., np.ndarray]
    stepper: Callable[..., Machine]
    default_steps: int | None
    draws_noise: bool
    options: tuple[str, ...]
    summary: str
    defaults: Mapping[str, object] = field(default_factory=dict)


from .unipc_multistep import unipc, unipc_steps  # noqa: E402 (it builds on the machinery above)

SAMPLERS: dict[str, SamplerSpec] = {
    # the default: with logsnr spacing, 13 steps reach the PSNR that 25 trailing steps had (README, "Samplers")
    "dpmpp": SamplerSpec(dpmpp, dpmpp_steps, 13, False, ("spacing", "order"),
                         "DPM-Solver++ 2M (Lu et al. 2022; order 1-3), deterministic", {"spacing": "logsnr"}),
    "dpmpp3m": SamplerSpec(dpmpp3m, dpmpp3m_steps, 25, False, ("spacing",),
                           "DPM-Solver++ 3M (Lu et al. 2022), deterministic"),
    "unipc": SamplerSpec(unipc, unipc_steps, 25, False, ("spacing", "order", "variant"),
                         "UniPC predictor-corrector (Zhao et al. 2023; bh2, order 2), deterministic"),
    "ddim": SamplerSpec(ddim, ddim_steps, 25, True, ("eta", "spacing"),
                        "DDIM (Song et al. 2021); eta > 0 adds noise"),
    "ddpm": SamplerSpec(ddpm, ddpm_steps, None, True, ("spacing",),
                        "the seed's ancestral DDPM loop (all timesteps)"),
}


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
