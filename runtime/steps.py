"""The step machinery every sampler shares: the step-machine protocol, its driver, the x0/eps conversion,
clipping, guidance and per-step noise. Plain arithmetic on arrays (the array API where it can be), no tables.

The protocol (``vdeploy.runtime.samplers`` documents it in full): a step machine yields a ``StepRequest``
("evaluate the denoiser here"), is sent that eps, and returns the final x0 when it stops. ``drive`` runs one
machine against one denoiser.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

Denoise = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], np.ndarray]

# what the denoiser predicts: the one place converting it to eps and x0 is ``to_eps_x0``
PREDICTION_TYPES = ("eps", "v")


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


def step_loop(x: np.ndarray, cond, timesteps: np.ndarray, update, callback) -> Machine:
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


def to_eps_x0(output, x, recip, recipm1, prediction_type: str = "eps"):
    """The denoiser's ``output`` at sample ``x`` -> ``(eps, x0)``; the one conversion point.

    ``recip = 1 / sqrt(abar_t)`` and ``recipm1 = sqrt(1 / abar_t - 1)`` are the step's precomputed float32
    coefficients (scalars or arrays broadcasting against ``x``): ``x0 = recip x - recipm1 eps``. ``x0`` is a new
    array (callers clip it in place). ``"v"`` (Salimans & Ho 2022): with ``sqrt(abar) = 1 / recip`` and
    ``sqrt(1 - abar) = recipm1 / recip``, ``x0 = sqrt(abar) x - sqrt(1 - abar) v`` and
    ``eps = sqrt(abar) v + sqrt(1 - abar) x``: nothing is divided by a vanishing ``sqrt(abar)``.
    """
    if prediction_type == "eps":
        return output, recip * x - recipm1 * output
    if prediction_type == "v":
        sqrt_a, sqrt_1ma = 1 / recip, recipm1 / recip
        return sqrt_a * output + sqrt_1ma * x, sqrt_a * x - sqrt_1ma * output
    raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")


def combine_guidance(cond_eps, null_eps, cond_scale: float):
    """Classifier-free guidance's combination ``null + (cond - null) * cond_scale`` (a Python float scale keeps
    float32 arithmetic float32); ``guided`` and the serving batcher both use it."""
    return null_eps + (cond_eps - null_eps) * float(cond_scale)


def guided(denoise: Denoise, null_cond: np.ndarray, cond_scale: float) -> Denoise:
    """Classifier-free guidance (Ho & Salimans 2022) as a denoiser, exactly upstream's ``forward_with_cond_scale``.

    Two calls: with ``cond`` and with the learned null embedding, combined by ``combine_guidance``. At
    ``cond_scale == 1`` it is the conditional call alone.
    """
    null_cond = np.asarray(null_cond, dtype=np.float32).reshape(1, -1)
    cond_scale = float(cond_scale)
    if cond_scale == 1:
        return denoise

    def guided_denoise(x, t, cond, **inputs):
        if cond is None:
            raise ValueError("classifier-free guidance needs a cond")
        eps = denoise(x, t, cond, **inputs)
        null = denoise(x, t, np.broadcast_to(null_cond, cond.shape), **inputs)  # the same known frames
        return combine_guidance(eps, null, cond_scale)

    return guided_denoise


def clip_x0(x0: np.ndarray, dynamic_thres_percentile: float | None = None) -> np.ndarray:
    """Upstream's ``clip_denoised``: clamp to [-1, 1], or its dynamic thresholding (Saharia et al. 2022).

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


def noise_source(noise: Iterable[np.ndarray] | None, rng: np.random.Generator | None, shape, what: str):
    """A function ``draw(i)`` returning the next per-step noise array: from ``noise`` if given, else ``rng``."""
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


def start(x: np.ndarray, betas: np.ndarray, cond):
    """A stepper's arguments checked and typed: ``x`` float32 5-d (not copied), float64 betas, float32 cond."""
    x = np.asarray(x, dtype=np.float32)  # no copy: nothing writes into x (the caller's noise stays untouched)
    if x.ndim != 5:
        raise ValueError(f"x must be (b, c, f, h, w), got shape {x.shape}")
    if cond is not None:
        cond = np.asarray(cond, dtype=np.float32)
    return x, np.asarray(betas, dtype=np.float64), cond


def check_order(order) -> None:
    if not isinstance(order, (int, np.integer)) or isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
