"""The trainer's opt-in high-noise band (``high_noise_share``, ``vdeploy train --high-noise-share``): off, the seed's
uniform draw with the same numbers; on, the given share of clips trains from the caption alone at the steps whose
SNR is below 0.01, reproducibly, kept in the checkpoint and on ``--resume``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from vdeploy import config as C
from vdeploy.cli import main
from vdeploy.diffusion import GaussianDiffusion, cosine_beta_schedule
from vdeploy.model import Unet3D
from vdeploy.train_parts import HIGH_NOISE_MAX_SNR, check_high_noise_share, high_noise_band, high_noise_timesteps

CONFIG = C.resolve({"dim": 8, "dim_mults": [1, 2], "attn_heads": 2, "attn_dim_head": 8, "image_size": 16,
                    "num_frames": 4, "timesteps": 20, "frame_conditioning": True})


def _abar(timesteps: int) -> torch.Tensor:
    return torch.cumprod(1 - cosine_beta_schedule(timesteps), 0)


def test_the_band_is_where_the_snr_is_below_the_bar():
    abar = _abar(100)
    band = high_noise_band(abar)
    snr = abar / (1 - abar)
    assert band.tolist() == list(range(93, 100))  # the cosine schedule's last 7 of 100 levels
    assert bool((snr[band] < HIGH_NOISE_MAX_SNR).all()) and snr[92] >= HIGH_NOISE_MAX_SNR
    assert high_noise_band(_abar(4)).tolist() == [3]  # a short schedule: its last level at least


def test_share_moves_exactly_the_drawn_clips_to_every_band_step():
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 100, (4000,), generator=g)
    u = torch.rand(4000, generator=g)
    band = high_noise_band(_abar(100))
    assert torch.equal(high_noise_timesteps(t, u, 0.0, band), t)
    moved_t, moved = high_noise_timesteps(t, u, 0.3, band), u < 0.3
    assert torch.equal(moved_t[~moved], t[~moved])
    assert set(moved_t[moved].tolist()) == set(range(93, 100))  # every step of the band
    assert moved_t.dtype == t.dtype
    assert high_noise_timesteps(t[:50], u[:50], 1.0, torch.tensor([4])).tolist() == [4] * 50  # share 1: all


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "x", None])
def test_bad_shares_are_refused(bad):
    with pytest.raises(ValueError, match="high_noise_share must be a number in \\[0, 1\\]"):
        check_high_noise_share(bad)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from vdeploy.data import synth_dataset

    d = tmp_path_factory.mktemp("data")
    synth_dataset(d, num=4, frames=4, size=16, seed=0)
    return d


def make_trainer(folder, results, **kw):
    from vdeploy.trainer import Trainer

    torch.manual_seed(0)
    diffusion = GaussianDiffusion(Unet3D(**C.unet_kwargs(CONFIG)), **C.diffusion_kwargs(CONFIG))
    return Trainer(diffusion, folder, train_batch_size=2, train_num_steps=2, gradient_accumulate_every=1,
                   save_and_sample_every=2, results_folder=results, num_sample_rows=1, progress=False, config=CONFIG,
                   **kw)


def test_off_keeps_the_draws_and_on_moves_t_and_drops_the_known_frames(data_dir, tmp_path):
    plain = make_trainer(data_dir, tmp_path / "a")
    high = make_trainer(data_dir, tmp_path / "b", high_noise_share=0.5)
    assert plain.high_noise_share == 0.0 and high.high_noise_share == 0.5
    assert high.high_noise_band.tolist() == high_noise_band(_abar(20)).tolist() == [18, 19]
    moved = 0
    for step in range(12):
        plain.step = high.step = step
        t0, noise0, u0 = plain.step_noise(0, 4)
        t1, noise1, u1 = high.step_noise(0, 4)
        assert u0.shape == (4, 4) and u1.shape == (4, 5)  # one more uniform only when on
        # the same generator per clip: the noise, caption dropout and mask draws are the unmoved run's
        assert torch.equal(noise0, noise1) and torch.equal(u0, u1[:, :4])
        picked = u1[:, -1] < 0.5
        # 20 levels: the SNR is below 0.01 at 18 and 19
        assert torch.equal(t1[~picked], t0[~picked]) and set(t1[picked].tolist()) <= {18, 19}
        data = torch.rand(4, 3, 4, 16, 16)
        plain_kw, high_kw = plain._loss_kwargs(0, data, None, 0.0, None), high._loss_kwargs(0, data, None, 0.0, None)
        assert torch.equal(high_kw["t"], t1)
        # the moved clips are caption-only generation; the others keep the mask they drew
        assert not high_kw["mask"][picked].any() and torch.equal(high_kw["mask"][~picked], plain_kw["mask"][~picked])
        moved += int(picked.sum())
    assert 0 < moved < 48


def test_share_is_stored_and_kept_on_resume(data_dir, tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(CONFIG))
    results = tmp_path / "results"
    runner = CliRunner()
    first = runner.invoke(main, ["train", "--data", str(data_dir), "--results", str(results), "--config",
                                 str(config), "--high-noise-share", "0.25", "--steps", "2", "--batch-size", "2",
                                 "--sample-rows", "1", "--quiet"])
    assert first.exit_code == 0, first.output
    assert "25% of the clips caption-only at steps 18-19" in first.output
    assert torch.load(results / "model-last.pt", weights_only=True)["trainer"]["high_noise_share"] == 0.25
    again = runner.invoke(main, ["train", "--data", str(data_dir), "--results", str(results), "--resume",
                                 "--steps", "3", "--quiet"])
    assert again.exit_code == 0, again.output
    assert torch.load(results / "model-last.pt", weights_only=True)["trainer"]["high_noise_share"] == 0.25


@pytest.mark.parametrize("value", ["1.5", "-0.2", "nan", "half"])
def test_bad_share_is_a_one_line_error(value, data_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vdeploy.cli", "train", "--data", str(data_dir), "--results",
                           str(tmp_path / "r"), "--high-noise-share", value], capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith("Error: Invalid value for '--high-noise-share'")
    assert not (tmp_path / "r").exists()  # nothing written
