"""Measure videos against the synthetic world: the object's colour, centroid track, direction, background.

numpy only (no torch): it reads what the runtime writes. The synthetic clips (``vdeploy.data.synth_clip``) are
one flat-coloured shape on black moving edge to edge in one of four directions, so a clip is measured by:

* the **object mask** per frame: pixels whose brightest channel is above ``threshold`` (0.3); a frame whose
  mask covers more than ``max_area`` (a quarter) of it has no object (it is noise: the synthetic shapes cover
  about a tenth), so noise never passes for an object at the frame's centre;
* the **centroid** per frame: the brightness-weighted mean position ``(x, y)`` of the mask, NaN where a
  frame has no object pixel;
* the **colour**: the mean RGB of the mask over the clip, named by the nearest colour of the synthetic
  palette (``SYNTH_COLORS``; its distance is reported, so "no colour at all" can be told apart);
* the **direction**: the least-squares slope of the centroid track per axis; the larger one's axis and sign
  (``left``/``right``/``up``/``down``), or ``"none"`` when the fitted travel is under ``min_travel`` px or
  fewer than two frames have an object;
* **objects per frame**: the connected pieces (4-neighbour) of the frame's mask of at least ``MIN_PIECE``
  pixels; one object is what a synthetic frame shows, a cross-fade between two positions shows two half-bright
  ghosts (two pieces);
* **background cleanliness**: the fraction of pixels outside the object's neighbourhood (farther than
  twice its radius, at most the synthetic radius ``size / 6``, from the frame's centroid, or every pixel of
  an objectless frame) that are near black
  (brightest channel under 0.1), and their mean brightness.

``prompt_adherence`` and ``centroid_error`` build on it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from vdeploy.data import SYNTH_COLORS, SYNTH_DIRECTIONS, SYNTH_SHAPES

PALETTE = {name: np.asarray(rgb, dtype=np.float64) / 255.0 for name, rgb in SYNTH_COLORS.items()}
THRESHOLD = 0.3  # object pixels: brightest channel above this (the palette's dimmest brightest channel is 0.78)
DARK = 0.1  # background pixels this dark count as clean
MIN_TRAVEL = 1.0  # px: a fitted travel below this is no motion
MAX_AREA = 0.25  # a frame whose mask covers more than this fraction has no object (noise)
MIN_PIECE = 2  # px: a mask piece smaller than this is a speck, not an object


@dataclass(frozen=True)
class ClipAnalysis:
    """What ``analyze`` measured on one clip.

    Attributes:
        color: the nearest palette colour name (``"red"``, ...), or None when no frame has an object.
        color_distance: RGB distance (in [0, 1] units) of the object's mean colour to that palette colour.
        centroids: float ``(f, 2)``, ``(x, y)`` in pixels per frame; NaN rows where the frame has no object.
        direction: ``"left"``, ``"right"``, ``"up"``, ``"down"`` or ``"none"``.
        velocity: the fitted ``(dx, dy)`` in pixels per frame.
        visible: the fraction of frames with an object.
        background: the mean brightness of the background pixels (0 = black).
        clean: the fraction of background pixels that are near black (1 = perfectly clean).
        objects: per frame, the number of separate object pieces (``count_pieces``); 1 = one object.
    """

    color: str | None
    color_distance: float
    centroids: np.ndarray
    direction: str
    velocity: tuple[float, float]
    visible: float
    background: float
    clean: float
    objects: tuple = ()


def load_clip(clip) -> np.ndarray:
    """A clip as float64 ``(c, f, h, w)`` in [0, 1]: an array of that layout (uint8 is divided by 255) or a
    GIF/PNG path (read with ``vdeploy.data``'s reader)."""
    if isinstance(clip, (str, os.PathLike)):
        from vdeploy.data import read_gif

        frames = read_gif(clip, channels=3)  # (f, h, w, c) uint8; a PNG reads as one frame
        return frames.transpose(3, 0, 1, 2).astype(np.float64) / 255.0
    a = np.asarray(clip)
    if a.ndim != 4:
        raise ValueError(f"a clip must be (c, f, h, w), got shape {a.shape}")
    if a.shape[0] not in (1, 3, 4):
        raise ValueError(f"a clip must be (c, f, h, w) with 1, 3 or 4 channels, got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError("the clip holds NaN or Inf values")
    return np.clip(a, 0.0, 1.0)


def analyze(clip, *, threshold: float = THRESHOLD, min_travel: float = MIN_TRAVEL,
            max_area: float = MAX_AREA) -> ClipAnalysis:
    """Measure one clip (see the module docstring): an array ``(c, f, h, w)`` in [0, 1] or a GIF path."""
    v = load_clip(clip)
    rgb = v[:3] if v.shape[0] >= 3 else np.repeat(v[:1], 3, axis=0)
    c, f, h, w = rgb.shape
    bright = rgb.max(axis=0)  # (f, h, w)
    mask = bright > threshold
    mask &= (mask.mean(axis=(1, 2)) <= max_area)[:, None, None]  # a frame mostly "object" is noise: no object
    weight = np.where(mask, bright, 0.0)
    ys, xs = np.mgrid[0:h, 0:w]
    mass = weight.sum(axis=(1, 2))
    centroids = np.full((f, 2), np.nan)
    seen = mass > 0
    centroids[seen, 0] = (weight * xs).sum(axis=(1, 2))[seen] / mass[seen]
    centroids[seen, 1] = (weight * ys).sum(axis=(1, 2))[seen] / mass[seen]

    color, distance = None, float("nan")
    if mask.any():
        mean_rgb = rgb[:, mask].mean(axis=1)
        names = list(PALETTE)
        dists = [float(np.linalg.norm(mean_rgb - PALETTE[n])) for n in names]
        color, distance = names[int(np.argmin(dists))], min(dists)

    direction, velocity = "none", (0.0, 0.0)
    frames = np.flatnonzero(seen)
    if len(frames) >= 2:
        slope = np.polyfit(frames.astype(np.float64), centroids[frames], 1)[0]  # (2,): px per frame in x, y
        velocity = (float(slope[0]), float(slope[1]))
        axis = int(np.argmax(np.abs(slope)))
        if abs(slope[axis]) * (f - 1) >= min_travel:
            direction = ("right" if slope[0] > 0 else "left") if axis == 0 else ("down" if slope[1] > 0 else "up")

    # background: every pixel farther than twice the object's radius from its frame's centroid
    background = np.ones((f, h, w), bool)
    for i in frames:
        radius = min(np.sqrt(mask[i].sum() / np.pi), max(h, w) / 6)  # at most the synthetic shapes' radius
        near = (xs - centroids[i, 0]) ** 2 + (ys - centroids[i, 1]) ** 2 <= (2 * radius + 1) ** 2
        background[i] = ~near
    bg = bright[background]
    return ClipAnalysis(
        color=color, color_distance=distance, centroids=centroids, direction=direction, velocity=velocity,
        visible=float(seen.mean()), background=float(bg.mean()) if bg.size else 0.0,
        clean=float((bg < DARK).mean()) if bg.size else 1.0,
        objects=tuple(count_pieces(m) for m in mask),
    )


def count_pieces(mask: np.ndarray, min_piece: int = MIN_PIECE) -> int:
    """The number of 4-connected pieces of a 2-d bool ``mask`` with at least ``min_piece`` pixels."""
    mask = np.asarray(mask, bool)
    seen = np.zeros_like(mask)
    h, w = mask.shape
    pieces = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, size = [(y0, x0)], 0
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        pieces += size >= min_piece
    return pieces


def one_object(clip, frames=None) -> list[bool]:
    """Per frame (of ``frames``, default all): does it show exactly one object (``analyze``'s ``objects``)?"""
    got = analyze(clip).objects
    return [got[i] == 1 for i in (range(len(got)) if frames is None else frames)]


_WORD = re.compile(r"[a-z]+")


def parse_prompt(text: str) -> dict:
    """The synthetic captions' vocabulary in ``text``: ``{"color", "shape", "direction"}`` (None where absent).

    Raises:
        ValueError: the prompt names more than one colour, shape or direction.
    """
    words = _WORD.findall(text.lower())
    out = {}
    for key, vocab in (("color", SYNTH_COLORS), ("shape", SYNTH_SHAPES), ("direction", SYNTH_DIRECTIONS)):
        found = sorted({w for w in words if w in vocab})
        if len(found) > 1:
            raise ValueError(f"prompt {text!r} names more than one {key}: {', '.join(found)}")
        out[key] = found[0] if found else None
    return out


def adherence(clips, prompts) -> list[dict]:
    """Per clip: the prompt's colour and direction, what was measured, and whether each matches.

    Args:
        clips: ``(b, c, f, h, w)`` in [0, 1], or a sequence of clips / GIF paths.
        prompts: one prompt per clip (synthetic caption vocabulary: "a red circle moving left").

    Raises:
        ValueError: different counts, or a prompt without a colour or a direction word.
    """
    clips = list(clips)
    prompts = list(prompts)
    if len(clips) != len(prompts):
        raise ValueError(f"{len(clips)} clips but {len(prompts)} prompts")
    rows = []
    for clip, prompt in zip(clips, prompts):
        want = parse_prompt(prompt)
        if want["color"] is None or want["direction"] is None:
            raise ValueError(f"prompt {prompt!r} needs a colour ({', '.join(SYNTH_COLORS)}) and a direction "
                             f"({', '.join(SYNTH_DIRECTIONS)})")
        got = analyze(clip)
        rows.append({
            "prompt": prompt, "color": got.color, "direction": got.direction, "clean": got.clean,
            "color_ok": got.color == want["color"], "direction_ok": got.direction == want["direction"],
            "ok": got.color == want["color"] and got.direction == want["direction"],
        })
    return rows


def prompt_adherence(clips, prompts) -> float:
    """The fraction of clips whose measured colour and direction both match their prompt (see ``adherence``)."""
    rows = adherence(clips, prompts)
    return sum(r["ok"] for r in rows) / len(rows) if rows else float("nan")


def centroid_error(pred, truth, *, frames=None) -> float:
    """The mean distance in pixels between the object's centroids in ``pred`` and ``truth``.

    Args:
        pred, truth: clips ``(c, f, h, w)`` (or GIF paths), or centroid tracks ``(f, 2)`` as ``analyze``
            returns them; the same number of frames.
        frames: the frame indices to score (default: all).

    A frame where ``truth`` has no object is skipped; one where ``pred`` has none (but truth does) counts
    the frame's half diagonal (a lost object is a large error, never a silent skip). NaN if no frame counts.
    """
    def track(v):
        a = np.asarray(v) if not isinstance(v, (str, os.PathLike)) else None
        if a is not None and a.ndim == 2 and a.shape[1] == 2:
            return a.astype(np.float64), None
        clip = load_clip(v)
        return analyze(clip).centroids, clip.shape[2:]

    p, p_hw = track(pred)
    t, t_hw = track(truth)
    if p.shape != t.shape:
        raise ValueError(f"pred has {p.shape[0]} frames, truth {t.shape[0]}")
    hw = p_hw or t_hw
    penalty = 0.5 * float(np.hypot(*hw)) if hw else float("nan")
    idx = np.arange(len(t)) if frames is None else np.asarray(frames)
    errors = []
    for i in idx:
        if np.isnan(t[i]).any():
            continue
        errors.append(penalty if np.isnan(p[i]).any() else float(np.linalg.norm(p[i] - t[i])))
    return float(np.mean(errors)) if errors else float("nan")
