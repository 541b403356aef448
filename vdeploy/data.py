"""Video data: GIF read/write, the GIF-folder ``Dataset`` and a synthetic moving-shapes dataset.

PIL and numpy only (no torchvision). torch is imported inside the functions that return or take
tensors, so ``vdeploy data synth`` never pays for it.

Layout of a dataset folder: ``name.gif`` files (any depth), each optionally with a caption in
``name.txt`` beside it.

GIF writing is exact for frames with at most 256 colours (255 plus transparency for RGBA, whose
alpha is 1 bit in GIF: >= 128 is opaque). Frames with more colours are quantized per frame
(median cut, no dithering). Identical consecutive frames are kept as separate frames (Pillow's
``save_all`` would merge them and change the frame count on read-back).
"""

from __future__ import annotations

import io
import itertools
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
from PIL import GifImagePlugin, Image, ImageDraw

from vdeploy.runtime import atomic

if TYPE_CHECKING:  # pragma: no cover
    import torch

CHANNELS_TO_MODE = {1: "L", 3: "RGB", 4: "RGBA"}


class DataError(ValueError):
    """A data folder or file that cannot be used; the message names it."""


class UnreadableVideoWarning(UserWarning):
    """A video file was skipped because it could not be decoded."""


# ----------------------------------------------------------------- GIF I/O ----


def _check_channels(channels: int) -> str:
    if channels not in CHANNELS_TO_MODE:
        raise ValueError(f"channels must be one of {sorted(CHANNELS_TO_MODE)}, got {channels}")
    return CHANNELS_TO_MODE[channels]


def seek_all_images(img: Image.Image, channels: int = 3) -> Iterator[Image.Image]:
    """Every frame of an opened (animated) image, converted to the mode for ``channels``."""
    mode = _check_channels(channels)
    i = 0
    while True:
        try:
            img.seek(i)
        except EOFError:
            break
        yield img.convert(mode)
        i += 1


# A decoded video larger than this is refused (a 64-frame 2048x2048 RGB clip is 805 MB): a GIF header may
# claim 65535x65535 pixels in a few bytes, and no model here trains on frames anywhere near that size.
MAX_VIDEO_BYTES = 1 << 30


def read_gif(path: str | os.PathLike, channels: int = 3) -> np.ndarray:
    """Read every frame of a GIF as uint8 ``(frames, height, width, channels)``.

    Raises:
        DataError: the file is missing, not a GIF, truncated or otherwise undecodable, has no frames,
            or decodes to more than :data:`MAX_VIDEO_BYTES`; the message names the file.
    """
    mode = _check_channels(channels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.format != "GIF":
                    raise DataError(f"cannot read {path}: it is {img.format or 'an unknown format'}, not a GIF")
                frames, decoded = [], 0
                for i in itertools.count():
                    try:
                        img.seek(i)
                    except EOFError:
                        break
                    w, h = img.size  # a frame reaching past the logical screen makes pillow grow it
                    decoded += max(1, w * h * channels)
                    if decoded > MAX_VIDEO_BYTES:
                        raise DataError(f"cannot read {path}: {w}x{h} frames, more than "
                                        f"{MAX_VIDEO_BYTES >> 20} MiB decoded after {i} frames")
                    if frames and (h, w) != frames[0].shape[:2]:
                        raise DataError(f"cannot read {path}: frame {i} is {w}x{h} but frame 0 is "
                                        f"{frames[0].shape[1]}x{frames[0].shape[0]}")
                    frames.append(np.asarray(img.convert(mode)))
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"cannot read {path}: no such file") from None
    except (Exception, MemoryError) as e:  # noqa: BLE001 (pillow raises many kinds for damaged files)
        raise DataError(f"cannot read {path}: {_reason(e)}") from None
    if not frames:
        raise DataError(f"{path} has no frames")
    out = np.stack(frames)
    return out[..., None] if out.ndim == 3 else out


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, Image.UnidentifiedImageError):
        return "not an image pillow can decode"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _to_palette(frame: np.ndarray) -> tuple[Image.Image, int | None]:
    """One ``(h, w, c)`` uint8 frame -> a "P" image (exact when it has <= 256 colours) and its
    transparent index (RGBA frames with any alpha < 128), or None."""
    h, w, c = frame.shape
    if c == 1:
        im = _p_image(frame[..., 0])
        im.putpalette(np.repeat(np.arange(256, dtype=np.uint8), 3).tobytes())  # grey: exact
        return im, None
    rgb = frame[..., :3].astype(np.uint32)
    opaque = frame[..., 3] >= 128 if c == 4 else np.ones((h, w), bool)
    has_transparency = not opaque.all()
    key = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    colors, inverse = np.unique(key[opaque], return_inverse=True)
    budget = 255 if has_transparency else 256
    idx = np.zeros((h, w), np.uint8)
    palette = np.zeros((256, 3), np.uint8)
    if len(colors) <= budget:
        idx[opaque] = inverse.astype(np.uint8)
        palette[: len(colors)] = np.stack([colors >> 16, (colors >> 8) & 255, colors & 255], -1)
        n = len(colors)
    else:  # too many colours for GIF: quantize (lossy, as any GIF writer must)
        q = Image.fromarray(np.ascontiguousarray(frame[..., :3])).quantize(
            colors=budget, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
        )
        idx = np.asarray(q).copy()
        pal = np.frombuffer(bytes(q.getpalette() or []), np.uint8).reshape(-1, 3)[:budget]
        palette[: len(pal)] = pal
        n = budget
    transparency = None
    if has_transparency:
        transparency = min(n, 255)
        idx[~opaque] = transparency
    im = _p_image(idx)
    im.putpalette(palette.tobytes())
    return im, transparency


