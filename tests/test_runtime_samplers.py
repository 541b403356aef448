"""runtime.samplers against references: the seed's p_sample_loop (step for step, the noise torch drew),
diffusers' DDIM / DPM-Solver++ / DDPM schedulers fed the same betas, and upstream forward_with_cond_scale."""

import numpy as np
import pytest
import torch

from vdeploy.runtime import samplers, schedule

from reference_tolerance import assert_matches_reference
from runtime_fixtures import COND_DIM, numpy_denoiser, tiny_unet, torch_threads, upstream

SHAPE = (2, 3, 4, 8, 8)


class CheapDenoiser(torch.nn.Module):
    """A deterministic stand-in denoiser: a spatial conv plus a timestep-dependent scale of x."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv3d(3, 3, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x, time, cond=None, **kwargs):
        scale = (time.float() / (time.float() + 1)).view(-1, 1, 1, 1, 1)
        return torch.tanh(self.conv(x)) * 0.5 + x * scale

    def forward_with_cond_scale(self, x, time, cond=None, cond_scale=1.0):
        return self.forward(x, time, cond)


def dummy(x, t, cond):
    """diffusers' scheduler-test model, ``sample * t / (t + 1)``."""
    tt = t.reshape(-1, 1, 1, 1, 1).astype(np.float32)
    return x * tt / (tt + 1)


def run_upstream_loop(diffusion, shape, monkeypatch, cond=None, cond_scale=1.0):
    """Run the seed's p_sample_loop, recording its starting noise, per-step noise and per-step samples."""
    start, drawn, steps = [], [], []
    real_randn, real_randn_like = torch.randn, torch.randn_like

    def randn(*args, **kwargs):
        z = real_randn(*args, **kwargs)
        start.append(z.clone())
        return z

    def randn_like(x, *args, **kwargs):
        z = real_randn_like(x, *args, **kwargs)
        drawn.append(z.clone())
        return z

    monkeypatch.setattr(torch, "randn", randn)
    monkeypatch.setattr(torch, "randn_like", randn_like)
    p_sample = diffusion.p_sample

    def recording_p_sample(*args, **kwargs):
        out = p_sample(*args, **kwargs)
        steps.append(out.clone())
        return out

    monkeypatch.setattr(diffusion, "p_sample", recording_p_sample)
    torch.manual_seed(0)
    video = diffusion.p_sample_loop(shape, cond=cond, cond_scale=cond_scale)
    monkeypatch.undo()
    return video, start[0], drawn, steps


@pytest.mark.parametrize(
    "model, timesteps, dynamic",
    [("cheap", 1000, False), ("cheap", 1000, True), ("unet", 50, False), ("unet", 50, True)],
)
def test_ddpm_reproduces_the_seed_p_sample_loop_step_for_step(model, timesteps, dynamic, monkeypatch):
    vdp = upstream()
    with torch_threads(1):
        module = CheapDenoiser() if model == "cheap" else tiny_unet()
        diffusion = vdp.GaussianDiffusion(
            module, image_size=8, num_frames=4, timesteps=timesteps,
            use_dynamic_thres=dynamic, dynamic_thres_percentile=0.9,
        )
        video, start, drawn, torch_steps = run_upstream_loop(diffusion, SHAPE, monkeypatch)
        assert len(drawn) == timesteps  # one per step, t = 0 included (masked there)
        ours = []
        x0 = samplers.ddpm(
            numpy_denoiser(module), start.numpy(), schedule.cosine_beta_schedule(timesteps),
            noise=(z.numpy() for z in drawn), dynamic_thres_percentile=0.9 if dynamic else None,
            callback=lambda info: ours.append(info["x"]),
        )
    per_step = [np.abs(a - b.numpy()).max() for a, b in zip(ours, torch_steps)]
    assert len(per_step) == timesteps
    assert max(per_step) <= 1e-3, f"worst step {int(np.argmax(per_step))}: {max(per_step):.2e}"
    final = np.abs((x0 + 1) * 0.5 - video.numpy()).max()
    assert final <= 1e-3
    assert x0.dtype == np.float32 and np.abs(x0).max() <= 1.0


