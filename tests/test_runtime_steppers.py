"""Step machines: every sampler as a resumable generator, driven one step at a time.

The pure functions must give today's numbers bit for bit: the reference below is a frozen copy of the
sampler math as of commit 62deca3 (before the step-machine refactor), docstrings dropped, untouched
otherwise; only the timestep selection goes through ``schedule.respace`` (which has its own tests), so that
later spacings reach it too. Numpy only: no torch here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import pytest

from vdeploy.runtime import samplers, schedule
from vdeploy.runtime.samplers import SAMPLERS, StepRequest, drive
from vdeploy.runtime.schedule import respace, respaced_betas, seed_buffers


def spacing_betas(spacing, betas):
    """The betas for spacings that need them (none before logsnr), as respace's keyword."""
    return {"betas": betas} if spacing not in ("trailing", "leading", "linspace") else {}


# ---- frozen copy of runtime/samplers.py at 62deca3 ------------------------------------------------------

def frozen_clip_x0(x0: np.ndarray, dynamic_thres_percentile: float | None = None) -> np.ndarray:
    if dynamic_thres_percentile is None:
        return np.clip(x0, -1.0, 1.0, out=x0)
    b = x0.shape[0]
    s = np.quantile(np.abs(x0).reshape(b, -1), dynamic_thres_percentile, axis=-1)
    s = np.maximum(s, 1.0).astype(x0.dtype).reshape(b, *(1,) * (x0.ndim - 1))
    np.clip(x0, -s, s, out=x0)
    x0 /= s
    return x0


def frozen_noise_source(noise: Iterable[np.ndarray] | None, rng: np.random.Generator | None, shape, what: str):
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


def frozen_start(x: np.ndarray, betas: np.ndarray, cond):
    x = np.array(x, dtype=np.float32)  # a copy: the caller's starting noise stays untouched
    if x.ndim != 5:
        raise ValueError(f"x must be (b, c, f, h, w), got shape {x.shape}")
    if cond is not None:
        cond = np.asarray(cond, dtype=np.float32)
    return x, np.asarray(betas, dtype=np.float64), cond


def frozen_ddpm(
    denoise,
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
) -> np.ndarray:
    x, betas, cond = frozen_start(x, betas, cond)
    T = len(betas)
    if steps is None or steps == T:
        timesteps = np.arange(T - 1, -1, -1, dtype=np.int64)
    else:
        timesteps = respace(T, steps, spacing, **spacing_betas(spacing, betas))
        betas = respaced_betas(betas, timesteps)
    tab = seed_buffers(betas)
    # q(x_{t-1} | x_t, x0) = N(coef1 * x0 + coef2 * x_t, exp(logvar)); x0 = sqrt(1/a_t) x_t - sqrt(1/a_t - 1) eps
    recip, recipm1 = tab["sqrt_recip_alphas_cumprod"], tab["sqrt_recipm1_alphas_cumprod"]
    coef1, coef2 = tab["posterior_mean_coef1"], tab["posterior_mean_coef2"]
    std = np.exp(np.float32(0.5) * tab["posterior_log_variance_clipped"])
    draw = frozen_noise_source(noise, rng, x.shape, "ddpm")
    b = x.shape[0]
    n = len(timesteps)
    for i, t in enumerate(timesteps):
        j = n - 1 - i  # index into the (possibly respaced) chain's tables
        eps = np.asarray(denoise(x, np.full((b,), t, dtype=np.int64), cond), dtype=np.float32)
        x0 = recip[j] * x - recipm1[j] * eps
        if clip_denoised:
            frozen_clip_x0(x0, dynamic_thres_percentile)
        mean = coef1[j] * x0 + coef2[j] * x
        z = draw(i)
        x = mean + std[j] * z if j > 0 else mean  # no noise at t = 0 (the seed's nonzero_mask)
        if callback is not None:
            callback({"i": i, "t": int(t), "x": x, "x0": x0, "eps": eps})
    return x


