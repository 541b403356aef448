"""Writing sampled videos: GIF with pillow (a batch becomes a grid, as the seed's trainer does), MP4 with
PyAV (the ``[video]`` extra: FFmpeg's libraries in its wheels, encoding in process from numpy frames).

Both write atomically (:mod:`.atomic`): an encoder that fails, a full disk or a kill leaves an existing
file at the path byte for byte as it was.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .atomic import atomic_path

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def _as_batch(video) -> np.ndarray:
    """``(c, f, h, w)`` or ``(b, c, f, h, w)`` -> float32 ``(b, c, f, h, w)``; any other shape is a ValueError."""
    video = np.asarray(video, dtype=np.float32)
    if video.ndim == 4:
        video = video[None]
    if video.ndim != 5:
        raise ValueError(f"video must be (c, f, h, w) or (b, c, f, h, w), got shape {video.shape}")
    return video


def to_frames(video: np.ndarray, pad: int = 2) -> np.ndarray:
    """``(c, f, h, w)`` or ``(b, c, f, h, w)`` floats in [0, 1] -> uint8 frames ``(f, H, W, c)``.

    A batch of two or more is laid out as a grid, ``ceil(sqrt(b))`` videos a row, each padded by ``pad``
    black pixels (the seed's trainer: ``F.pad(videos, (2, 2, 2, 2))`` then ``'(i j) c f h w -> c f (i h)
    (j w)'``); a single video, ``(c, f, h, w)`` or a batch of one, keeps the model's size. Values map to bytes
    as torchvision's ``ToPILImage`` does (``x * 255`` truncated).
    """
    video = _as_batch(video)
    b, c, f, h, w = video.shape
    if c not in _MODES:
        raise ValueError(f"video has {c} channels; GIF/MP4 frames need 1, 3 or 4")
    if b > 1:
        video = np.pad(video, ((0, 0), (0, 0), (0, 0), (pad, pad), (pad, pad)))
        cols = math.ceil(math.sqrt(b))
        rows = math.ceil(b / cols)
        if rows * cols > b:
            video = np.concatenate([video, np.zeros((rows * cols - b, *video.shape[1:]), np.float32)])
        hp, wp = video.shape[-2:]
        # (i j) c f h w -> c f (i h) (j w)
        video = video.reshape(rows, cols, c, f, hp, wp).transpose(2, 3, 0, 4, 1, 5).reshape(c, f, rows * hp, cols * wp)
    else:
        video = video[0]
    frames = (np.clip(video, 0.0, 1.0) * 255).astype(np.uint8)  # c f H W
    return np.ascontiguousarray(frames.transpose(1, 2, 3, 0))  # f H W c


def caption(video: np.ndarray, labels, min_width: int = 128) -> np.ndarray:
    """Each video with its label written under it, so a grid shows which prompt made which video.

    ``(c, f, h, w)`` or ``(b, c, f, h, w)`` in [0, 1] -> ``(b, c, f, s * h + band, s * w)``: every video scaled up
    (nearest) by the smallest integer ``s`` that makes it at least ``min_width`` px wide, its label under it in
    pillow's built-in font, white on black, wrapped at spaces, the same on every frame.
    """
    from PIL import Image, ImageDraw, ImageFont

    video = _as_batch(video)
    b, c, f, h, w = video.shape
    labels = [str(label) for label in labels]
    if len(labels) != b:
        raise ValueError(f"{len(labels)} labels for {b} videos")
    s = max(1, math.ceil(min_width / w))
    video = video.repeat(s, axis=3).repeat(s, axis=4)
    font = ImageFont.load_default()
    width = w * s
    wrapped = [_wrap(label, font, width - 4) for label in labels]
    line = font.getbbox("Ag")[3] + 2
    band = np.zeros((b, c, 1, max(map(len, wrapped)) * line + 4, width), np.float32)
    for i, lines in enumerate(wrapped):
        image = Image.new("L", band.shape[-1:-3:-1])
        draw = ImageDraw.Draw(image)
        for j, text in enumerate(lines):
            draw.text((2, 2 + j * line), text, fill=255, font=font)
        band[i, :] = np.asarray(image, np.float32)[None, None] / 255
    if c == 4:
        band[:, 3] = 1.0  # an opaque band
    return np.concatenate([video, np.broadcast_to(band, (b, c, f, *band.shape[3:]))], axis=3)


def _wrap(text: str, font, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` px where spaces allow (a longer word keeps its own line)."""
    lines: list[str] = []
    for word in text.split() or [""]:
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def save_gif(video: np.ndarray, path: str | Path, fps: float = 1000 / 120, loop: int = 0) -> Path:
    """Write a video (or a batch, as a grid) as an animated GIF.

    Args:
        video: ``(c, f, h, w)`` or ``(b, c, f, h, w)`` floats in [0, 1], as ``Pipeline`` returns.
        path: the ``.gif`` file.
        fps: frames per second (default: the seed's 120 ms a frame).
        loop: GIF loop count (0: forever).
    """
    from PIL import Image

    frames = to_frames(video)
    mode = _MODES[frames.shape[-1]]
    images = [Image.fromarray(frame[..., 0] if mode == "L" else frame, mode=mode) for frame in frames]
    path = Path(path)
    with atomic_path(path) as tmp:
        images[0].save(
            tmp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=loop,
            optimize=True,
        )
    return path


# H.264 in yuv420p plays everywhere; CRF 17 is x264's "visually lossless" end, which the small frames of a
# video-diffusion model afford (tests/test_runtime_video.py states what survives the round trip).
MP4_CRF = 17


def save_mp4(video: np.ndarray, path: str | Path, fps: float = 8.0) -> Path:
    """Write a video (or a batch, as a grid) as H.264 MP4 (yuv420p, CRF :data:`MP4_CRF`) with PyAV.

    Odd frame sizes are padded by one black row or column (yuv420p needs even sizes).

    Raises:
        RuntimeError: PyAV is not installed (the message says what to install).
    """
    frames = to_frames(video)
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    frames = frames[..., :3]
    f, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    try:
        import av
    except ImportError:
        raise RuntimeError("writing MP4 needs PyAV: pip install 'vdeploy[video]' (or pip install av)") from None
    path = Path(path)
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=round(fps), options={"crf": str(MP4_CRF)})
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())  # flush the encoder's delayed frames
    return path


def read_mp4(path: str | Path) -> tuple[np.ndarray, float]:
    """An MP4's frames as uint8 ``(f, H, W, 3)`` RGB and its frame rate, with PyAV (for checks and tests)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return np.stack(frames), float(stream.average_rate)
