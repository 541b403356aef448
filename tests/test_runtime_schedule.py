"""runtime.schedule: the seed's cosine betas and buffers in numpy; respacing as diffusers spaces timesteps."""

import numpy as np
import pytest

try:  # torch must be imported before conftest.load_reference stubs torchvision: the stub answers every
    import torch  # noqa: F401  attribute, __file__ too, and torch's import-time inspect call trips on it
except ImportError:
    pass

from vdeploy.runtime import schedule

from runtime_fixtures import upstream


def test_cosine_betas_equal_the_seed_in_float64():
    vdp = upstream()
    ours = schedule.cosine_beta_schedule(1000)
    theirs = vdp.cosine_beta_schedule(1000).numpy()
    assert ours.dtype == np.float64 and theirs.dtype == np.float64
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=0)
    assert ours.max() == pytest.approx(0.9999)


def test_seed_buffers_equal_gaussian_diffusion_buffers():
    vdp = upstream()
    diffusion = vdp.GaussianDiffusion(lambda *a, **k: None, image_size=8, num_frames=2, timesteps=1000)
    ours = schedule.seed_buffers(schedule.cosine_beta_schedule(1000))
    for name, value in ours.items():
        theirs = getattr(diffusion, name).numpy()
        assert value.dtype == theirs.dtype == np.float32, name
        # same float64 maths, same cast: equal up to one float32 ulp from libm differences
        np.testing.assert_array_max_ulp(value, theirs, maxulp=1)


def test_betas_from_spec_prefers_exact_cosine_over_rounded_storage():
    exact = schedule.cosine_beta_schedule(100)
    rounded = exact.astype(np.float32).astype(np.float64).tolist()
    got = schedule.betas_from_spec({"name": "cosine", "s": 0.008, "timesteps": 100, "betas": rounded})
    assert np.array_equal(got, exact)
    other = np.linspace(1e-4, 0.02, 100)
    got = schedule.betas_from_spec({"name": "linear", "timesteps": 100, "betas": other.tolist()})
    assert np.array_equal(got, other)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"name": "cosine", "timesteps": 10, "betas": [0.1] * 9}, "9 betas but timesteps=10"),
        ({"name": "linear", "timesteps": 2, "betas": [0.1, 1.5]}, r"\[0, 1\)"),
        ({"name": "linear", "timesteps": 2}, "no betas"),
        ({"name": "linear", "timesteps": 2, "betas": "nope"}, "not a list of numbers|non-empty list"),
    ],
)
def test_betas_from_spec_rejects_bad_schedules(spec, message):
    with pytest.raises(ValueError, match=message):
        schedule.betas_from_spec(spec)


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
@pytest.mark.parametrize("steps", [1, 10, 25, 50, 1000])
def test_respace_matches_diffusers_ddim_spacing(spacing, steps):
    from diffusers import DDIMScheduler

    reference = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
    reference.set_timesteps(steps)
    ours = schedule.respace(1000, steps, spacing)
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, reference.timesteps.numpy())


def test_respace_errors():
    with pytest.raises(ValueError, match=r"steps must be an integer in \[1, 100\]"):
        schedule.respace(100, 0)
    with pytest.raises(ValueError, match="steps must be"):
        schedule.respace(100, 101)
    with pytest.raises(ValueError, match="spacing must be one of"):
        schedule.respace(100, 10, "karras")


def test_respaced_betas_keep_alphas_cumprod_of_kept_steps():
    betas = schedule.cosine_beta_schedule(1000)
    kept = schedule.respace(1000, 20)
    new = schedule.respaced_betas(betas, kept)
    np.testing.assert_allclose(np.cumprod(1 - new), np.cumprod(1 - betas)[np.sort(kept)], rtol=1e-8)


LINEAR = np.linspace(1e-4, 0.02, 1000)  # a schedule whose log-SNR has no jumps


def lu_lambdas_timesteps(betas, steps):
    """diffusers' uniform-logSNR timesteps (``use_lu_lambdas``), from the float64 abar (see test_runtime_unipc)."""
    import torch
    from diffusers import DPMSolverMultistepScheduler

    reference = DPMSolverMultistepScheduler(num_train_timesteps=len(betas), trained_betas=betas, use_lu_lambdas=True)
    reference.alphas_cumprod = torch.from_numpy(np.cumprod(1 - betas))
    reference.set_timesteps(steps)
    return reference.timesteps.numpy()


@pytest.mark.parametrize("betas, steps", [(LINEAR, 10), (LINEAR, 20), (LINEAR, 30), (schedule.cosine_beta_schedule(1000), 5)])
def test_logsnr_spacing_matches_diffusers_lu_lambdas_where_its_timesteps_are_distinct(betas, steps):
    theirs = lu_lambdas_timesteps(betas, steps)
    assert len(np.unique(theirs)) == steps
    ours = schedule.respace(1000, steps, "logsnr", betas=betas)
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("T, steps", [(1000, 10), (1000, 25), (1000, 50), (100, 20), (100, 100), (10, 7)])
def test_logsnr_spacing_is_nearest_in_lambda_and_otherwise_the_next_free_timestep(T, steps):
    """The documented rule on the seed's cosine schedule, whose clipped last beta makes lambda jump at T - 1."""
    betas = schedule.cosine_beta_schedule(T)
    lam = schedule.log_snr(betas)
    ours = schedule.respace(T, steps, "logsnr", betas=betas)
    assert ours[0] == T - 1 and ours[-1] == 0 and np.all(np.diff(ours) < 0)
    targets = np.linspace(lam[T - 1], lam[0], steps)
    nearest = np.abs(lam[None, :] - targets[:, None]).argmin(axis=1)  # brute force
    for k in range(1, steps):
        assert ours[k] == nearest[k] or ours[k] == ours[k - 1] - 1 or ours[k] == steps - 1 - k, k
        if steps - 1 - k <= nearest[k] < ours[k - 1]:
            assert ours[k] == nearest[k], f"step {k}: its nearest timestep {nearest[k]} was free"
    if steps == T:
        np.testing.assert_array_equal(ours, np.arange(T - 1, -1, -1))


def test_logsnr_spacing_pushes_colliding_targets_on_the_cosine_schedule():
    betas = schedule.cosine_beta_schedule(1000)
    lam = schedule.log_snr(betas)
    assert lam[999] < -20 and lam[998] > -13  # the jump: targets between them all map to 998 or 999
    ours = schedule.respace(1000, 25, "logsnr", betas=betas)
    assert ours[:11].tolist() == list(range(999, 988, -1))
    assert len(lu_lambdas_timesteps(betas, 25)) > len(np.unique(lu_lambdas_timesteps(betas, 25)))  # diffusers repeats


def test_logsnr_spacing_errors():
    with pytest.raises(ValueError, match="needs the betas"):
        schedule.respace(100, 10, "logsnr")
    with pytest.raises(ValueError, match="needs 100 betas"):
        schedule.respace(100, 10, "logsnr", betas=schedule.cosine_beta_schedule(50))
    with pytest.raises(ValueError, match=r"steps must be an integer in \[1, 100\]"):
        schedule.respace(100, 101, "logsnr", betas=schedule.cosine_beta_schedule(100))
    assert schedule.respace(100, 1, "logsnr", betas=schedule.cosine_beta_schedule(100)).tolist() == [99]