def test_ddpm_noise_contract():
    betas = schedule.cosine_beta_schedule(10)
    x = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    before = x.copy()
    with pytest.raises(ValueError, match="ran out at step 9"):
        samplers.ddpm(dummy, x, betas, noise=[np.zeros(SHAPE, np.float32)] * 9)
    with pytest.raises(ValueError, match="shape"):
        samplers.ddpm(dummy, x, betas, noise=[np.zeros((1, 3, 4, 8, 8), np.float32)] * 10)
    a = samplers.ddpm(dummy, x, betas, rng=np.random.default_rng(5))
    b = samplers.ddpm(dummy, x, betas, rng=np.random.default_rng(5))
    c = samplers.ddpm(dummy, x, betas, rng=np.random.default_rng(6))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(x, before), "the caller's starting noise must stay untouched"


def diffusers_loop(scheduler, x, steps, *, step_kwargs=None, noise=None, set_timesteps=None, dtype=torch.float32):
    """diffusers' loop on ``dummy``, the sample (and the model output, the noise) in ``dtype``."""
    x = torch.from_numpy(x).to(dtype)
    if set_timesteps is not None:
        scheduler.set_timesteps(timesteps=list(set_timesteps))
    else:
        scheduler.set_timesteps(steps)
    for i, t in enumerate(scheduler.timesteps):
        eps = torch.from_numpy(dummy(x.numpy(), np.full(x.shape[0], int(t)), None)).to(dtype)
        kwargs = dict(step_kwargs or {})
        if noise is not None:
            kwargs["variance_noise"] = torch.from_numpy(noise[i]).to(dtype)
        x = scheduler.step(eps, t, x, **kwargs).prev_sample
    return x.numpy(), scheduler.timesteps.numpy()


def seed_abar(betas):
    """The seed's alpha-bar, formed in float64, for a diffusers scheduler.

    diffusers casts ``trained_betas`` to float32 and multiplies them up in float32, where ``1 - abar_0``
    (~4e-5) keeps three digits and abar near t = 999 is off by ~1e-4 relative: given the seed's table, the
    only difference left between it and vdeploy is float32 arithmetic, which tests/reference_tolerance.py
    measures.
    """
    return torch.from_numpy(np.cumprod(1 - betas))


def start_noise(seed=0):
    return np.random.default_rng(seed).standard_normal(SHAPE, dtype=np.float32)


# Comparisons with diffusers: tests/reference_tolerance.py derives each tolerance from diffusers' own float32
# round-off, measured in the same test (its float32 run against its float64 run). Without clipping,
# x0 = (x - sqrt(1 - a) eps) / sqrt(a) at t = 999 amplifies round-off by 1 / sqrt(a) ~ 6e4 in both; the
# measurement carries that.
def assert_close(ours, theirs, clipped):
    """Two vdeploy runs that must agree to float32 round-off of a few coefficient orders (1e-5 of the range)."""
    scale = 1.0 if clipped else np.abs(theirs).max()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=(1e-5 if clipped else 3e-4) * scale)


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("clip", ["none", "static", "dynamic"])
def test_ddim_matches_diffusers(spacing, steps, clip):
    # "linspace" is left out: diffusers' DDIM steps to t - T // steps, not to the next linspace timestep
    from diffusers import DDIMScheduler

    betas = schedule.cosine_beta_schedule(1000)
    x = start_noise()
    ours = samplers.ddim(
        dummy, x, betas, steps=steps, spacing=spacing, clip_denoised=clip != "none",
        dynamic_thres_percentile=0.9 if clip == "dynamic" else None,
    )

    def reference(dtype):
        scheduler = DDIMScheduler(
            num_train_timesteps=1000, trained_betas=betas, timestep_spacing=spacing, set_alpha_to_one=True,
            clip_sample=clip == "static", thresholding=clip == "dynamic", dynamic_thresholding_ratio=0.9,
            sample_max_value=1e9,
        )
        scheduler.alphas_cumprod = seed_abar(betas)
        return diffusers_loop(scheduler, x, steps, step_kwargs={"use_clipped_model_output": True}, dtype=dtype)[0]

    assert_matches_reference(ours, reference, steps)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_with_eta_matches_diffusers_given_the_same_noise(eta):
    from diffusers import DDIMScheduler

    betas = schedule.cosine_beta_schedule(1000)
    x = start_noise()
    noise = np.random.default_rng(1).standard_normal((20, *SHAPE), dtype=np.float32)
    ours = samplers.ddim(dummy, x, betas, steps=20, eta=eta, noise=noise)

    def reference(dtype):
        scheduler = DDIMScheduler(
            num_train_timesteps=1000, trained_betas=betas, timestep_spacing="trailing", clip_sample=True
        )
        scheduler.alphas_cumprod = seed_abar(betas)
        return diffusers_loop(scheduler, x, 20, step_kwargs={"use_clipped_model_output": True, "eta": eta},
                              noise=noise, dtype=dtype)[0]

    # the noisy trajectory re-derives eps from a clipped x0 through 1 / sqrt(1 - a_t) (~12 at the last
    # step), in diffusers' round-off as in ours: the measured tolerance carries it
    assert_matches_reference(ours, reference, 20)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize("clip", ["none", "static", "dynamic"])
