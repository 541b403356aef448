"""``runtime.video.caption`` and ``vdeploy sample --label``: each prompt written under its video in the grid."""

from __future__ import annotations

import numpy as np
import pytest

from runtime_fixtures import model_dir
from vdeploy.runtime.video import caption


def test_caption_scales_up_and_writes_each_label_under_its_video():
    video = np.random.default_rng(0).uniform(0, 1, (2, 3, 4, 16, 16)).astype(np.float32)
    out = caption(video, ["a red circle moving left", "a blue square"])
    b, c, f, h, w = out.shape
    assert (b, c, f, w) == (2, 3, 4, 128) and h > 128  # 8x nearest, a band below
    np.testing.assert_array_equal(out[:, :, :, :128:8, ::8], video)  # the videos unchanged, scaled up
    band = out[:, :, :, 128:]
    assert np.array_equal(band, np.repeat(band[:, :, :1], f, axis=2))  # the same label on every frame
    ink = (band[:, 0, 0] > 0.5).sum(axis=(1, 2))
    assert ink[0] > ink[1] > 0  # the longer prompt writes more pixels
    with pytest.raises(ValueError, match="labels"):
        caption(video, ["one"])


def test_cli_sample_label(tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from vdeploy.cli import main

    args = ["sample", "--model", str(model_dir("cond")), "--steps", "2", "--quiet", "--seed", "0"]
    out = tmp_path / "s.gif"
    result = CliRunner().invoke(main, args + ["--out", str(out), "--text", "a red ball", "--text", "a blue cube",
                                              "--label"])
    assert result.exit_code == 0, result.output
    with Image.open(out) as im:  # two 8 px videos scaled to 128 px and padded 2 px, side by side, a band below
        assert im.size[0] == 2 * (128 + 4) and im.size[1] > 128 + 4
    result = CliRunner().invoke(main, args + ["--out", str(out), "--label"])
    assert result.exit_code == 2 and "--label" in result.output and "--text" in result.output