def _p_image(idx: np.ndarray) -> Image.Image:
    return Image.frombytes("P", (idx.shape[1], idx.shape[0]), np.ascontiguousarray(idx, np.uint8).tobytes())


def write_gif(
    frames: np.ndarray, path: str | os.PathLike, duration: int = 120, loop: int = 0
) -> Path:
    """Write uint8 ``(frames, height, width[, channels])`` (1, 3 or 4 channels) as an animated GIF.

    Args:
        frames: the video; float arrays are taken as [0, 1] and rounded to uint8.
        path: output file; written atomically (temporary file, then rename).
        duration: milliseconds per frame.
        loop: GIF loop count (0 = forever).
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = np.round(np.clip(frames.astype(np.float64), 0.0, 1.0) * 255).astype(np.uint8)
    if frames.ndim == 3:
        frames = frames[..., None]
    if frames.ndim != 4 or frames.shape[-1] not in CHANNELS_TO_MODE or frames.shape[0] == 0:
        raise ValueError(f"expected (frames, h, w, c) with c in 1/3/4, got shape {frames.shape}")
    buf = io.BytesIO()
    pal_frames = [_to_palette(f) for f in frames]
    header, _ = GifImagePlugin.getheader(pal_frames[0][0], info={"loop": loop, "duration": duration})
    for chunk in header:
        buf.write(chunk)
    for im, transparency in pal_frames:
        # Every frame complete with its own colour table; disposal 2 so transparent pixels
        # do not show the previous frame through.
        params = {"duration": duration, "include_color_table": True, "disposal": 2}
        if transparency is not None:
            params["transparency"] = transparency
        for chunk in GifImagePlugin.getdata(im, **params):
            buf.write(chunk)
    buf.write(b";")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic.write_bytes(path, buf.getvalue())


def video_tensor_to_gif(
    tensor: "torch.Tensor", path: str | os.PathLike, duration: int = 120, loop: int = 0, optimize: bool = True
) -> list[Image.Image]:
    """Write a ``(channels, frames, h, w)`` tensor in [0, 1] as a GIF; returns the frames as PIL images.

    As the seed's function, but values are clamped and rounded (not truncated), so a tensor read
    by :func:`gif_to_tensor` writes back to the same bytes. ``optimize`` is accepted for
    compatibility; palettes are always minimal.
    """
    if tensor.ndim != 4:
        raise ValueError(f"expected a (channels, frames, height, width) tensor, got shape {tuple(tensor.shape)}")
    frames = tensor.detach().float().clamp(0, 1).mul(255).round().to("cpu").byte()
    frames = frames.permute(1, 2, 3, 0).numpy()  # f h w c
    write_gif(frames, path, duration=duration, loop=loop)
    return [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f) for f in frames]


def gif_to_tensor(path: str | os.PathLike, channels: int = 3, transform=None) -> "torch.Tensor":
    """Read a GIF as a float ``(channels, frames, h, w)`` tensor in [0, 1].

    ``transform``, when given, maps each PIL frame to a ``(channels, h, w)`` tensor (the seed's
    hook); by default frames are converted exactly (value / 255).
    """
    import torch

    if transform is not None:
        with Image.open(path) as img:
            return torch.stack([transform(im) for im in seek_all_images(img, channels)], dim=1)
    return _frames_to_tensor(read_gif(path, channels))


def _frames_to_tensor(frames: np.ndarray) -> "torch.Tensor":
    import torch

    return torch.from_numpy(np.ascontiguousarray(frames.transpose(3, 0, 1, 2))).float().div_(255)


def cast_num_frames(t: "torch.Tensor", *, frames: int) -> "torch.Tensor":
    """Truncate or zero-pad a ``(channels, frames, h, w)`` video to ``frames`` frames (the seed's rule)."""
    import torch.nn.functional as F

    f = t.shape[1]
    if f == frames:
        return t
    if f > frames:
        return t[:, :frames]
    return F.pad(t, (0, 0, 0, 0, 0, frames - f))


def resize_center_crop(frames: np.ndarray, image_size: int) -> np.ndarray:
    """Resize so the shorter side is ``image_size`` (bilinear, antialiased), then center crop a square.

    The PIL equivalent of torchvision's ``Resize(image_size)`` + ``CenterCrop(image_size)``.
    """
    f, h, w, c = frames.shape
    if h == image_size and w == image_size:
        return frames
    if h <= w:
        nh, nw = image_size, max(image_size, int(image_size * w / h))
    else:
        nh, nw = max(image_size, int(image_size * h / w)), image_size
    top = int(round((nh - image_size) / 2.0))
    left = int(round((nw - image_size) / 2.0))
    out = np.empty((f, image_size, image_size, c), np.uint8)
    for i in range(f):
        im = Image.fromarray(frames[i, ..., 0] if c == 1 else frames[i])
        if (nh, nw) != (h, w):
            im = im.resize((nw, nh), Image.Resampling.BILINEAR)
        im = im.crop((left, top, left + image_size, top + image_size))
        a = np.asarray(im)
        out[i] = a[..., None] if a.ndim == 2 else a
    return out


# ----------------------------------------------------------------- Dataset ----


class Dataset:
    """A folder of GIFs as a map-style dataset (usable with ``torch.utils.data.DataLoader``).

    ``ds[i]`` is the video as a float ``(channels, num_frames, image_size, image_size)`` tensor in
    [0, 1], as in the seed; ``ds.captions[i]`` is the text of ``name.txt`` beside ``name.gif``, or
    None. Files are found recursively and sorted, so the index order is the same on every machine.

    A file that cannot be decoded is skipped with one :class:`UnreadableVideoWarning` naming it
    (its index then serves the next readable video). An empty or missing folder raises
    :class:`DataError`.

    Args:
        folder: the dataset folder.
        image_size: frames are resized (shorter side) and center-cropped to this square size.
        channels: 1, 3 or 4.
        num_frames: videos are truncated or zero-padded to this length when ``force_num_frames``.
        horizontal_flip: flip whole clips left-right with probability 0.5 (torch's global RNG).
        exts: file extensions to collect.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        image_size: int,
        channels: int = 3,
        num_frames: int = 16,
        horizontal_flip: bool = False,
        force_num_frames: bool = True,
        exts: Sequence[str] = ("gif",),
    ):
        _check_channels(channels)
        self.folder = Path(folder)
        self.image_size = image_size
        self.channels = channels
        self.num_frames = num_frames
        self.horizontal_flip = horizontal_flip
        self.force_num_frames = force_num_frames
        if self.folder.exists() and not self.folder.is_dir():
            raise DataError(f"data folder {self.folder} is a file, not a directory")
        if not self.folder.is_dir():
            raise DataError(f"data folder {self.folder} does not exist")
        found = sorted({p for ext in exts for p in self.folder.glob(f"**/*.{ext}") if p.is_file()})
        if not found:
            raise DataError(f"no {'/'.join('.' + e for e in exts)} files found in {self.folder}")
        self._bad: set[Path] = set()
        self.paths = [p for p in found if self._header_ok(p)]
        if not self.paths:
            raise DataError(f"none of the {len(found)} files in {self.folder} could be read")
        self.captions: list[str | None] = [_read_caption(p) for p in self.paths]

    def _header_ok(self, path: Path) -> bool:
        try:
            with Image.open(path) as img:
                img.size  # noqa: B018 (parses the header)
            return True
        except Exception as e:  # noqa: BLE001 (any decoder error means: skip this file)
            self._skip(path, e)
            return False

    def _skip(self, path: Path, err: Exception) -> None:
        if path not in self._bad:
            self._bad.add(path)
            what = str(err) if isinstance(err, DataError) else f"{path}: {err}"
            warnings.warn(f"skipping unreadable video {what}", UnreadableVideoWarning, stacklevel=3)

    def __len__(self) -> int:
        return len(self.paths)

    def shortest(self, n: int = 16) -> int:
        """The fewest frames among the first ``n`` readable videos (unreadable ones are skipped, with a warning).

        Raises:
            DataError: none of the videos can be decoded.
        """
        counts = []
        for path in self.paths:
            if len(counts) >= n:
                break
            if path in self._bad:
                continue
            try:
                counts.append(read_gif(path, self.channels).shape[0])
            except DataError as e:
                self._skip(path, e)
        if not counts:
            raise DataError(f"none of the {len(self.paths)} videos in {self.folder} could be decoded")
        return min(counts)

    def load_frames(self, index: int) -> np.ndarray:
        """The uint8 ``(frames, h, w, c)`` video at ``index`` after resize and crop (no flip, no casting)."""
        n = len(self.paths)
        for k in range(n):
            path = self.paths[(index + k) % n]
            if path in self._bad:
                continue
            try:
                frames = read_gif(path, self.channels)
            except DataError as e:
                self._skip(path, e)
                continue
            return resize_center_crop(frames, self.image_size)
        raise DataError(f"none of the {n} videos in {self.folder} could be read")

    def __getitem__(self, index: int) -> "torch.Tensor":
        import torch

        frames = self.load_frames(index)
        if self.horizontal_flip and torch.rand(()) < 0.5:
            frames = frames[:, :, ::-1]
        video = _frames_to_tensor(frames)
        return cast_num_frames(video, frames=self.num_frames) if self.force_num_frames else video


MAX_CAPTION_BYTES = 64 * 1024  # text encoders read 128-512 tokens; a caption file this large is not a caption


def read_caption(video: str | os.PathLike) -> str | None:
    """The caption of ``name.gif``: the UTF-8 text of ``name.txt`` beside it, stripped; None without one.

    Raises:
        DataError: the caption file cannot be read, is not UTF-8 text (or holds NUL bytes), is empty,
            or is larger than :data:`MAX_CAPTION_BYTES`; the message names it.
    """
    txt = Path(video).with_suffix(".txt")
    if not txt.is_file():
        return None
    try:
        with open(txt, "rb") as f:
            raw = f.read(MAX_CAPTION_BYTES + 1)
    except OSError as e:
        raise DataError(f"cannot read caption {txt}: {e.strerror or e}") from None
    if len(raw) > MAX_CAPTION_BYTES:
        raise DataError(f"caption {txt} is larger than {MAX_CAPTION_BYTES // 1024} KiB")
    try:
        text = raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise DataError(f"caption {txt} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
    if "\0" in text:
        raise DataError(f"caption {txt} holds NUL bytes: not a text file")
    if not text:
        raise DataError(f"caption {txt} is empty")
    return text


class UnreadableCaptionWarning(UserWarning):
    """A caption file was ignored (its video counts as uncaptioned) because it could not be used."""


def _read_caption(path: Path) -> str | None:
    try:
        return read_caption(path)
    except DataError as e:
        warnings.warn(f"ignoring caption: {e}", UnreadableCaptionWarning, stacklevel=3)
        return None


# ---------------------------------------------------------- synthetic data ----

SYNTH_COLORS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
}
SYNTH_SHAPES = ("circle", "square", "triangle")
SYNTH_DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def synth_clip(
    shape: str, color: str, direction: str, frames: int, size: int, rng: np.random.Generator
) -> np.ndarray:
    """One clip, uint8 ``(frames, size, size, 3)``: a flat-coloured shape crossing a black frame.

    The shape (diameter about ``size / 3``) crosses the frame from edge to edge in ``direction``
    at constant speed (about 19 px over the clip at 32 px), so the motion is plain and the task
    small enough for a tiny model; only its cross-axis position is random.
    """
    r = max(2, size // 6)
    dx, dy = SYNTH_DIRECTIONS[direction]
    lo, hi = r + 1, size - r - 2  # centre range that keeps the shape inside the frame
    along0, travel = float(lo), float(hi - lo)
    cross = float(rng.uniform(lo, hi))
    rgb = SYNTH_COLORS[color]
    out = np.zeros((frames, size, size, 3), np.uint8)
    for i in range(frames):
        a = along0 + travel * (i / max(frames - 1, 1))
        a = a if (dx + dy) > 0 else (size - 1) - a  # left/up: mirrored, starting on the far side
        cx, cy = (a, cross) if dx else (cross, a)
        im = Image.new("RGB", (size, size))
        draw = ImageDraw.Draw(im)
        box = (round(cx - r), round(cy - r), round(cx + r), round(cy + r))
        if shape == "circle":
            draw.ellipse(box, fill=rgb)
        elif shape == "square":
            draw.rectangle(box, fill=rgb)
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=rgb)
        out[i] = np.asarray(im)
    return out


_SYNTH_NAME = re.compile(r"^\d{5,}\.(gif|txt)$")
SYNTH_MAX_SIZE, SYNTH_MAX_FRAMES = 1024, 1024


def synth_dataset(
    out: str | os.PathLike, num: int = 64, frames: int = 8, size: int = 32, seed: int = 0, overwrite: bool = False
) -> list[Path]:
    """Write ``num`` synthetic clips as ``out/00000.gif`` + ``out/00000.txt`` ("a red circle moving left").

    Colour, shape and direction are drawn uniformly from a seeded generator, so the same
    arguments always write the same dataset.

    Args:
        overwrite: ``out`` may already hold clips: the earlier synthetic ones (``NNNNN.gif``/``.txt``)
            are deleted first. Without it, a folder with any GIF in it is refused.

    Returns:
        the GIF paths, in order.

    Raises:
        DataError: bad sizes, or ``out`` already holds GIFs and ``overwrite`` is off.
    """
    if num <= 0 or frames <= 0 or size < 8 or size > SYNTH_MAX_SIZE or frames > SYNTH_MAX_FRAMES:
        raise DataError(f"need num > 0, 1 <= frames <= {SYNTH_MAX_FRAMES} and 8 <= size <= {SYNTH_MAX_SIZE} "
                        f"(got num={num}, frames={frames}, size={size})")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a directory")
    existing = sorted(out.glob("**/*.gif")) if out.is_dir() else []
    if existing and not overwrite:
        raise DataError(f"{out} already holds {len(existing)} clip(s) ({existing[0].name}, ...): pass --overwrite "
                        "(overwrite=True) to replace a synthetic dataset, or pick another folder")
    if overwrite and out.is_dir():
        for old in out.iterdir():
            if old.is_file() and _SYNTH_NAME.match(old.name):
                old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colors, directions = list(SYNTH_COLORS), list(SYNTH_DIRECTIONS)
    width = max(5, len(str(num - 1)))
    paths = []
    for i in range(num):
        color = colors[rng.integers(len(colors))]
        shape = SYNTH_SHAPES[rng.integers(len(SYNTH_SHAPES))]
        direction = directions[rng.integers(len(directions))]
        clip = synth_clip(shape, color, direction, frames, size, rng)
        path = write_gif(clip, out / f"{i:0{width}d}.gif")
        atomic.write_text(path.with_suffix(".txt"), f"a {color} {shape} moving {direction}\n")
        paths.append(path)
    return paths