def test_dpmpp_matches_diffusers_dpmsolver_multistep(steps, clip, order):
    # diffusers has no clip_sample here: thresholding=True with sample_max_value=1 is the seed's clamp, with
    # dynamic_thresholding_ratio=p and sample_max_value=1e9 its dynamic thresholding. Under 15 steps its
    # lower_order_final caps the step before the last at 2nd order: steps 10 take that path, 20 and 50 not.
    from diffusers import DPMSolverMultistepScheduler

    betas = schedule.cosine_beta_schedule(1000)
    x = start_noise()
    ours = samplers.dpmpp(
        dummy, x, betas, steps=steps, order=order, clip_denoised=clip != "none",
        dynamic_thres_percentile=0.9 if clip == "dynamic" else None,
    )

    def reference(dtype):
        scheduler = DPMSolverMultistepScheduler(
            num_train_timesteps=1000, trained_betas=betas, algorithm_type="dpmsolver++", solver_order=order,
            timestep_spacing="trailing", thresholding=clip != "none", dynamic_thresholding_ratio=0.9,
            # sample_max_value=1 turns diffusers' thresholding into the seed's static clamp
            sample_max_value=1.0 if clip == "static" else 1e9,
        )
        scheduler.alphas_cumprod = seed_abar(betas)
        theirs, timesteps = diffusers_loop(scheduler, x, steps, dtype=dtype)
        np.testing.assert_array_equal(timesteps, schedule.respace(1000, steps))
        return theirs

    assert_matches_reference(ours, reference, steps)


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "logsnr"])
def test_dpmpp_other_spacings_match_diffusers_given_the_timesteps(spacing, steps, order):
    # (diffusers' own leading/linspace for this scheduler space steps + 1 points and drop t = 0.) These end
    # at t = 0, where diffusers' float32 abar (1 - abar_0 ~ 4e-5 keeps three digits) moves sigma by ~1e-3:
    # it gets the seed's float64 abar, from which it derives its float32 sigmas as we do.
    from diffusers import DPMSolverMultistepScheduler

    betas = schedule.cosine_beta_schedule(1000)
    x = start_noise()
    ours = samplers.dpmpp(dummy, x, betas, steps=steps, spacing=spacing, order=order)

    def reference(dtype):
        scheduler = DPMSolverMultistepScheduler(
            num_train_timesteps=1000, trained_betas=betas, algorithm_type="dpmsolver++", solver_order=order,
            thresholding=True, sample_max_value=1.0,
        )
        scheduler.alphas_cumprod = seed_abar(betas)
        timesteps = schedule.respace(1000, steps, spacing, betas=betas)
        return diffusers_loop(scheduler, x, steps, set_timesteps=timesteps, dtype=dtype)[0]

    assert_matches_reference(ours, reference, steps)


@pytest.mark.parametrize("clip", [True, False])
def test_first_order_dpmpp_is_ddim(clip):
    betas = schedule.cosine_beta_schedule(1000)
    ours = samplers.dpmpp(dummy, start_noise(), betas, steps=10, order=1, clip_denoised=clip)
    ddim = samplers.ddim(dummy, start_noise(), betas, steps=10, clip_denoised=clip)
    assert_close(ours, ddim, clip)


