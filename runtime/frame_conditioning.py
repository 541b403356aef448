"""Frame conditioning as a wrapper over the step machines: image-to-video, continuation, in-filling.

An unconditionally trained video model samples a video whose known frames are given (Ho et al. 2022, "Video
Diffusion Models", §3.1) by two training-free methods, both here for every sampler of ``SAMPLERS`` with no
per-sampler code:

* **replacement**: before every denoiser call at timestep ``t`` the known frames of the sample are replaced
  by a fresh draw of their forward-diffused version ``q(x_t | x0_known) = N(sqrt(abar_t) x0, (1 - abar_t) I)``
  (equivalently: after each step, at the next step's level). The wrapper writes into the machine's
  requested ``x`` in place: a machine continues from the array it yielded, so the edit is what it steps
  from; the unknown frames see the known ones only through the denoiser.
* **resampling** (RePaint, Lugmayr et al. 2022, Algorithm 1, with jump length 1): after step ``t_i -> t_{i+1}``
  (known frames replaced at ``t_{i+1}``) the sample jumps back, ``x_{t_i} ~ q(x_{t_i} | x_{t_{i+1}})`` with
  fresh noise, and the step is redone, ``resample`` times per step (not after the last step), so the
  unknown frames are harmonised with the known ones: ``1 + resample`` denoiser calls per step. The redo
  needs the sampler's single step from any level to the next (its table entry's ``level_step``, the same
  arithmetic its machine steps with): ddpm's posterior sample and ddim's update, between training levels
  ``abar_t -> abar_s``. Multistep samplers (dpmpp,
  dpmpp3m, unipc) carry a history that a jump back would invalidate: replacement only for them.

A model trained with masked frame conditioning (config ``frame_conditioning``, MCVD-style: Voleti et al. 2022)
takes the known frames and a per-frame mask as graph inputs. The **trained** method (``trained=True``) is
replacement plus those inputs on every request (``StepRequest.inputs``: ``frames`` in [-1, 1], zeros where
unknown, and ``mask`` float32 ``(b, f)``), so the sample's known frames are what the model saw in training (the
forward-diffused truth) and the model itself conditions on the clean ones.

Levels come from the requests: every request carries the training timestep ``t`` (also for respaced
samplers, whose respaced chain has ``abar`` of the training timesteps), so ``q(x_t | x0)`` is read from the
training ``abar`` and nothing per sampler is needed for replacement. After the last step the known frames of
the result are set to the given frames exactly.

Randomness: one array shaped like ``x`` per draw, from explicit ``known_noise`` or ``rng``, in this order per step
``i``: the replacement at ``t_i``; then per resampling round: the replacement at ``t_{i+1}``, the jump, the
redone step's own noise (ddpm; ddim with ``eta > 0``). The wrapped machine's own per-step noise comes from its
own ``noise``/``rng`` as without conditioning.

The machine's ``callback`` runs after its own steps only (not after redone ones), and the ``x`` it was given
is the array the wrapper then edits (known frames replaced, resampled): copy it in a callback that keeps it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace as with_fields

import numpy as np

from .samplers import SAMPLERS, sampler_spec
from .steps import Machine, StepRequest, array_namespace, noise_source, to_host


def generation_inputs(x: np.ndarray) -> dict[str, np.ndarray]:
    """A frame-conditioned graph's ``frames``/``mask`` for rows of ``x`` that know no frame (plain generation)."""
    b, _, f = x.shape[:3]
    return {"frames": np.zeros_like(x), "mask": np.zeros((b, f), np.float32)}


def frame_feeds(graph, where) -> Callable[[np.ndarray, dict], dict]:
    """``(x, {"frames", "mask"} or {}) -> feeds`` of a denoiser graph's frame-conditioning inputs (found by role):
    as given, zeros (plain generation) when not given; a graph without them (a model not trained with frame
    conditioning, ``where``) refuses them with a ValueError."""
    frames_spec, mask_spec = graph.input("frames"), graph.input("mask")
    if frames_spec is None:
        def refuse(x, inputs):
            if inputs:
                raise ValueError(f"{where} was not trained with frame conditioning: its graph takes no "
                                 f"{', '.join(sorted(inputs))}")
            return {}
        return refuse

    def feeds(x, inputs):
        unknown = sorted(set(inputs) - {"frames", "mask"})
        if unknown:
            raise ValueError(f"unknown denoiser input(s) {', '.join(unknown)} (frames, mask)")
        given = inputs if set(inputs) == {"frames", "mask"} else {**generation_inputs(x), **inputs}
        return {frames_spec.name: given["frames"], mask_spec.name: given["mask"]}

    return feeds


def resamplers() -> list[str]:
    """The samplers whose step can be redone from any level (a ``level_step`` in their table entry): RePaint
    resampling is offered for these."""
    return [name for name, spec in SAMPLERS.items() if spec.level_step is not None]


