"""v-prediction and Min-SNR weighting (issue 22): opt-in config keys, the torch training/sampling path, and
the runtime's one conversion point (``steps.to_eps_x0``) against torch's, through every sampler's parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export_fixtures import TINY_EXPORT_CONFIG, Exported, single_thread_torch, tiny_unet, write_vdeploy_checkpoint
from vdeploy import config as C
from vdeploy.diffusion import GaussianDiffusion
from vdeploy.model import Unet3D
from vdeploy.runtime.steps import to_eps_x0

single_thread_torch()
TINY = {"dim": 8, "dim_mults": [1, 2], "attn_heads": 2, "attn_dim_head": 8, "image_size": 16, "num_frames": 4,
        "timesteps": 20}


def _diffusion(**keys):
    cfg = C.resolve({**TINY, **keys})
    torch.manual_seed(0)
    return GaussianDiffusion(Unet3D(**C.unet_kwargs(cfg)), **C.diffusion_kwargs(cfg))


def test_defaults_are_the_seeds_and_new_keys_are_checked():
    cfg = C.resolve(dict(TINY))
    assert (cfg["prediction_type"], cfg["loss_weighting"], cfg["min_snr_gamma"]) == ("eps", "none", 5.0)
    # the seed's GaussianDiffusion takes the kwargs of a default config: no vdeploy-only keys in them
    assert set(C.diffusion_kwargs(cfg)) == {"channels", *C.DIFFUSION_DEFAULTS}
    v = C.resolve({**TINY, "prediction_type": "v", "loss_weighting": "min_snr"})
    assert C.diffusion_kwargs(v)["prediction_type"] == "v" and C.diffusion_kwargs(v)["loss_weighting"] == "min_snr"
    for bad, msg in [({"prediction_type": "x0"}, "prediction_type"), ({"loss_weighting": "snr"}, "loss_weighting"),
                     ({"min_snr_gamma": 0}, "min_snr_gamma"), ({"min_snr_gamma": True}, "min_snr_gamma")]:
        with pytest.raises(C.ConfigError, match=msg):
            C.resolve({**TINY, **bad})
    # state dicts are unchanged: same keys for eps and v (no new buffers)
    assert _diffusion().state_dict().keys() == _diffusion(prediction_type="v").state_dict().keys()


def test_v_target_recovers_x0_and_eps_at_every_timestep():
    d = _diffusion(prediction_type="v")
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand((20, 3, 4, 16, 16), generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.arange(20)
    x_t = d.q_sample(x0, t, noise=noise)
    v = d.training_target(x0, t, noise)
    # float32: a few products of values <= ~4 in magnitude, each rounding 6e-8 relative
    torch.testing.assert_close(d.predict_start_from_output(x_t, t, v), x0, atol=1e-5, rtol=0)
    # the runtime's conversion (numpy, from the samplers' 1/sqrt(abar) and sqrt(1/abar - 1)) agrees with torch's
    abar = d.alphas_cumprod.double().numpy().reshape(-1, 1, 1, 1, 1)
    recip, recipm1 = np.float32(1) / np.sqrt(abar).astype(np.float32), np.sqrt(1 / abar - 1).astype(np.float32)
    eps, x0_np = to_eps_x0(v.numpy(), x_t.numpy(), recip, recipm1, "v")
    np.testing.assert_allclose(x0_np, x0.numpy(), atol=1e-5)
    np.testing.assert_allclose(eps, noise.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="prediction_type"):
        to_eps_x0(v.numpy(), x_t.numpy(), recip, recipm1, "x0")


def test_min_snr_weights_and_loss():
    for prediction_type in ("eps", "v"):
        d = _diffusion(prediction_type=prediction_type, loss_weighting="min_snr", min_snr_gamma=5.0)
        t = torch.arange(20)
        abar = d.alphas_cumprod.double()
        snr = abar / (1 - abar)
        expected = snr.clamp(max=5) / (snr if prediction_type == "eps" else snr + 1)
        torch.testing.assert_close(d.loss_weights(t), expected.float())
        # low-noise steps (snr > gamma) are down-weighted, high-noise ones keep weight 1 (eps) / snr+1 (v)
        assert d.loss_weights(t)[0] < 0.1 and (prediction_type == "v" or d.loss_weights(t)[-1] == 1)
        # the loss is the per-sample mean error weighted, averaged over the batch
        g = torch.Generator().manual_seed(2)
        x = torch.rand((2, 3, 4, 16, 16), generator=g) * 2 - 1
        noise, tt = torch.randn(x.shape, generator=g), torch.tensor([1, 15])
        with torch.no_grad():
            loss = d.p_losses(x, tt, noise=noise)
            out = d.denoise_fn(d.q_sample(x, tt, noise=noise), tt)
        err = (d.training_target(x, tt, noise) - out).abs().flatten(1).mean(1)
        torch.testing.assert_close(loss, (err * d.loss_weights(tt)).mean())
        # masked (frame-conditioned) loss with every frame unknown equals the plain one, weighted alike
        fc = _diffusion(prediction_type=prediction_type, loss_weighting="min_snr", frame_conditioning=True)
        with torch.no_grad():
            masked = fc.p_losses(x, tt, noise=noise, mask=torch.zeros(2, 4))
            out = fc.denoise_fn(fc.q_sample(x, tt, noise=noise), tt, frames=x, mask=torch.zeros(2, 4))
        err = (fc.training_target(x, tt, noise) - out).abs().flatten(1).mean(1)
        torch.testing.assert_close(masked, (err * fc.loss_weights(tt)).mean())


def test_v_model_trains_a_step_and_samples_in_range():
    d = _diffusion(prediction_type="v", loss_weighting="min_snr")
    loss = d(torch.rand(2, 3, 4, 16, 16))
    loss.backward()
    assert torch.isfinite(loss)
    video = d.sample(batch_size=1, generator=torch.Generator().manual_seed(0), progress=False)
    assert video.shape == (1, 3, 4, 16, 16) and 0 <= float(video.min()) and float(video.max()) <= 1


@pytest.fixture(scope="module")
def exported_v(tmp_path_factory) -> Exported:
    from vdeploy.export import export_onnx

    root = tmp_path_factory.mktemp("export_v")
    unet, config = tiny_unet({**TINY_EXPORT_CONFIG, "prediction_type": "v"})
    ckpt = write_vdeploy_checkpoint(root / "model-7.pt", unet, config)
    export_onnx(ckpt, root / "model", optimize="none")
    return Exported(root / "model", ckpt, config, unet)


def test_manifest_records_v_and_the_pipeline_uses_it(exported_v):
    from vdeploy.runtime import Pipeline

    pipe = Pipeline.from_dir(exported_v.dir)
    assert pipe.prediction_type == "v"


@pytest.mark.parametrize("sampler,steps,cond_scale,known", [
    ("ddpm", None, 1.0, 0),  # upstream's loop over every step: torch converts v on its own (predict_start_from_output)
    ("ddpm", None, 2.0, 0),
    ("ddim", 5, 3.0, 0),
    ("dpmpp", 5, 1.0, 0),
    ("dpmpp3m", 6, 2.0, 0),
    ("unipc", 5, 1.0, 0),
    ("ddim", 5, 1.0, 2),  # frame conditioning (replacement) on a v model
])
def test_v_model_parity_on_every_sampler(exported_v, sampler, steps, cond_scale, known):
    from vdeploy.export.parity import run_parity

    # default_atol(fp32): the ONNX graph against torch per call, through <= 20 steps
    report = run_parity(exported_v.dir, exported_v.ckpt, sampler=sampler, steps=steps, cond_scale=cond_scale,
                        known=known)
    assert report["passed"], report