def frozen_ddim(
    denoise,
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
) -> np.ndarray:
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    x, betas, cond = frozen_start(x, betas, cond)
    timesteps = respace(len(betas), steps, spacing, **spacing_betas(spacing, betas))
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
    draw = frozen_noise_source(noise, rng, x.shape, "ddim") if eta > 0 else None
    b = x.shape[0]
    for i, t in enumerate(timesteps):
        eps = np.asarray(denoise(x, np.full((b,), t, dtype=np.int64), cond), dtype=np.float32)
        # "predicted x0" = (x_t - sqrt(1 - alpha_t) eps) / sqrt(alpha_t)
        x0 = recip[i] * x - recipm1[i] * eps
        if clip_denoised:
            frozen_clip_x0(x0, dynamic_thres_percentile)
            eps = eps_from_x[i] * x - eps_from_x0[i] * x0
        # x_{t-1} = sqrt(alpha_{t-1}) x0 + sqrt(1 - alpha_{t-1} - sigma_t^2) eps + sigma_t z
        x = sqrt_a_prev[i] * x0 + dir_coef[i] * eps
        if draw is not None:
            x += sigma32[i] * draw(i)
        if callback is not None:
            callback({"i": i, "t": int(t), "x": x, "x0": x0, "eps": eps})
    return x


def frozen_dpmpp(
    denoise,
    x: np.ndarray,
    betas: np.ndarray,
    *,
    steps: int = 25,
    cond: np.ndarray | None = None,
    spacing: str = "trailing",
    clip_denoised: bool = True,
    dynamic_thres_percentile: float | None = None,
    callback: Callable[[dict], None] | None = None,
) -> np.ndarray:
    x, betas, cond = frozen_start(x, betas, cond)
    timesteps = respace(len(betas), steps, spacing, **spacing_betas(spacing, betas))
    alphas_cumprod = np.cumprod(1.0 - betas)[timesteps]
    # paper notation: alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t);
    # the final point t_M has alpha = 1, sigma = 0, lambda = +inf.
    alpha = np.concatenate([np.sqrt(alphas_cumprod), [1.0]])
    sigma = np.concatenate([np.sqrt(1 - alphas_cumprod), [0.0]])
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)
    h = lam[1:] - lam[:-1]  # h_i = lambda_{t_i} - lambda_{t_{i-1}}, +inf on the last step
    n = len(timesteps)
    f32 = lambda v: np.asarray(v, dtype=np.float32)  # noqa: E731
    recip, recipm1 = f32(1 / alpha[:n]), f32(sigma[:n] / alpha[:n])  # x0 = (x - sigma eps) / alpha
    ratio = f32(sigma[1:] / sigma[:n])  # sigma_{t_i} / sigma_{t_{i-1}}
    phi = f32(-alpha[1:] * np.expm1(-h))  # alpha_{t_i} (1 - e^{-h_i})
    # 2nd order: D_i = (1 + 1/(2 r_i)) x0_i - 1/(2 r_i) x0_{i-1}, r_i = h_{i-1} / h_i
    half_inv_r = np.zeros(n)
    half_inv_r[1 : n - 1] = h[1 : n - 1] / (2 * h[: n - 2])
    w_now, w_prev = f32(1 + half_inv_r), f32(-half_inv_r)
    b = x.shape[0]
    x0_prev = None  # the multistep history: the previous data prediction
    for i, t in enumerate(timesteps):
        eps = np.asarray(denoise(x, np.full((b,), t, dtype=np.int64), cond), dtype=np.float32)
        x0 = recip[i] * x - recipm1[i] * eps
        if clip_denoised:
            frozen_clip_x0(x0, dynamic_thres_percentile)
        d = x0 if x0_prev is None or w_prev[i] == 0 else w_now[i] * x0 + w_prev[i] * x0_prev
        # x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i
        x = ratio[i] * x + phi[i] * d
        x0_prev = x0
        if callback is not None:
            callback({"i": i, "t": int(t), "x": x, "x0": x0, "eps": eps})
    return x



# ---- end of the frozen copy ----------------------------------------------------------------------------

FROZEN = {"ddpm": frozen_ddpm, "ddim": frozen_ddim, "dpmpp": frozen_dpmpp}
SHAPE = (2, 3, 4, 8, 8)
T = 100
SPACINGS = schedule.SPACINGS


def dummy(x, t, cond):
    """The brief's stand-in denoiser: ``0.1 x (t + 1) / 100``, elementwise, so batching cannot change it."""
    return 0.1 * x * (t[:, None, None, None, None] + 1) / 100


