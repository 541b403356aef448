"""runtime.video: GIF frames and grids as the seed writes them; MP4 only with an encoder library."""

import numpy as np
import pytest
from PIL import Image

from vdeploy.runtime import save_gif, save_mp4
from vdeploy.runtime.video import to_frames


def test_single_video_frames_truncate_like_to_pil_image():
    video = np.zeros((3, 2, 4, 5), np.float32)
    video[0, 0, 0, 0] = 0.999  # ToPILImage: mul(255).byte() truncates -> 254
    video[1, 1, 3, 4] = 1.5  # clipped to 1 -> 255
    frames = to_frames(video)
    assert frames.shape == (2, 4, 5, 3) and frames.dtype == np.uint8
    assert frames[0, 0, 0, 0] == 254 and frames[1, 3, 4, 1] == 255


def test_batch_becomes_a_padded_grid_in_row_major_order():
    b = 5
    video = np.zeros((b, 1, 2, 4, 4), np.float32)
    for i in range(b):
        video[i] = (i + 1) / 10
    frames = to_frames(video)  # 3 columns x 2 rows, 2 px padding around each 4 px video
    assert frames.shape == (2, 2 * 8, 3 * 8, 1)
    for i in range(b):
        r, c = divmod(i, 3)
        tile = frames[0, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8, 0]
        assert tile[2:6, 2:6].min() == tile[2:6, 2:6].max() == int((i + 1) / 10 * 255)
        assert tile[0].max() == 0  # the padding is black
    assert frames[0, 8:, 16:].max() == 0  # the empty sixth cell


def test_save_gif(tmp_path):
    video = np.random.default_rng(0).random((4, 3, 6, 8, 8), dtype=np.float32)
    path = save_gif(video, tmp_path / "v.gif", fps=10)
    with Image.open(path) as gif:
        assert gif.n_frames == 6 and gif.size == (24, 24)
        assert gif.info["duration"] == 100


def test_bad_videos_are_refused(tmp_path):
    with pytest.raises(ValueError, match="channels"):
        save_gif(np.zeros((2, 2, 4, 4), np.float32), tmp_path / "x.gif")
    with pytest.raises(ValueError, match=r"\(c, f, h, w\) or \(b, c, f, h, w\)"):
        save_gif(np.zeros((4, 4), np.float32), tmp_path / "x.gif")


def test_mp4_needs_an_encoder_library(tmp_path, monkeypatch):
    import sys

    video = np.random.default_rng(0).random((3, 4, 8, 8), dtype=np.float32)
    have_encoder = False
    for name in ("av", "imageio_ffmpeg"):
        try:
            __import__(name)
            have_encoder = True
        except ImportError:
            pass
    if have_encoder:
        path = save_mp4(video, tmp_path / "v.mp4")
        assert path.stat().st_size > 0
    monkeypatch.setitem(sys.modules, "av", None)
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    with pytest.raises(RuntimeError, match=r"pip install av \(or imageio-ffmpeg\)"):
        save_mp4(video, tmp_path / "v.mp4")
