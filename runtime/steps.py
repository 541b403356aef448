"""The step machinery every sampler shares: the step-machine protocol, its driver, the x0/eps conversion,
clipping, guidance and per-step noise. Plain arithmetic on arrays, no tables.

The protocol (``vdeploy.runtime.samplers`` documents it in full): a step machine yields a ``StepRequest``
("evaluate the denoiser here"), is sent that eps, and returns the final x0 when it stops. ``drive`` runs one
machine against one denoiser.

Array namespaces. The arithmetic runs in the namespace of the starting sample ``x`` (``array_namespace``):
numpy arrays (and array-likes) compute in numpy, the reference; any other array-API array (CuPy on a GPU,
array-api-strict in the tests) computes in its own namespace through ``array_api_compat``, with the same
float32 operations in the same order. Coefficients stay host tables and enter the arithmetic as Python floats
(``coefficient``: a float32 value is exactly a float64 one, and a Python scalar keeps float32 arrays float32),
so a device run does the same operations on the same float32 values as the numpy run.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

Denoise = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], np.ndarray]


def array_namespace(*arrays):
    """The namespace step arithmetic on ``arrays`` runs in: ``numpy`` itself when every one is a numpy array,
    a Python scalar, a list or None (the reference path; nothing is imported), else
    ``array_api_compat.array_namespace`` of the others (CuPy, array-api-strict, ...)."""
    others = [a for a in arrays if a is not None and type(a).__module__.split(".")[0] not in ("numpy", "builtins")]
    if not others:
        return np
    from array_api_compat import array_namespace as compat_namespace

    return compat_namespace(*others)


def to_host(a) -> np.ndarray:
    """A (small) array as numpy: itself for numpy, ``.get()`` for CuPy (a device-to-host copy, which waits for
    the device), ``np.asarray`` for others (array-api-strict)."""
    if array_namespace(a) is np:
        return np.asarray(a)
    return a.get() if hasattr(a, "get") else np.asarray(a)


def coefficient(value, xp=np):
    """A precomputed float32 step coefficient ready for arithmetic in namespace ``xp``: a scalar as a Python
    float (exact, and a Python scalar keeps float32 arrays float32 in numpy 2 and the array API), a per-row
    numpy array as is in numpy and as an array of ``xp`` (uploaded) elsewhere."""
    if getattr(value, "ndim", 0) == 0:
        return float(value)
    return value if xp is np else xp.asarray(value)


def _quotient(a, b):
    """``a / b`` in float32 (scalars divided as numpy float32 scalars; arrays as arrays)."""
    if getattr(b, "ndim", 0) == 0 and getattr(a, "ndim", 0) == 0:
        return float(np.float32(a) / np.float32(b))
    return a / b

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
    """The step loop every sampler shares: one request per timestep, then ``x, x0, eps = update(i, x, eps)``.
    The requests' ``t`` and the received eps are arrays of ``x``'s namespace."""
    b = x.shape[0]
    xp = array_namespace(x)
    for i, t in enumerate(timesteps):
        if xp is np:
            eps = np.asarray((yield StepRequest(x, np.full((b,), t, dtype=np.int64), cond, i)), dtype=np.float32)
        else:
            eps = xp.asarray((yield StepRequest(x, xp.full((b,), int(t), dtype=xp.int64), cond, i)), dtype=xp.float32)
        if tuple(eps.shape) != tuple(x.shape):
            raise ValueError(f"step {i}: eps has shape {eps.shape}, expected {x.shape} (the request's x)")
        x, x0, eps = update(i, x, eps)
        if callback is not None:
            callback({"i": i, "t": int(t), "x": x, "x0": x0, "eps": eps})
    return x


def to_eps_x0(output, x, recip, recipm1, prediction_type: str = "eps"):
    """The denoiser's ``output`` at sample ``x`` -> ``(eps, x0)``; the one conversion point.

    ``recip = 1 / sqrt(abar_t)`` and ``recipm1 = sqrt(1 / abar_t - 1)`` are the step's precomputed float32
    coefficients (scalars or arrays broadcasting against ``x``): ``x0 = recip x - recipm1 eps``. ``x0`` is a new
    array (``clip_x0`` of it returns the clipped one). ``"v"`` (Salimans & Ho 2022): with ``sqrt(abar) = 1 / recip``
    and ``sqrt(1 - abar) = recipm1 / recip``, ``x0 = sqrt(abar) x - sqrt(1 - abar) v`` and
    ``eps = sqrt(abar) v + sqrt(1 - abar) x``: nothing is divided by a vanishing ``sqrt(abar)``.
    Scalar coefficients may be numpy float32 scalars or Python floats (``coefficient``): the same numbers.
    """
    xp = array_namespace(x)
    recip, recipm1 = coefficient(recip, xp), coefficient(recipm1, xp)
    if prediction_type == "eps":
        return output, recip * x - recipm1 * output
    if prediction_type == "v":
        sqrt_a, sqrt_1ma = _quotient(1, recip), _quotient(recipm1, recip)
        return sqrt_a * output + sqrt_1ma * x, sqrt_a * x - sqrt_1ma * output
    raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")


def combine_guidance(cond_eps, null_eps, cond_scale: float, rescale: float = 0.0):
    """Classifier-free guidance's combination ``null + (cond - null) * cond_scale`` (a Python float scale keeps
    float32 arithmetic float32); ``guided`` and the serving batcher both use it.

    ``rescale`` phi in [0, 1] (CFG rescale, Lin et al. 2024, diffusers' ``guidance_rescale``; 0: off, exactly the
    plain combination): the guided output ``g`` scaled per sample to the conditional output's standard deviation
    and mixed ``phi * g * std(cond) / std(g) + (1 - phi) * g``, against the over-bright samples of large scales. It
    works on what the denoiser predicts (eps or v), as diffusers does.
    """
    rescale = check_rescale(rescale)
    out = null_eps + (cond_eps - null_eps) * float(cond_scale)
    if rescale == 0.0:
        return out
    xp = array_namespace(out)  # numpy, or the device arrays' namespace
    axes = tuple(range(1, out.ndim))
    std_out = xp.std(out, axis=axes, keepdims=True)
    ratio = xp.std(cond_eps, axis=axes, keepdims=True) / xp.where(std_out > 0, std_out, 1.0)
    return out * (rescale * xp.where(std_out > 0, ratio, 1.0) + (1 - rescale))


def check_rescale(rescale) -> float:
    """CFG rescale's phi as a float in [0, 1], or a ValueError."""
    if isinstance(rescale, bool) or not isinstance(rescale, (int, float, np.integer, np.floating)) \
            or not 0.0 <= float(rescale) <= 1.0:
        raise ValueError(f"guidance rescale must be a number in [0, 1], got {rescale!r}")
    return float(rescale)


