"""``frame_film``: every ResNet block's FiLM per frame (the caption and the frame index mixed by a small MLP); off (the
default) the seed's model."""

from __future__ import annotations

import pytest
import torch

from export_fixtures import TINY_EXPORT_CONFIG, single_thread_torch, tiny_unet, write_vdeploy_checkpoint
from vdeploy import config as C
from vdeploy.model import Unet3D

single_thread_torch()

ON = {**TINY_EXPORT_CONFIG, "frame_film": True}


def _inputs(b=2, f=4, size=16, cond_dim=6, constant=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 3, 1 if constant else f, size, size, generator=g).expand(b, 3, f, size, size).contiguous()
    return x, torch.tensor([3, 11]), torch.randn(b, cond_dim, generator=g)


def _trained(unet: Unet3D) -> Unet3D:
    """The MLP's last layer made non-zero, as training makes it (it starts at zero)."""
    with torch.no_grad():
        unet.frame_film_mlp[2].weight.normal_(0, 0.1)
    return unet


def test_off_is_the_seeds_model_and_on_starts_as_it():
    """Off: no new kwarg, key or table. On: new keys only (every other weight drawn as without it), and the MLP's
    last layer at zero, so the first outputs are the model's without it; it learns (its gradient is not zero)."""
    config = C.resolve(dict(TINY_EXPORT_CONFIG))
    assert config["frame_film"] is False and "frame_film" not in C.unet_kwargs(config)
    torch.manual_seed(0)
    off = Unet3D(**C.unet_kwargs(config)).eval()
    assert set(off.position_tables(4)) == {"pos_bias", "rotary_cos", "rotary_sin"}
    torch.manual_seed(0)
    on = Unet3D(**C.unet_kwargs(C.resolve(ON))).eval()
    assert set(on.position_tables(4)) == {"pos_bias", "rotary_cos", "rotary_sin", "frame_index"}
    off_sd, on_sd = off.state_dict(), on.state_dict()
    assert {k.split(".")[0] for k in set(on_sd) - set(off_sd)} == {"frame_film_mlp"}
    assert all(torch.equal(off_sd[k], on_sd[k]) for k in off_sd)
    x, t, cond = _inputs()
    with torch.no_grad():
        # the same numbers through a per-frame FiLM: only the GEMMs' batching differs, float32 round-off (~1e-7
        # relative) through a dozen blocks
        torch.testing.assert_close(on(x, t, cond=cond), off(x, t, cond=cond), rtol=0, atol=1e-5)
    on.train()
    on(x, t, cond=cond).square().mean().backward()
    assert on.frame_film_mlp[2].weight.grad.abs().max() > 0


@pytest.mark.parametrize("norm_type", ["group", "rms"])
def test_frame_constant_input_gives_frames_that_depend_on_caption_and_index(norm_type):
    """The same video in every frame: without frame_film every frame's output is the same (the U-Net is frame
    equivariant for frame-constant features); with it each frame's differs, and how it changes over the frames
    depends on the caption (what "moving left" against "moving right" needs)."""
    x, t, cond = _inputs(constant=True)
    torch.manual_seed(0)
    off = Unet3D(**C.unet_kwargs(C.resolve({**TINY_EXPORT_CONFIG, "norm_type": norm_type}))).eval()
    unet = _trained(Unet3D(**C.unet_kwargs(C.resolve({**ON, "norm_type": norm_type}))).eval())
    with torch.no_grad():
        flat = off(x, t, cond=cond)
        out = unet(x, t, cond=cond)
        swapped = unet(x, t, cond=cond.flip(0))  # each video with the other one's caption
    # off: frames equal to float32 round-off (attention weights summing to 1 over equal values)
    assert (flat - flat[:, :, :1]).abs().max() < 1e-5
    change = out[:, :, -1] - out[:, :, 0]  # last frame minus first, per video
    assert change.abs().amax(dim=(1, 2, 3)).min() > 1e-2
    assert (change - (swapped[:, :, -1] - swapped[:, :, 0])).abs().amax(dim=(1, 2, 3)).min() > 1e-2


def test_state_dict_round_trip_and_export_parity(tmp_path):
    """An on-model's weights load strictly into another on-model (same outputs) and not into an off-model; the
    ONNX export (plain and fused guidance graphs, the frame table a constant: no new graph input) matches PyTorch
    within the exporter's fp32 tolerance, and the runtime's ddim loop matches torch's."""
    from click.testing import CliRunner

    from vdeploy.cli import main
    from vdeploy.export.parity import run_parity
    from vdeploy.runtime import manifest as vmanifest

    # v-prediction, as the demo: from eps, x0 divides the graph's round-off by sqrt(abar) (1/sqrt(abar) ~ 1e2 at the
    # tiny schedule's first step), which the comparison of whole sampling runs below would measure instead
    unet, config = tiny_unet({**ON, "prediction_type": "v"})
    _trained(unet)
    other = Unet3D(**C.unet_kwargs(config)).eval()
    other.load_state_dict(unet.state_dict(), strict=True)
    x, t, cond = _inputs()
    with torch.no_grad():
        assert torch.equal(other(x, t, cond=cond), unet(x, t, cond=cond))
    with pytest.raises(RuntimeError, match="frame_film_mlp"):
        Unet3D(**C.unet_kwargs(C.resolve(dict(TINY_EXPORT_CONFIG)))).load_state_dict(unet.state_dict())

    ckpt = write_vdeploy_checkpoint(tmp_path / "model-1.pt", unet, config)
    out = tmp_path / "model"
    result = CliRunner().invoke(main, ["export", "--ckpt", str(ckpt), "--out", str(out), "--cfg", "--optimize", "none"])
    assert result.exit_code == 0, result.output
    manifest = vmanifest.load(out)
    parity = manifest.parity
    # the exporter refuses errors over its atol; the numbers are float32 round-off through the tiny U-Net
    assert max(parity["denoiser"]["max_abs_err"].values()) < 1e-4
    assert max(parity["denoiser_cfg"]["max_abs_err"].values()) < 1e-4
    assert [i.role for i in manifest.graphs["denoiser"].inputs] == ["x", "t", "cond"]
    # the runtime's 5 guided ddim steps against torch's: float32 round-off per call, as for a model without it
    report = run_parity(out, ckpt, sampler="ddim", steps=5, cond_scale=2.0)
    assert report["passed"] and max(report["per_call_max_abs_err"]) < 1e-4, report
