"""runtime.unipc_multistep against diffusers' UniPCMultistepScheduler: full loops on diffusers' scheduler-test model
``sample * t / (t + 1)``, the seed's cosine betas, every order, both B(h) variants, every spacing.

Settings that correspond (diffusers' UniPC has no ``clip_sample``): ``thresholding=False`` is
``clip_denoised=False``; ``thresholding=True, sample_max_value=1.0`` is the seed's static clamp to [-1, 1]
(diffusers' ``s = clamp(quantile, 1, sample_max_value)`` is then 1); ``thresholding=True,
dynamic_thresholding_ratio=p, sample_max_value=1e9`` is the seed's dynamic thresholding at percentile ``p``
(``s = max(quantile_p |x0|, 1)``, unbounded above). diffusers thresholds the data prediction in
``convert_model_output``, before both UniC and UniP, as ``unipc`` clips it; ``predict_x0=True``,
``lower_order_final=True`` and ``final_sigmas_type="zero"`` (its defaults) are what ``unipc``
implements.
"""

import numpy as np
import pytest
import torch

from vdeploy.runtime import schedule, unipc
from vdeploy.runtime.unipc_multistep import unipc_steps

from reference_tolerance import assert_matches_reference
from test_runtime_samplers import dummy, start_noise

CLIPS = {
    "none": ({"clip_denoised": False}, {"thresholding": False}),
    "static": ({}, {"thresholding": True, "sample_max_value": 1.0}),
    "dynamic": ({"dynamic_thres_percentile": 0.9},
                {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1e9}),
}


def diffusers_unipc(x, betas, steps, timesteps, dtype=torch.float32, **config):
    """diffusers' loop; returns its final sample and the data prediction it formed at the last step.

    diffusers casts ``trained_betas`` to float32 and multiplies them up in float32, where ``1 - abar_0``
    (~4e-5) keeps three digits; the seed forms ``abar`` in float64, so diffusers gets that one before
    ``set_timesteps`` derives its sigmas from it (in float64, cast to float32, as ``unipc`` does). Its UniPC
    takes no ``timesteps=``: given ``timesteps`` replace its own, with the sigmas its ``set_timesteps``
    computes for integer timesteps, ``sqrt((1 - abar) / abar)``, then 0.
    """
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(num_train_timesteps=len(betas), trained_betas=betas, **config)
    scheduler.alphas_cumprod = torch.from_numpy(np.cumprod(1 - betas))
    scheduler.set_timesteps(steps)
    if timesteps is not None:
        abar = scheduler.alphas_cumprod
        sigmas = (((1 - abar) / abar) ** 0.5).numpy()[timesteps]
        scheduler.timesteps = torch.from_numpy(np.asarray(timesteps, dtype=np.int64))
        scheduler.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
    sample = torch.from_numpy(x).to(dtype)
    for t in scheduler.timesteps:
        eps = torch.from_numpy(dummy(sample.numpy(), np.full(x.shape[0], int(t)), None)).to(dtype)
        sample = scheduler.step(eps, t, sample).prev_sample
    return sample.numpy(), scheduler.model_outputs[-1].numpy(), scheduler.timesteps.numpy()


# Tolerances: tests/reference_tolerance.py, from diffusers' own float32 round-off measured in the same test.
# Where it is large: at t = 999, x0 = (x - sigma eps) / alpha with 1 / alpha ~ 3e4 cancels ~3 digits (in
# diffusers as here), bh1's B(h) = h weights x0 differences ~3x more than bh2's e^h - 1 at these step sizes
# (h ~ 3), and logsnr's first steps (999, 998, 997, 996, 986: step ratios up to ~7) make the third-order
# extrapolation weights large; the measurement carries each of them.


@pytest.mark.parametrize("steps, spacing", [(10, "trailing"), (10, "linspace"), (10, "leading"), (10, "logsnr"),
                                            (25, "trailing"), (25, "logsnr")])
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc_matches_diffusers(variant, order, clip, steps, spacing):
    betas = schedule.cosine_beta_schedule(1000)
    x = start_noise()
    ours_kwargs, their_kwargs = CLIPS[clip]
    ours = unipc(dummy, x, betas, steps=steps, order=order, variant=variant, spacing=spacing, **ours_kwargs)
    # diffusers' own "linspace"/"leading" for its multistep schedulers space steps + 1 points and drop
    # t = 0, unlike its DDIMScheduler's, which respace follows; it has no "logsnr" (its use_lu_lambdas
    # feeds the solver the fractional lambdas, not those of the timesteps the model sees): it gets
    # respace's timesteps instead
    timesteps = schedule.respace(1000, steps, spacing, betas=betas)
    runs = {}

    def reference(dtype, which):
        if dtype not in runs:
            runs[dtype] = diffusers_unipc(
                x, betas, steps, None if spacing == "trailing" else timesteps, dtype, solver_order=order,
                solver_type=variant, timestep_spacing="trailing", **their_kwargs,
            )
        return runs[dtype][which]

    np.testing.assert_array_equal(reference(torch.float32, 2), timesteps)
    assert ours.dtype == np.float32
    # the last step (to sigma = 0) is first order and returns that step's x0 under any B(h); diffusers'
    # bh1 turns it into NaN there (B(h) = -inf times an empty correction), so compare with its x0
    assert_matches_reference(ours, lambda dtype: reference(dtype, 1), steps)
    if variant == "bh2":  # and with its final sample
        assert_matches_reference(ours, lambda dtype: reference(dtype, 0), steps)


def test_unipc_orders_and_variants_differ_beyond_the_tolerance():
    """The comparison above can tell them apart: each order and variant changes the result by far more."""
    betas = schedule.cosine_beta_schedule(1000)
    runs = {(o, v): unipc(dummy, start_noise(), betas, steps=10, order=o, variant=v)
            for o in (1, 2, 3) for v in ("bh1", "bh2")}
    keys = list(runs)
    gaps = [np.abs(runs[a] - runs[b]).max() for i, a in enumerate(keys) for b in keys[i + 1:]]
    assert min(gaps) > 1e-3


def test_unipc_calls_the_denoiser_once_per_step_at_the_training_timesteps():
    seen = []

    def denoise(x, t, cond):
        assert x.dtype == np.float32 and t.dtype == np.int64 and cond.shape == (2, 5)
        seen.append(int(t[0]))
        return dummy(x, t, cond)

    betas = schedule.cosine_beta_schedule(1000)
    infos = []
    unipc(denoise, start_noise(), betas, steps=12, order=3, cond=np.ones((2, 5), np.float32), callback=infos.append)
    assert seen == schedule.respace(1000, 12).tolist()
    assert [i["i"] for i in infos] == list(range(12))


def test_one_step_returns_the_first_clipped_x0():
    betas = schedule.cosine_beta_schedule(100)
    x = start_noise()
    infos = []
    out = unipc(dummy, x, betas, steps=1, callback=infos.append)
    assert np.array_equal(out, infos[0]["x0"]) and np.abs(out).max() <= 1


@pytest.mark.parametrize("kwargs, message", [
    ({"order": 4}, "order must be 1, 2 or 3"),
    ({"order": 2.0}, "order must be 1, 2 or 3"),
    ({"variant": "bh3"}, "variant must be one of bh1, bh2"),
    ({"steps": 0}, "steps must be"),
])
def test_unipc_rejects_bad_options_when_the_machine_is_made(kwargs, message):
    with pytest.raises(ValueError, match=message):
        unipc_steps(start_noise(), schedule.cosine_beta_schedule(100), **kwargs)