def guided(denoise: Denoise, null_cond: np.ndarray, cond_scale: float, rescale: float = 0.0) -> Denoise:
    """Classifier-free guidance (Ho & Salimans 2022) as a denoiser, exactly upstream's ``forward_with_cond_scale``.

    Two calls: with ``cond`` and with the learned null embedding, combined by ``combine_guidance`` (with its CFG
    ``rescale``). At ``cond_scale == 1`` it is the conditional call alone.
    """
    null_cond = np.asarray(null_cond, dtype=np.float32).reshape(1, -1)
    cond_scale = float(cond_scale)
    rescale = check_rescale(rescale)
    if cond_scale == 1:
        return denoise
    on_device: dict = {}  # the null embedding uploaded once per namespace (device runs)

    def null_like(cond):
        xp = array_namespace(cond)
        if xp is np:
            return np.broadcast_to(null_cond, cond.shape)
        if id(xp) not in on_device:
            on_device[id(xp)] = xp.asarray(null_cond)
        return xp.broadcast_to(on_device[id(xp)], tuple(cond.shape))

    def guided_denoise(x, t, cond, **inputs):
        if cond is None:
            raise ValueError("classifier-free guidance needs a cond")
        eps = denoise(x, t, cond, **inputs)
        null = denoise(x, t, null_like(cond), **inputs)  # the same known frames
        return combine_guidance(eps, null, cond_scale, rescale)

    return guided_denoise


def clip_x0(x0: np.ndarray, dynamic_thres_percentile: float | None = None) -> np.ndarray:
    """Upstream's ``clip_denoised``: clamp to [-1, 1], or its dynamic thresholding (Saharia et al. 2022).

    Dynamic: ``s`` = the percentile of ``|x0|`` per sample (``np.quantile`` linear, as ``torch.quantile``),
    at least 1; ``x0`` is clamped to ``[-s, s]`` and divided by ``s``. Returns the clipped array: ``x0`` itself,
    clipped in place, for numpy; a new array in other namespaces (use the return value).
    """
    xp = array_namespace(x0)
    if xp is not np:
        return _clip_x0_array_api(xp, x0, dynamic_thres_percentile)
    if dynamic_thres_percentile is None:
        return np.clip(x0, -1.0, 1.0, out=x0)
    b = x0.shape[0]
    s = np.quantile(np.abs(x0).reshape(b, -1), dynamic_thres_percentile, axis=-1)
    s = np.maximum(s, 1.0).astype(x0.dtype).reshape(b, *(1,) * (x0.ndim - 1))
    np.clip(x0, -s, s, out=x0)
    x0 /= s
    return x0