def known_frames(frames, known_mask, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Validate the given frames and place them: ``(x0, mask)`` for ``conditioned_steps``.

    Args:
        frames: the known frames in [0, 1] (float, or uint8 0-255), ``(c, k, h, w)`` or ``(b, c, k, h, w)``
            (one row is used for every video). Without ``known_mask`` they are the first ``k`` frames
            (``1 <= k < f``); with it they are a full ``f``-frame video of which only the masked frames count.
        known_mask: None, or booleans ``(f,)`` or ``(b, f)``: which frames are known (at least one, not all).
        shape: ``(b, c, f, h, w)`` of the sample.

    Returns:
        ``x0``: float32 ``(b, c, f, h, w)`` in [-1, 1] (zeros where unknown); ``mask``: bool ``(b, 1, f, 1, 1)``.

    Raises:
        ValueError: shapes, sizes, frame counts or values that cannot be used; the message says which.
    """
    b, c, f, h, w = shape
    a = np.asarray(frames)
    if a.ndim == 4:
        a = a[None]
    if a.ndim != 5:
        raise ValueError(f"frames must be (c, k, h, w) or (b, c, k, h, w), got shape {a.shape}")
    if a.shape[1] != c or a.shape[3:] != (h, w):
        raise ValueError(f"frames have {a.shape[1]} channels of {a.shape[3]}x{a.shape[4]}; this model samples "
                         f"{c} channels of {h}x{w} (shape {a.shape}, expected (b, {c}, k, {h}, {w}))")
    if a.shape[0] not in (1, b):
        raise ValueError(f"frames have {a.shape[0]} rows for {b} videos (give one row or {b})")
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255
    elif not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"frames must be floats in [0, 1] or uint8, got {a.dtype}")
    a = a.astype(np.float32)
    if not np.all(np.isfinite(a)):
        raise ValueError("frames hold NaN or Inf values")
    lo, hi = float(a.min()), float(a.max())
    if lo < 0 or hi > 1:
        raise ValueError(f"frames must be in [0, 1] (as the sampled videos are), got values in [{lo:.3g}, {hi:.3g}]")
    k = a.shape[2]
    if known_mask is None:
        if not 1 <= k < f:
            raise ValueError(f"frames has {k} frames: give 1 to {f - 1} first frames of this {f}-frame model, or a "
                             f"full {f}-frame video with known_mask (longer videos: Pipeline.extend)")
        mask = np.zeros((b, f), bool)
        mask[:, :k] = True
        a = np.concatenate([a, np.zeros((a.shape[0], c, f - k, h, w), np.float32)], axis=2)
    else:
        mask = np.asarray(known_mask)
        if mask.dtype != bool:
            raise ValueError(f"known_mask must be booleans, got {mask.dtype}")
        if mask.ndim == 1:
            mask = mask[None]
        if mask.ndim != 2 or mask.shape[1] != f or mask.shape[0] not in (1, b):
            raise ValueError(f"known_mask must be ({f},) or ({b}, {f}), got shape {np.shape(known_mask)}")
        if k != f:
            raise ValueError(f"with known_mask, frames must be a full {f}-frame video, got {k} frames")
        if not mask.any(axis=1).all() or mask.all(axis=1).any():
            raise ValueError("known_mask must mark at least one frame known and one unknown in every row")
        mask = np.broadcast_to(mask, (b, f))
    x0 = np.broadcast_to(a * 2 - 1, shape).astype(np.float32)  # upstream's normalize_img
    return x0 * mask[:, None, :, None, None], mask[:, None, :, None, None].copy()


def conditioned_steps(
    sampler: str,
    x: np.ndarray,
    betas: np.ndarray,
    *,
    known: np.ndarray,
    mask: np.ndarray,
    resample: int = 0,
    trained: bool = False,
    known_noise: Iterable[np.ndarray] | None = None,
    rng: np.random.Generator | None = None,
    **kwargs,
) -> Machine:
    """A step machine sampling with known frames: ``SAMPLERS[sampler].stepper`` wrapped (module docstring).

    Args:
        sampler: a name in ``SAMPLERS``.
        x: the starting noise x_T ``(b, c, f, h, w)`` (copied: the wrapper writes into its requests' ``x``).
        betas: the float64 training betas.
        known, mask: from ``known_frames``: the known x0 in [-1, 1] and the bool mask ``(b, 1, f, 1, 1)``.
        resample: RePaint resampling rounds per step (0: replacement only); ddpm and ddim only.
        trained: also give the denoiser the known frames and the mask on every request (the trained method,
            for a model exported with ``frames``/``mask`` inputs).
        known_noise, rng: the conditioning's own draws (module docstring: explicit arrays, else from ``rng``);
            ``rng`` also goes to the sampler when it draws noise and has no explicit ``noise`` in ``kwargs``.
        **kwargs: the sampler's keywords (``cond``, ``steps``, ``clip_denoised``, ``callback``, ...).

    Returns:
        The machine: it yields ``StepRequest``s, takes eps by ``send`` and returns the final x0 (float32),
        whose known frames equal ``known``.

    Raises:
        ValueError: bad shapes, ``resample`` for a multistep sampler, or the sampler's own argument errors.
    """
    spec = sampler_spec(sampler)
    if not isinstance(resample, (int, np.integer)) or isinstance(resample, bool) or resample < 0:
        raise ValueError(f"resample must be an integer >= 0, got {resample!r}")
    if resample and spec.level_step is None:
        raise ValueError(f"resample (RePaint) needs a single-step sampler ({', '.join(resamplers())}); {sampler!r} "
                         "is multistep: use resample=0 (replacement) with it")
    xp = array_namespace(x)  # numpy; or a device namespace (known frames and mask uploaded beside x)
    if xp is np:
        x = np.array(x, dtype=np.float32)  # a copy: the requests' x are written in place
        known = np.asarray(known, dtype=np.float32)
        mask = np.asarray(mask, dtype=bool)
    else:
        x = xp.asarray(x, dtype=xp.float32, copy=True)
        known = xp.asarray(known, dtype=xp.float32)
        mask = xp.asarray(mask, dtype=xp.bool)
    if x.ndim != 5 or tuple(known.shape) != tuple(x.shape) or tuple(mask.shape) != (x.shape[0], 1, x.shape[2], 1, 1):
        raise ValueError(f"known must be shaped like x {tuple(x.shape)} and mask (b, 1, f, 1, 1); got "
                         f"{tuple(known.shape)}, {tuple(mask.shape)}")
    if spec.draws_noise and kwargs.get("noise") is None:
        kwargs.setdefault("rng", rng)
    machine = spec.stepper(x, betas, **kwargs)  # bad sampler arguments raise here, before any step
    draw = noise_source(known_noise, rng, x.shape, "conditioning", xp)
    abar = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    inputs = None
    if trained:
        b, _, f = x.shape[:3]
        flat = xp.reshape(mask, (b, f))
        inputs = {"frames": known, "mask": flat.astype(np.float32) if xp is np else xp.astype(flat, xp.float32)}
    return _conditioned(machine, abar, known, mask, int(resample), spec.level_step, draw, kwargs, inputs, xp)


def _conditioned(machine, abar, known, mask, resample, redo, draw_at, kwargs, inputs, xp=np) -> Machine:
    b = known.shape[0]
    draws = [0]

    def draw():
        draws[0] += 1
        return draw_at(draws[0] - 1)

    def level(t):  # float64 abar per row, on the host (the levels' tables are host tables)
        return abar[to_host(t)].reshape(b, 1, 1, 1, 1)

    def mix(a_known, known_part, a_noise, noise_part):
        """``(a_known * known_part + a_noise * noise_part)`` in float64, as float32, in ``xp``."""
        if xp is np:
            return (a_known * known_part + a_noise * noise_part).astype(np.float32)
        a_known, a_noise = xp.asarray(a_known), xp.asarray(a_noise)  # float64 per row, uploaded
        return xp.astype(a_known * known_part + a_noise * noise_part, xp.float32)

    def put(x, value):  # x[mask] <- value, in place (the machine steps from this very array)
        if xp is np:
            np.copyto(x, value, where=mask)
        else:
            x[...] = xp.where(mask, value, x)

    def replace(x, t):
        # known frames <- q(x_t | x0_known) = sqrt(abar_t) x0 + sqrt(1 - abar_t) z, written into the request's x
        a = level(t)
        put(x, mix(np.sqrt(a), known, np.sqrt(1 - a), draw()))

    def ask(request):  # the trained method's graph inputs ride on every request; the same x array
        return with_fields(request, inputs=inputs) if inputs is not None else request

    request = next(machine)
    while True:
        replace(request.x, request.t)
        eps = yield ask(request)
        try:
            following = machine.send(eps)
        except StopIteration as done:
            if xp is not np:
                return xp.where(mask, known, xp.asarray(done.value, dtype=xp.float32))
            x0 = np.array(done.value, dtype=np.float32)
            np.copyto(x0, known, where=mask)
            return x0
        a_t, a_s = level(request.t), level(following.t)
        for _ in range(resample):
            # RePaint: known at t_{i+1}, jump back x_{t_i} ~ q(x_{t_i} | x_{t_{i+1}}), redo step t_i -> t_{i+1}
            replace(following.x, following.t)
            x = mix(np.sqrt(a_t / a_s), following.x, np.sqrt(1 - a_t / a_s), draw())
            eps = yield StepRequest(x, request.t, request.cond, request.i, inputs)
            eps = np.asarray(eps, dtype=np.float32) if xp is np else xp.asarray(eps, dtype=xp.float32)
            following.x[...] = redo(x, eps, a_t, a_s, draw, **kwargs)
        request = following
