"""``frame_position``: each frame's absolute index added to the stem's features; off (the default) the seed's model."""

from __future__ import annotations

import numpy as np
import torch

from export_fixtures import TINY_EXPORT_CONFIG, single_thread_torch, tiny_unet, write_vdeploy_checkpoint
from vdeploy import config as C
from vdeploy.model import Unet3D

single_thread_torch()


def _inputs(b=2, f=4, size=16, cond_dim=6):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, 3, f, size, size, generator=g), torch.tensor([3, 11]), torch.randn(b, cond_dim, generator=g))


def test_off_is_the_seeds_model_and_on_starts_as_it():
    """Off: no new kwarg, key or table. On: one new parameter, zero at first and drawn from no RNG, so every other
    weight and the first output are exactly the model's without it; it learns (its gradient is not zero)."""
    config = C.resolve(dict(TINY_EXPORT_CONFIG))
    assert config["frame_position"] is False and "frame_position" not in C.unet_kwargs(config)
    torch.manual_seed(0)
    off = Unet3D(**C.unet_kwargs(config)).eval()
    assert set(off.position_tables(4)) == {"pos_bias", "rotary_cos", "rotary_sin"}
    torch.manual_seed(0)
    on = Unet3D(**C.unet_kwargs(C.resolve({**TINY_EXPORT_CONFIG, "frame_position": True}))).eval()
    off_sd, on_sd = off.state_dict(), on.state_dict()
    assert set(on_sd) - set(off_sd) == {"frame_pos_proj"}
    assert all(torch.equal(off_sd[k], on_sd[k]) for k in off_sd)
    x, t, cond = _inputs()
    with torch.no_grad():
        assert torch.equal(on(x, t, cond=cond), off(x, t, cond=cond))
    on.train()
    on(x, t, cond=cond).square().mean().backward()
    assert on.frame_pos_proj.grad.abs().max() > 0


def test_frames_tell_where_they_stand_and_the_export_matches(tmp_path):
    """With a trained (here: random) map, the same features at another frame index give another output; the ONNX
    export (plain and fused guidance graphs) matches PyTorch within the exporter's fp32 tolerance."""
    from click.testing import CliRunner

    from vdeploy.cli import main
    from vdeploy.runtime import manifest as vmanifest

    unet, config = tiny_unet({**TINY_EXPORT_CONFIG, "frame_position": True})
    with torch.no_grad():
        unet.frame_pos_proj.normal_(0, 0.5)
    table = unet.position_tables(4)["frame_pos"]
    assert table.shape == (4, unet.frame_pos_proj.shape[0]) and not torch.allclose(table[0], table[3])
    ckpt = write_vdeploy_checkpoint(tmp_path / "model-1.pt", unet, config)
    out = tmp_path / "model"
    result = CliRunner().invoke(main, ["export", "--ckpt", str(ckpt), "--out", str(out), "--cfg", "--optimize", "none"])
    assert result.exit_code == 0, result.output
    parity = vmanifest.load(out).parity
    # the exporter refuses errors over its atol; the numbers are float32 round-off through the tiny U-Net
    assert max(parity["denoiser"]["max_abs_err"].values()) < 1e-4
    assert np.isfinite(list(parity["denoiser_cfg"]["max_abs_err"].values())).all()
