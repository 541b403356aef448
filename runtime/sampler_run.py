"""``SamplerRun``: one sampling run set up once — sampler, steps, options, spacing, guidance, clipping and
dynamic thresholding, prediction type, frame conditioning — and stepped by whoever drives it: ``Pipeline``
(``drive`` with its denoiser), the serving batcher (its rows batched with other runs'), and parity, which
steps a twin of the same run (``RunPlan.machine`` from other noise) around the torch model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from .frame_conditioning import conditioned_steps
from .samplers import sampler_kwargs, sampler_spec
from .steps import Machine

# how known frames condition a run (``Pipeline.__call__``'s ``conditioning``); "auto" picks "trained" where it exists
CONDITIONING = ("auto", "trained", "replacement")


def finish(x0: np.ndarray) -> np.ndarray:
    """A run's final x0 in [-1, 1] -> the video in [0, 1] (upstream's ``unnormalize_img``)."""
    return np.clip((x0 + 1) * 0.5, 0.0, 1.0)


@dataclass(frozen=True)
class RunPlan:
    """What a sampling run is, resolved once, without its randomness: ``machine`` makes its step machine from a
    starting noise and the run's noise sources.

    Attributes:
        sampler, steps: the table entry's name and the number of steps.
        kwargs: the stepper's keywords beyond noise: ``cond``, ``steps``, options (defaults applied),
            ``clip_denoised``, ``dynamic_thres_percentile`` (the model config's), ``prediction_type``.
        known_x0, mask: frame conditioning's known x0 in [-1, 1] and bool mask ``(b, 1, f, 1, 1)``, or None.
        method: ``"trained"`` or ``"replacement"`` with known frames, else None.
        resample: RePaint rounds per step.
    """

    sampler: str
    steps: int
    kwargs: Mapping = field(default_factory=dict)
    known_x0: np.ndarray | None = None
    mask: np.ndarray | None = None
    method: str | None = None
    resample: int = 0

    def machine(self, x: np.ndarray, betas: np.ndarray, *, noise: Iterable[np.ndarray] | None = None,
                rng: np.random.Generator | None = None, known_noise: Iterable[np.ndarray] | None = None,
                callback: Callable[[dict], None] | None = None) -> Machine:
        """The run's step machine from starting noise ``x``: ``noise``/``rng`` the sampler's per-step draws (for
        samplers that draw), ``known_noise``/``rng`` frame conditioning's."""
        draws = sampler_kwargs(self.sampler, self.steps, {}, noise=noise, rng=rng)  # refuses noise it cannot take
        kwargs = {**self.kwargs, **{k: draws[k] for k in ("noise", "rng") if k in draws}}
        if self.known_x0 is None:
            return sampler_spec(self.sampler).stepper(x, betas, callback=callback, **kwargs)
        kwargs.pop("rng", None)  # the conditioning wrapper hands the sampler the same generator
        return conditioned_steps(self.sampler, x, betas, known=self.known_x0, mask=self.mask,
                                 resample=self.resample, trained=self.method == "trained", known_noise=known_noise,
                                 rng=rng, callback=callback, **kwargs)


def plan_run(sampler: str, *, steps: int | None, timesteps: int, cond: np.ndarray | None = None,
             options: Mapping | None = None, config: Mapping | None = None, prediction_type: str = "eps",
             known_frames: tuple[np.ndarray, np.ndarray] | None = None, method: str | None = None,
             resample: int = 0) -> RunPlan:
    """Resolve a run: the sampler's steps (its ``default_steps``, else every one of ``timesteps``), its options
    checked against its table entry, clipping as upstream's ``clip_denoised`` with the config's dynamic
    thresholding, the model's prediction type, and frame conditioning (``known_frames``: the ``(x0, mask)`` pair
    of ``frame_conditioning.known_frames``, conditioned by ``method``).

    Raises:
        ValueError: an unknown sampler or an option it does not take.
    """
    spec = sampler_spec(sampler)
    num_steps = steps if steps is not None else (spec.default_steps or timesteps)
    kwargs = {"cond": cond, "clip_denoised": True, "prediction_type": prediction_type,
              **sampler_kwargs(sampler, num_steps, dict(options or {}))}
    kwargs.pop("noise", None), kwargs.pop("rng", None)
    config = config or {}
    if config.get("use_dynamic_thres"):
        kwargs["dynamic_thres_percentile"] = config.get("dynamic_thres_percentile", 0.9)
    x0, mask = known_frames if known_frames is not None else (None, None)
    return RunPlan(sampler, num_steps, kwargs, x0, mask, method if x0 is not None else None, int(resample))


@dataclass
class SamplerRun:
    """One sampling run made ready (``Pipeline.prepare``): its step machine and how to finish it.

    Attributes:
        machine: the step machine (``vdeploy.runtime.steps``: yields ``StepRequest``, is sent the denoiser output).
        plan: what the run is (``RunPlan``); ``plan.machine(...)`` makes a twin from other noise (parity).
        batch_size: videos.
        cond_scale: the guidance scale, a float.
        guidance: ``"none"``, ``"fused"`` (one call of the ``--cfg`` graph) or ``"two-calls"`` (the plain graph on
            cond and on the null embedding, combined by ``steps.combine_guidance``).
        noise: the starting noise (host float32), and ``rng`` the generator of the per-step noise, where the
            machine's draws continue: what a twin of the machine on another device starts from
            (``device_loop.sample``) without drawing the starting noise again.
    """

    machine: Machine
    plan: RunPlan
    batch_size: int
    cond_scale: float
    guidance: str
    noise: np.ndarray | None = None
    rng: np.random.Generator | None = None

    @property
    def sampler(self) -> str:
        return self.plan.sampler

    @property
    def steps(self) -> int:
        return self.plan.steps

    @property
    def conditioning(self) -> str | None:
        """How known frames condition the run (``"trained"``, ``"replacement"``), None without."""
        return self.plan.method

    finish = staticmethod(finish)
