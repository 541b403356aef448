"""GIF I/O, the GIF-folder Dataset and the synthetic moving-shapes data."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from vdeploy.data import (
    DataError,
    Dataset,
    UnreadableVideoWarning,
    cast_num_frames,
    gif_to_tensor,
    read_gif,
    synth_dataset,
    video_tensor_to_gif,
    write_gif,
)


def _few_colour_video(channels: int, frames: int = 5, h: int = 9, w: int = 11, seed: int = 0) -> np.ndarray:
    """uint8 (f, h, w, c) with <= 216 colours per frame (what GIF stores exactly); frames 1 and 2 equal."""
    rng = np.random.default_rng(seed)
    if channels == 1:
        v = rng.integers(0, 256, (frames, h, w, 1), dtype=np.uint8)
    else:
        v = (rng.integers(0, 6, (frames, h, w, channels)) * 51).astype(np.uint8)
    if channels == 4:
        v[..., 3] = np.where(v[..., 3] >= 128, 255, 0)  # GIF alpha is one bit
    v[2] = v[1]
    return v


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_gif_round_trip_is_exact(tmp_path, channels):
    video = _few_colour_video(channels)
    path = write_gif(video, tmp_path / "v.gif")
    back = read_gif(path, channels)
    # identical consecutive frames stay separate frames (Pillow's save_all would merge them)
    assert back.shape == video.shape
    if channels == 4:
        opaque = video[..., 3] == 255
        assert np.array_equal(back[..., 3], video[..., 3])
        assert np.array_equal(back[..., :3][opaque], video[..., :3][opaque])
    else:
        assert np.array_equal(back, video)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_tensor_gif_round_trip(tmp_path, channels):
    video = _few_colour_video(channels, seed=1)
    tensor = torch.from_numpy(video).permute(3, 0, 1, 2).float() / 255  # c f h w in [0, 1]
    frames = video_tensor_to_gif(tensor, tmp_path / "t.gif")
    assert len(frames) == video.shape[0]
    back = gif_to_tensor(tmp_path / "t.gif", channels=channels)
    assert back.shape == tensor.shape and back.dtype == torch.float32
    if channels == 4:
        opaque = tensor[3:] == 1
        assert torch.equal(back[3], tensor[3])
        assert torch.equal(back[:3][opaque.expand(3, -1, -1, -1)], tensor[:3][opaque.expand(3, -1, -1, -1)])
    else:
        assert torch.equal(back, tensor)


def test_many_colour_frames_are_quantized_not_refused(tmp_path):
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)  # ~1000 colours per frame
    back = read_gif(write_gif(video, tmp_path / "q.gif"), 3)
    assert back.shape == video.shape
    assert np.abs(back.astype(int) - video.astype(int)).mean() < 20


def test_cast_num_frames_truncates_or_zero_pads():
    v = torch.rand(3, 5, 4, 4)
    assert torch.equal(cast_num_frames(v, frames=5), v)
    assert torch.equal(cast_num_frames(v, frames=3), v[:, :3])
    padded = cast_num_frames(v, frames=8)
    assert padded.shape == (3, 8, 4, 4) and torch.equal(padded[:, :5], v) and padded[:, 5:].abs().sum() == 0


def test_dataset_resizes_crops_casts_and_reads_captions(tmp_path):
    wide = np.zeros((6, 20, 40, 3), np.uint8)
    wide[:, :, 10:30] = 255  # a white centre band: after resize + center crop the frame is all white
    write_gif(wide, tmp_path / "a.gif")
    (tmp_path / "a.txt").write_text("a white band\n")
    write_gif(_few_colour_video(3, frames=3, h=16, w=16), tmp_path / "sub" / "b.gif")  # nested, no caption
    ds = Dataset(tmp_path, image_size=16, num_frames=4)
    assert [p.name for p in ds.paths] == ["a.gif", "b.gif"]
    assert ds.captions == ["a white band", None]
    a, b = ds[0], ds[1]
    assert a.shape == b.shape == (3, 4, 16, 16)
    assert a.min() > 0.9  # the crop kept the centre
    assert torch.equal(b[:, 3], torch.zeros(3, 16, 16))  # 3 frames zero-padded to 4


def test_dataset_flips_whole_clips(tmp_path):
    v = np.zeros((4, 8, 8, 3), np.uint8)
    v[:, :, :2] = 255  # left edge white in every frame
    write_gif(v, tmp_path / "v.gif")
    ds = Dataset(tmp_path, image_size=8, num_frames=4, horizontal_flip=True)
    torch.manual_seed(0)
    for _ in range(8):
        clip = ds[0]
        left = clip[:, :, :, :2].mean(dim=(0, 2, 3))
        assert torch.all(left == left[0])  # every frame flipped the same way


def test_corrupt_gif_is_skipped_with_one_warning_naming_it(tmp_path):
    synth_dataset(tmp_path, num=3, frames=4, size=16)
    (tmp_path / "garbage.gif").write_bytes(b"not a gif at all")
    good = (tmp_path / "00001.gif").read_bytes()
    (tmp_path / "00001.gif").write_bytes(good[: len(good) // 2])  # truncated: header fine, frames not
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = Dataset(tmp_path, image_size=16, num_frames=4)
        videos = [ds[i] for i in range(len(ds))] + [ds[i] for i in range(len(ds))]
    messages = [str(w.message) for w in caught if issubclass(w.category, UnreadableVideoWarning)]
    assert len([m for m in messages if "garbage.gif" in m]) == 1
    assert len([m for m in messages if "00001.gif" in m]) == 1
    assert len(messages) == 2
    assert all(v.shape == (3, 4, 16, 16) for v in videos)  # the bad index serves the next readable video


def test_empty_and_missing_folders_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no .gif files found in"):
        Dataset(tmp_path, image_size=16)
    with pytest.raises(DataError, match="does not exist"):
        Dataset(tmp_path / "nope", image_size=16)
    (tmp_path / "bad.gif").write_bytes(b"junk")
    with pytest.warns(UnreadableVideoWarning), pytest.raises(DataError, match="none of the 1 files"):
        Dataset(tmp_path, image_size=16)


def _centroid(frame: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(frame.max(-1) > 0)
    return np.array([xs.mean(), ys.mean()])


def test_synth_dataset_is_readable_captioned_deterministic_and_moves_as_captioned(tmp_path):
    paths = synth_dataset(tmp_path / "a", num=12, frames=8, size=32, seed=3)
    again = synth_dataset(tmp_path / "b", num=12, frames=8, size=32, seed=3)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    ds = Dataset(tmp_path / "a", image_size=32, num_frames=8)
    assert len(ds) == 12 and ds[0].shape == (3, 8, 32, 32)
    step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    for path, caption in zip(ds.paths, ds.captions):
        words = caption.split()
        assert words[0] == "a" and words[1] in {"red", "green", "blue", "yellow"}
        assert words[2] in {"circle", "square", "triangle"} and words[3] == "moving"
        frames = read_gif(path)
        moved = _centroid(frames[-1]) - _centroid(frames[0])
        direction = np.array(step[words[4]])
        assert moved @ direction >= 15  # about half the frame along the captioned direction over the clip
        assert abs(moved @ direction[::-1]) <= 1  # and none across it


def test_synth_without_torch():
    code = ("import sys, tempfile; from vdeploy.data import synth_dataset; "
            "synth_dataset(tempfile.mkdtemp(), num=2, frames=2, size=8); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_read_gif_turns_every_decoding_failure_into_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_gif(tmp_path / "missing.gif")
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "p.gif.png", format="PNG")
    with pytest.raises(DataError, match="it is PNG, not a GIF"):
        read_gif(tmp_path / "p.gif.png")
    video = np.zeros((2, 6, 6, 3), np.uint8)
    video[1] = 255
    data = bytearray(write_gif(video, tmp_path / "v.gif").read_bytes())
    descriptor = b",\x00\x00\x00\x00\x06\x00\x06\x00"  # image separator, left, top, width, height
    second = data.index(descriptor, data.index(descriptor) + 1)
    data[second + 1] = 1  # frame 1 moved one pixel right: past the 6 px screen (found by the fuzzer)
    (tmp_path / "wide.gif").write_bytes(bytes(data))
    with pytest.raises(DataError, match="frame 1 is 7x6 but frame 0 is 6x6"):
        read_gif(tmp_path / "wide.gif")
    data = bytearray(write_gif(video, tmp_path / "bomb.gif").read_bytes())
    data[6:10] = b"\xff\xff\xff\xff"  # a logical screen of 65535 x 65535 pixels
    (tmp_path / "bomb.gif").write_bytes(bytes(data))
    with pytest.raises(DataError, match="bomb.gif"):
        read_gif(tmp_path / "bomb.gif")


def test_captions_must_be_utf8_text(tmp_path):
    from vdeploy.data import UnreadableCaptionWarning, read_caption

    gif = write_gif(np.zeros((1, 4, 4, 3), np.uint8), tmp_path / "a.gif")
    assert read_caption(gif) is None
    for raw, message in [(b"caf\xe9", "is not UTF-8 text"), (b"a\x00b", "NUL"), (b"  \n", "is empty")]:
        gif.with_suffix(".txt").write_bytes(raw)
        with pytest.raises(DataError, match=message):
            read_caption(gif)
    gif.with_suffix(".txt").write_bytes(b"\xef\xbb\xbf a red ball \n")
    assert read_caption(gif) == "a red ball"
    gif.with_suffix(".txt").write_bytes(b"caf\xe9")
    with pytest.warns(UnreadableCaptionWarning, match="a.txt is not UTF-8"):
        assert Dataset(tmp_path, image_size=4, num_frames=1).captions == [None]


def test_synth_refuses_a_folder_with_clips_unless_overwrite(tmp_path):
    synth_dataset(tmp_path, num=3, frames=2, size=8)
    (tmp_path / "mine.gif").write_bytes((tmp_path / "00000.gif").read_bytes())
    with pytest.raises(DataError, match="already holds 4 clip"):
        synth_dataset(tmp_path, num=1, frames=2, size=8)
    synth_dataset(tmp_path, num=1, frames=2, size=8, overwrite=True)
    # the earlier synthetic clips went, a file of another name stayed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.gif", "00000.txt", "mine.gif"]