def start_noise(seed=0, shape=SHAPE):
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def recorded(fn, *args, **kwargs):
    """Run a sampler, returning its result and every callback dict (arrays copied)."""
    infos = []
    out = fn(*args, callback=lambda info: infos.append({k: np.copy(v) for k, v in info.items()}), **kwargs)
    return out, infos


CLIPS = {"none": {"clip_denoised": False}, "static": {}, "dynamic": {"dynamic_thres_percentile": 0.9}}
CASES = (
    [("ddpm", {"steps": None}), ("ddpm", {"steps": 10})]
    + [("ddim", {"steps": 10}), ("ddim", {"steps": 7, "eta": 0.5}), ("ddim", {"steps": 10, "eta": 1.0})]
    + [("dpmpp", {"steps": 1}), ("dpmpp", {"steps": 2}), ("dpmpp", {"steps": 10}), ("dpmpp", {"steps": 20})]
)


@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name, options", CASES, ids=lambda v: str(v) if isinstance(v, str) else None)
def test_samplers_equal_the_frozen_math_bit_for_bit(name, options, spacing, clip):
    betas = schedule.cosine_beta_schedule(T)
    x = start_noise()
    steps = options["steps"] or T
    kwargs = {**options, "spacing": spacing, **CLIPS[clip]}
    if SAMPLERS[name].draws_noise:
        kwargs["noise"] = np.random.default_rng(1).standard_normal((steps, *SHAPE), dtype=np.float32)
    ours, our_steps = recorded(SAMPLERS[name].fn, dummy, x, betas, **kwargs)
    theirs, their_steps = recorded(FROZEN[name], dummy, x, betas, **kwargs)
    assert ours.dtype == np.float32 and np.array_equal(ours, theirs)
    assert len(our_steps) == len(their_steps) == steps
    for a, b in zip(our_steps, their_steps):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), f"step {a['i']}"


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_noise_from_an_injected_generator_is_drawn_as_before(name):
    betas = schedule.cosine_beta_schedule(T)
    kwargs = {"steps": 10, "eta": 1.0} if name == "ddim" else {}
    ours = SAMPLERS[name].fn(dummy, start_noise(), betas, rng=np.random.default_rng(7), **kwargs)
    theirs = FROZEN[name](dummy, start_noise(), betas, rng=np.random.default_rng(7), **kwargs)
    assert np.array_equal(ours, theirs)


def test_the_protocol_step_by_step():
    betas = schedule.cosine_beta_schedule(T)
    x, cond = start_noise(), np.ones((2, 5), np.float32)
    machine = samplers.dpmpp_steps(x, betas, steps=6, cond=cond)
    request = next(machine)
    assert isinstance(request, StepRequest) and request.i == 0
    assert request.x is x and request.cond is cond  # the caller's float32 arrays, not copies
    seen = []
    with pytest.raises(StopIteration) as done:
        while True:
            assert request.x.dtype == np.float32 and request.x.shape == SHAPE
            assert request.t.dtype == np.int64 and request.t.shape == (2,) and request.cond is cond
            seen.append((request.i, int(request.t[0])))
            request = machine.send(dummy(request.x, request.t, request.cond))
    assert seen == list(enumerate(respace(T, 6).tolist()))
    x0 = done.value.value  # StopIteration.value: the machine's return value
    assert x0.dtype == np.float32 and np.array_equal(x0, samplers.dpmpp(dummy, x, betas, steps=6, cond=cond))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_table_entry_has_a_stepper_that_its_function_drives(name):
    spec = SAMPLERS[name]
    betas = schedule.cosine_beta_schedule(T)
    kwargs = {"steps": 8} if spec.default_steps is not None else {}
    if spec.draws_noise:
        kwargs["rng"] = np.random.default_rng(0)
    via_fn = spec.fn(dummy, start_noise(), betas, **kwargs)
    if spec.draws_noise:
        kwargs["rng"] = np.random.default_rng(0)
    via_steps = drive(spec.stepper(start_noise(), betas, **kwargs), dummy)
    assert np.array_equal(via_fn, via_steps)


