"""runtime.video: GIF frames and grids as the seed writes them; MP4 through PyAV, read back frame for frame."""

import numpy as np
import pytest
from PIL import Image

from vdeploy.runtime import save_gif, save_mp4
from vdeploy.runtime.video import read_mp4, to_frames


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


def test_a_single_video_keeps_the_models_size(tmp_path):
    video = np.random.default_rng(0).random((1, 3, 4, 16, 16), dtype=np.float32)
    assert to_frames(video).shape == (4, 16, 16, 3) == to_frames(video[0]).shape
    with Image.open(save_gif(video, tmp_path / "one.gif")) as gif:
        assert gif.size == (16, 16)


def smooth_video(b, f, h, w):
    """Colour gradients moving over time, chroma constant over 2x2 blocks (what yuv420p keeps exactly)."""
    t = np.arange(f, dtype=np.float32)[:, None, None]
    yy, xx = np.meshgrid(np.arange(h // 2), np.arange(w // 2), indexing="ij")
    channels = [(0.5 + 0.4 * np.sin(0.4 * xx + 0.3 * t + k)) for k in range(3)]
    video = np.stack(channels).repeat(2, axis=-1).repeat(2, axis=-2)  # c f h w
    return np.broadcast_to(video, (b, 3, f, h, w)).astype(np.float32)


@pytest.mark.parametrize("b, size", [(1, 16), (1, 32), (4, 16)])
def test_mp4_round_trip_frame_for_frame(tmp_path, b, size):
    video = smooth_video(b, 8, size, size)
    path = save_mp4(video, tmp_path / "v.mp4", fps=12)
    frames, fps = read_mp4(path)
    want = to_frames(video)
    assert frames.shape == want.shape and fps == 12  # every frame, at the model's size (a batch: the grid)
    err = np.abs(frames.astype(np.int16) - want.astype(np.int16))
    # Stated tolerance, in 8-bit levels: RGB -> limited-range YUV (219 levels for 255) -> RGB rounds each
    # channel by up to ~1.5 levels, swscale's filtered 4:2:0 chroma smears edges (a grid's black borders), and
    # H.264 at CRF 17 adds a few levels of quantisation noise: measured mean 2.4-2.9 levels; 4 allowed.
    assert err.mean() <= 4.0, err.mean()
    # frame for frame: each decoded frame is nearest to its own source frame (the gradient moves 0.3 rad a
    # frame, tens of levels), so a dropped, repeated or reordered frame fails here
    dist = np.abs(frames[:, None].astype(np.int16) - want[None].astype(np.int16)).mean(axis=(2, 3, 4))
    assert (dist.argmin(axis=1) == np.arange(len(want))).all()


def test_odd_sizes_are_padded_to_even(tmp_path):
    frames, _ = read_mp4(save_mp4(smooth_video(1, 4, 16, 16)[..., :15, :13], tmp_path / "odd.mp4"))
    assert frames.shape == (4, 16, 14, 3)


def test_mp4_without_pyav_says_what_to_install(tmp_path, monkeypatch):
    import sys

    existing = tmp_path / "v.mp4"
    existing.write_bytes(b"keep me")
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(RuntimeError, match=r"pip install 'vdeploy\[video\]'"):
        save_mp4(smooth_video(1, 2, 8, 8), existing)
    assert existing.read_bytes() == b"keep me"