@pytest.mark.parametrize("spacing", ["trailing", "logsnr"])
def test_respaced_ddpm_matches_diffusers_ddpm_scheduler(spacing, monkeypatch):
    from diffusers import DDPMScheduler
    from diffusers.schedulers import scheduling_ddpm

    betas = schedule.cosine_beta_schedule(1000)
    x = start_noise()
    noise = np.random.default_rng(2).standard_normal((25, *SHAPE), dtype=np.float32)
    ours = samplers.ddpm(dummy, x, betas, steps=25, spacing=spacing, noise=noise)

    def reference(dtype):
        it = iter(noise)
        monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: torch.from_numpy(next(it)).to(dtype))
        scheduler = DDPMScheduler(
            num_train_timesteps=1000, trained_betas=betas, timestep_spacing="trailing", clip_sample=True,
            variance_type="fixed_small",
        )
        # diffusers has no logsnr spacing: it gets respace's timesteps (custom timesteps step to the next
        # one). logsnr spends its first steps at t = 999..989, where diffusers' float32 abar (float32 betas
        # multiplied up in float32) is off by ~1e-4: it gets the seed's float64 abar
        scheduler.alphas_cumprod = seed_abar(betas)
        custom = schedule.respace(1000, 25, spacing, betas=betas) if spacing != "trailing" else None
        return diffusers_loop(scheduler, x, 25, set_timesteps=custom, dtype=dtype)[0]

    assert_matches_reference(ours, reference, 25)


def test_full_ddpm_equals_ddpm_with_all_steps():
    betas = schedule.cosine_beta_schedule(20)
    x = start_noise()
    noise = np.random.default_rng(3).standard_normal((20, *SHAPE), dtype=np.float32)
    np.testing.assert_array_equal(
        samplers.ddpm(dummy, x, betas, noise=noise), samplers.ddpm(dummy, x, betas, steps=20, noise=noise)
    )


@pytest.mark.parametrize("sampler", [samplers.ddim, samplers.dpmpp])
def test_few_step_samplers_call_the_denoiser_once_per_step_with_training_timesteps(sampler):
    seen = []

    def denoise(x, t, cond):
        assert x.dtype == np.float32 and t.dtype == np.int64 and t.shape == (x.shape[0],)
        assert cond is not None and cond.shape == (2, 5)
        seen.append(int(t[0]))
        return dummy(x, t, cond)

    infos = []
    sampler(denoise, start_noise(), schedule.cosine_beta_schedule(1000), steps=20,
            cond=np.ones((2, 5), np.float32), callback=infos.append)
    assert seen == schedule.respace(1000, 20).tolist()
    assert [i["i"] for i in infos] == list(range(20)) and set(infos[0]) == {"i", "t", "x", "x0", "eps"}


@pytest.mark.parametrize("cond_scale", [1.0, 2.5])
def test_guidance_equals_upstream_forward_with_cond_scale(cond_scale):
    with torch_threads(1):
        unet = tiny_unet(COND_DIM)
        x = torch.randn(2, 3, 4, 8, 8)
        t = torch.tensor([7, 7])
        cond = torch.randn(2, COND_DIM)
        with torch.inference_mode():
            reference = unet.forward_with_cond_scale(x, t, cond=cond, cond_scale=cond_scale).numpy()
        calls = []
        plain = numpy_denoiser(unet)

        def counting(x, t, cond):
            calls.append(cond.copy())
            return plain(x, t, cond)

        denoise = samplers.guided(counting, unet.null_cond_emb.detach().numpy(), cond_scale)
        ours = denoise(x.numpy(), t.numpy(), cond.numpy())
    assert len(calls) == (1 if cond_scale == 1 else 2)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6)


def test_guided_ddpm_loop_equals_the_seed_loop_with_cond_scale(monkeypatch):
    vdp = upstream()
    with torch_threads(1):
        unet = tiny_unet(COND_DIM)
        diffusion = vdp.GaussianDiffusion(unet, image_size=8, num_frames=4, timesteps=20)
        cond = torch.randn(2, COND_DIM)
        video, start, drawn, _ = run_upstream_loop(diffusion, SHAPE, monkeypatch, cond=cond, cond_scale=3.0)
        denoise = samplers.guided(numpy_denoiser(unet), unet.null_cond_emb.detach().numpy(), 3.0)
        x0 = samplers.ddpm(denoise, start.numpy(), schedule.cosine_beta_schedule(20), cond=cond.numpy(),
                           noise=[z.numpy() for z in drawn])
    assert np.abs((x0 + 1) * 0.5 - video.numpy()).max() <= 1e-3