def test_machines_batched_together_equal_solo_runs_bit_for_bit():
    """A toy cross-request batcher: machines join at different step boundaries, one denoiser call per round
    over the concatenated requests, each machine gets a view of its rows. Nothing a machine was given or
    yielded may change afterwards, and every result equals its solo run exactly."""
    betas = schedule.cosine_beta_schedule(T)
    jobs = [  # (joins at round, sampler, batch rows, options)
        (0, "dpmpp", 2, {"steps": 10}),
        (0, "ddpm", 1, {"steps": 12, "rng": 3}),
        (2, "ddim", 3, {"steps": 5, "eta": 0.5, "rng": 4, "spacing": "leading"}),
        (3, "dpmpp", 1, {"steps": 7, "spacing": "linspace", "dynamic_thres_percentile": 0.8}),
        (3, "ddim", 2, {"steps": 9, "clip_denoised": False}),
        (4, "unipc", 2, {"steps": 9, "order": 3, "variant": "bh1", "spacing": "logsnr"}),
        (5, "dpmpp3m", 1, {"steps": 8, "dynamic_thres_percentile": 0.9}),
    ] + [(1, name, 1, {"steps": 6}) for name in SAMPLERS if not SAMPLERS[name].draws_noise]

    def make(k, name, rows, options):
        options = dict(options)
        if "rng" in options:
            options["rng"] = np.random.default_rng(options["rng"])
        x = start_noise(10 + k, (rows, *SHAPE[1:]))
        cond = np.full((rows, 4), k, np.float32)
        return x, cond, options

    solo = []
    for k, (_, name, rows, options) in enumerate(jobs):
        x, cond, options = make(k, name, rows, options)
        solo.append(SAMPLERS[name].fn(dummy, x, betas, cond=cond, **options))

    given, yielded, received = [], [], []  # (array, its copy when handed over)
    pending, results, waiting = {}, {}, list(enumerate(jobs))
    for round_ in range(100):
        for k, job in list(waiting):
            joins, name, rows, options = job
            if joins <= round_:
                x, cond, options = make(k, name, rows, options)
                given += [(x, x.copy()), (cond, cond.copy())]
                machine = SAMPLERS[name].stepper(x, betas, cond=cond, **options)
                pending[k] = (machine, next(machine))
                waiting.remove((k, job))
        if not pending:
            break
        order = sorted(pending)
        requests = [pending[k][1] for k in order]
        yielded += [(r.x, r.x.copy()) for r in requests]
        eps = dummy(np.concatenate([r.x for r in requests]), np.concatenate([r.t for r in requests]), None)
        eps = eps.astype(np.float32)
        received.append((eps, eps.copy()))
        start = 0
        for k, request in zip(order, requests):
            rows = request.x.shape[0]
            machine = pending[k][0]
            try:
                pending[k] = (machine, machine.send(eps[start : start + rows]))
            except StopIteration as done:
                results[k] = done.value
                del pending[k]
            start += rows
    assert not pending and not waiting and len(results) == len(jobs)
    for k in range(len(jobs)):
        assert np.array_equal(results[k], solo[k]), f"job {k} ({jobs[k][1]})"
    for array, copy in given + yielded + received:
        assert np.array_equal(array, copy), "a machine wrote into an array it was given or yielded"


def test_bad_arguments_fail_when_the_machine_is_made_bad_eps_when_sent():
    betas = schedule.cosine_beta_schedule(T)
    with pytest.raises(ValueError, match=r"eta must be a number in \[0, 1\]"):
        samplers.ddim_steps(start_noise(), betas, eta=-1.0)
    with pytest.raises(ValueError, match="steps must be"):
        samplers.dpmpp_steps(start_noise(), betas, steps=0)
    with pytest.raises(ValueError, match="spacing must be one of"):
        samplers.ddpm_steps(start_noise(), betas, steps=5, spacing="karras")
    with pytest.raises(ValueError, match=r"x must be \(b, c, f, h, w\)"):
        samplers.ddim_steps(np.zeros((3, 4, 8, 8), np.float32), betas)
    machine = samplers.ddim_steps(start_noise(), betas, steps=3)
    next(machine)
    with pytest.raises(ValueError, match=r"step 0: eps has shape \(1, 3, 4, 8, 8\)"):
        machine.send(np.zeros((1, 3, 4, 8, 8), np.float32))


def test_a_denoiser_error_propagates_through_drive():
    def broken(x, t, cond):
        raise StopIteration("not the machine's end")  # must not be taken for the machine finishing

    with pytest.raises(StopIteration, match="not the machine"):
        drive(samplers.ddim_steps(start_noise(), schedule.cosine_beta_schedule(T), steps=3), broken)