def _clip_x0_array_api(xp, x0, q):
    """``clip_x0`` in an array-API namespace. The percentile is numpy's ``quantile`` (method ``linear``, a Python
    float ``q``) written out: sort, then ``_lerp`` of the two neighbours in float32 with a Python weight, so the
    thresholds are numpy's to the bit.

    Bounds are ``minimum(maximum(x0, lo), hi)`` (numpy's ``clip`` to the bit, NaN and -0.0 included), not ``xp.clip``:
    array-api-compat's ``clip`` for CuPy assigns through boolean masks, which waits for the device twice a call
    (measured on an H200: the device loop spent 12.6% of each dpmpp step outside the denoiser with it); Python
    scalars stay kernel arguments (no upload)."""
    if q is None:
        return xp.minimum(xp.maximum(x0, -1.0), 1.0)
    b, ndim = x0.shape[0], x0.ndim
    ordered = xp.sort(xp.reshape(xp.abs(x0), (b, -1)), axis=-1)
    n = ordered.shape[-1]
    position = (n - 1) * float(q)
    if not 0 <= float(q) <= 1:
        raise ValueError(f"dynamic_thres_percentile must be in [0, 1], got {q!r}")
    lower = min(int(np.floor(position)), n - 1)
    upper = min(lower + 1, n - 1)
    gamma = position - lower if position < n - 1 else 0.0
    a, c = ordered[:, lower], ordered[:, upper]
    diff = c - a
    s = a + diff * gamma if gamma < 0.5 else c - diff * (1 - gamma)
    s = xp.reshape(xp.maximum(s, 1.0), (b, *(1,) * (ndim - 1)))
    return xp.minimum(xp.maximum(x0, -s), s) / s


def noise_source(noise: Iterable[np.ndarray] | None, rng: np.random.Generator | None, shape, what: str, xp=np):
    """A function ``draw(i)`` returning the next per-step noise array: from ``noise`` if given, else ``rng``
    (always a numpy generator: the same numbers on every namespace), as an array of ``xp`` (uploaded if it is
    not one already; ``device_loop.NoisePrefetch`` draws and uploads a step ahead)."""
    shape = tuple(shape)
    to_xp = (lambda z: np.asarray(z, dtype=np.float32)) if xp is np else (lambda z: xp.asarray(z, dtype=xp.float32))
    if noise is not None:
        it = iter(noise)

        def draw(i):
            try:
                z = next(it)
            except StopIteration:
                raise ValueError(f"{what}: `noise` ran out at step {i}; it needs one array per step") from None
            z = to_xp(z)
            if tuple(z.shape) != shape:
                raise ValueError(f"{what}: noise for step {i} has shape {tuple(z.shape)}, expected {shape}")
            return z

        return draw
    rng = rng if rng is not None else np.random.default_rng()
    if xp is np:
        return lambda i: rng.standard_normal(shape, dtype=np.float32)
    return lambda i: to_xp(rng.standard_normal(shape, dtype=np.float32))


def start(x: np.ndarray, betas: np.ndarray, cond):
    """A stepper's arguments checked and typed: ``x`` float32 5-d (not copied), float64 betas (host), float32
    cond; ``x`` and ``cond`` in ``x``'s namespace (``array_namespace``: a numpy cond is uploaded beside a device
    ``x``)."""
    xp = array_namespace(x)
    if xp is np:
        x = np.asarray(x, dtype=np.float32)  # no copy: nothing writes into x (the caller's noise stays untouched)
    else:
        x = xp.asarray(x, dtype=xp.float32)
    if x.ndim != 5:
        raise ValueError(f"x must be (b, c, f, h, w), got shape {tuple(x.shape)}")
    if cond is not None:
        cond = np.asarray(cond, dtype=np.float32) if xp is np else xp.asarray(cond, dtype=xp.float32)
    return x, np.asarray(betas, dtype=np.float64), cond


def check_order(order) -> None:
    if not isinstance(order, (int, np.integer)) or isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
