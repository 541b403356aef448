"""vdeploy.analysis on the synthetic clips themselves: colour, centroid track, direction, cleanliness."""

from __future__ import annotations

import sys
import subprocess

import numpy as np
import pytest

from vdeploy.analysis import analyze, centroid_error, parse_prompt, prompt_adherence
from vdeploy.data import SYNTH_COLORS, SYNTH_DIRECTIONS, SYNTH_SHAPES, synth_clip, write_gif


def _clips(n: int, frames: int = 8, size: int = 32, seed: int = 0):
    """``n`` synthetic clips (c, f, h, w) in [0, 1] with their labels and true centre tracks (x, y)."""
    pick = np.random.default_rng(seed)
    out = []
    for k in range(n):
        color = list(SYNTH_COLORS)[pick.integers(4)]
        shape = SYNTH_SHAPES[pick.integers(3)]
        direction = list(SYNTH_DIRECTIONS)[pick.integers(4)]
        clip = synth_clip(shape, color, direction, frames, size, np.random.default_rng(1000 + k))
        # the generator's geometry: centre `a` along the motion axis, one random cross-axis position
        r = max(2, size // 6)
        lo, hi = r + 1, size - r - 2
        cross = np.random.default_rng(1000 + k).uniform(lo, hi)
        dx, dy = SYNTH_DIRECTIONS[direction]
        a = lo + (hi - lo) * np.arange(frames) / max(frames - 1, 1)
        a = a if dx + dy > 0 else (size - 1) - a
        track = np.stack([a, np.full(frames, cross)] if dx else [np.full(frames, cross), a], axis=1)
        out.append((clip.transpose(3, 0, 1, 2) / 255.0, color, shape, direction, track))
    return out


@pytest.mark.parametrize("size", [32, 16])
def test_colour_direction_and_centroids_on_64_synthetic_clips(size):
    clips = _clips(64, size=size)
    right = 0
    for clip, color, shape, direction, track in clips:
        got = analyze(clip)
        right += got.color == color and got.direction == direction
        assert got.visible == 1.0 and got.clean == 1.0 and got.background == 0.0
        # circles and squares are centred on the generator's centre; a triangle's area centroid sits below it
        err = np.abs(got.centroids - track)
        tol = 1.0 if shape != "triangle" else 0.5 + size / 6 / 3 + 0.5
        assert err.max() <= tol, (shape, direction, err.max())
    assert right / len(clips) >= 0.98, f"analyzer right on {right}/{len(clips)} clips"


def test_prompt_adherence_and_captions():
    clips = _clips(16)
    prompts = [f"a {c} {s} moving {d}" for _, c, s, d, _ in clips]
    assert prompt_adherence(np.stack([c[0] for c in clips]), prompts) == 1.0
    wrong = [p.replace("moving left", "moving right") if "left" in p else p for p in prompts]
    n_left = sum("left" in p for p in prompts)
    assert n_left > 0
    assert prompt_adherence([c[0] for c in clips], wrong) == pytest.approx(1 - n_left / 16)
    assert parse_prompt("A Red circle, moving LEFT.") == {"color": "red", "shape": "circle", "direction": "left"}
    with pytest.raises(ValueError, match="more than one color"):
        parse_prompt("a red and blue circle moving left")
    with pytest.raises(ValueError, match="needs a colour"):
        prompt_adherence([clips[0][0]], ["a circle moving left"])
    with pytest.raises(ValueError, match="1 clips but 2 prompts"):
        prompt_adherence([clips[0][0]], prompts[:2])


def test_noise_blank_and_still_clips():
    rng = np.random.default_rng(0)
    noisy = rng.uniform(0, 1, (3, 8, 32, 32))
    got = analyze(noisy)
    assert got.clean < 0.2 and got.background > 0.3  # a noise clip is not clean
    assert got.visible == 0.0 and got.color is None  # and noise is no object at the frame's centre
    blank = np.zeros((3, 8, 32, 32))
    got = analyze(blank)
    assert got.color is None and got.direction == "none" and got.visible == 0.0 and np.isnan(got.centroids).all()
    clip = _clips(1)[0][0]
    still = np.repeat(clip[:, :1], 8, axis=1)
    assert analyze(still).direction == "none"


def test_centroid_error_in_pixels():
    clip, *_, track = _clips(1)[0]
    assert centroid_error(clip, clip) == 0.0
    shifted = np.roll(clip, 3, axis=3)  # 3 px right (the object never wraps: it stays inside the frame)
    if analyze(shifted).visible == 1.0:
        assert centroid_error(shifted, clip) == pytest.approx(3.0, abs=0.5)
    assert centroid_error(track + [0, 4], track) == pytest.approx(4.0)
    lost = clip.copy()
    lost[:, 5:] = 0
    half_diag = 0.5 * np.hypot(32, 32)
    assert centroid_error(lost, clip, frames=[5, 6, 7]) == pytest.approx(half_diag)
    noise = np.random.default_rng(1).uniform(0, 1, clip.shape)
    assert centroid_error(noise, clip) == pytest.approx(half_diag)  # noise is no object near the centre
    with pytest.raises(ValueError, match="frames"):
        centroid_error(clip[:, :4], clip)


def test_reads_a_gif_and_stays_torch_free(tmp_path):
    clip, color, _, direction, _ = _clips(1)[0]
    path = write_gif((clip.transpose(1, 2, 3, 0) * 255).round().astype(np.uint8), tmp_path / "a.gif")
    got = analyze(path)
    assert (got.color, got.direction) == (color, direction)
    code = "import sys; sys.modules['torch'] = None; import vdeploy.analysis"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_one_object_per_frame_tells_a_cross_fade_from_a_moving_object():
    from vdeploy.analysis import count_pieces, one_object
    from vdeploy.data import synth_clip

    clip = synth_clip("square", "red", "right", 8, 16, np.random.default_rng(0)).transpose(3, 0, 1, 2) / 255.0
    assert all(one_object(clip))  # a synthetic clip: one object in every frame
    ramp = np.linspace(0, 1, 8)[None, :, None, None]
    fade = (1 - ramp) * clip[:, :1] + ramp * clip[:, -1:]  # first and last frame cross-faded
    # the middle frames show both half-bright copies (brightness ~0.5 > the 0.3 threshold): two pieces
    assert one_object(fade, frames=range(3, 5)) == [False, False]
    mask = np.zeros((6, 6), bool)
    mask[0, 0] = True  # a one-pixel speck is no object
    mask[2:4, 2:4] = True
    assert count_pieces(mask) == 1
