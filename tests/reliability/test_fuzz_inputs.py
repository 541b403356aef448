"""Hypothesis-generated bad input against the boundaries where files and settings enter: the GIF reader,
the caption reader and config ``resolve``/``load``. Each case ends in a correct result or one of vdeploy's
own errors (``DataError``, ``ConfigError``) — never another exception type."""

from __future__ import annotations

import io
import json
import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from reliability_support import count

from vdeploy import config as C
from vdeploy.data import MAX_CAPTION_BYTES, DataError, Dataset, read_caption, read_gif, write_gif

# derandomized: CI sees the same cases every run (full mode sees ten times as many); no example database
FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)


def fuzz(request, name: str) -> settings:
    """The shared settings with the case count of ``name`` in this mode (CI or --reliability-full)."""
    return settings(FUZZ, max_examples=count(name, bool(request.config.getoption("--reliability-full"))))


# ------------------------------------------------------------------------------------------ GIF reader --


def _valid_gif(frames: int = 3, size: int = 6, channels: int = 3) -> bytes:
    video = (np.random.default_rng(frames * 7 + size).integers(0, 6, (frames, size, size, channels)) * 51)
    buf = io.BytesIO()
    images = [Image.fromarray(f.astype(np.uint8)) for f in video]
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=100)
    return buf.getvalue()


SEED_GIFS = [_valid_gif(1, 4), _valid_gif(3, 6), _valid_gif(5, 9)]


@st.composite
def damaged_gifs(draw) -> bytes:
    """Random bytes, or a valid GIF truncated, with bytes flipped or overwritten, or with a spliced tail."""
    kind = draw(st.sampled_from(["random", "gif-prefix", "truncate", "flip", "overwrite", "splice", "header"]))
    base = bytearray(draw(st.sampled_from(SEED_GIFS)))
    if kind == "random":
        return draw(st.binary(max_size=400))
    if kind == "gif-prefix":
        return b"GIF89a" + draw(st.binary(max_size=400))
    if kind == "truncate":
        return bytes(base[: draw(st.integers(0, len(base)))])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(base) - 1))
            base[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(base)
    if kind == "overwrite":
        i = draw(st.integers(0, len(base) - 1))
        chunk = draw(st.binary(min_size=1, max_size=32))
        base[i : i + len(chunk)] = chunk
        return bytes(base)
    if kind == "splice":
        return bytes(base[: draw(st.integers(0, len(base)))]) + draw(st.binary(max_size=200))
    # "header": a logical screen of another size in front of the real data: small, or huge in either
    # direction (both huge: a decompression bomb). Mid sizes (9000 x 9000) would only make each case slow.
    side = st.one_of(st.integers(0, 64), st.integers(20000, 65535))
    w, h = draw(side), draw(side)
    base[6:10] = w.to_bytes(2, "little") + h.to_bytes(2, "little")
    return bytes(base)


def test_gif_reader_returns_frames_or_data_error(tmp_path, request):
    path = tmp_path / "clip.gif"
    outcomes = {"frames": 0, "DataError": 0}

    @fuzz(request, "gif_reader")
    @given(data=damaged_gifs(), channels=st.sampled_from([1, 3, 4]))
    def check(data, channels):
        path.write_bytes(data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                video = read_gif(path, channels)
        except DataError as e:
            assert str(path) in str(e)
            outcomes["DataError"] += 1
            return
        assert video.dtype == np.uint8 and video.ndim == 4 and video.shape[-1] == channels
        assert video.shape[0] >= 1 and video.nbytes <= 1 << 30
        outcomes["frames"] += 1

    check()
    assert outcomes["frames"] and outcomes["DataError"], outcomes  # the generator reached both outcomes


def test_intact_gifs_still_read_exactly(tmp_path):
    video = (np.random.default_rng(0).integers(0, 6, (4, 8, 8, 3)) * 51).astype(np.uint8)
    assert np.array_equal(read_gif(write_gif(video, tmp_path / "v.gif")), video)


def test_a_truncated_gif_in_a_dataset_is_skipped(tmp_path):
    """What `vdeploy train` meets when a truncated GIF is among the first of a dataset."""
    for i in range(3):
        write_gif((np.random.default_rng(i).integers(0, 6, (4 + i, 8, 8, 3)) * 51).astype(np.uint8),
                  tmp_path / f"{i}.gif")
    good = (tmp_path / "0.gif").read_bytes()
    (tmp_path / "0.gif").write_bytes(good[: len(good) - 40])
    with pytest.warns(UserWarning, match="0.gif"):
        ds = Dataset(tmp_path, image_size=8, num_frames=4)
        assert ds.shortest() == 5  # 0.gif (4 frames) is undecodable: 1.gif's 5 frames are the fewest


# -------------------------------------------------------------------------------------- caption reader --


def test_caption_reader_returns_text_none_or_data_error(tmp_path, request):
    video = tmp_path / "clip.gif"
    caption = tmp_path / "clip.txt"
    outcomes = {"text": 0, "DataError": 0}
    texts = st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass"))
    encoded = st.tuples(st.text(max_size=40), st.sampled_from(["latin-1", "utf-16", "utf-32", "cp1252"])).map(
        lambda te: te[0].encode(te[1], "replace"))
    big = st.integers(MAX_CAPTION_BYTES - 2, MAX_CAPTION_BYTES + 2).map(lambda n: b"a" * n)

    @fuzz(request, "caption_reader")
    @given(data=st.one_of(st.binary(max_size=200), texts, encoded, big, st.just(b"\xef\xbb\xbfa caption\n")))
    def check(data):
        caption.write_bytes(data)
        try:
            text = read_caption(video)
        except DataError as e:
            assert str(caption) in str(e)
            outcomes["DataError"] += 1
            return
        assert isinstance(text, str) and text == text.strip() and text and "\0" not in text
        assert text.encode("utf-8")  # a str the tokenizer can take
        outcomes["text"] += 1

    check()
    caption.unlink()
    assert read_caption(video) is None
    assert outcomes["text"] and outcomes["DataError"], outcomes


# --------------------------------------------------------------------------------------- config resolve --

KNOWN = sorted({**C.UNET_DEFAULTS, **C.DIFFUSION_DEFAULTS, **C.SCHEDULE_DEFAULTS, **C.TRAINING_DEFAULTS})
json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 40),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, 1.0, 0.0, -0.0, 1e-9]),
    st.text(max_size=8), st.sampled_from(["group", "rms", "l1", "l2", "resnet"]),
)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
    st.text(max_size=5), inner, max_size=3), max_leaves=8)
plausible = st.one_of(st.integers(-1, 70), st.lists(st.integers(-1, 9), max_size=5), st.sampled_from(
    [None, True, False, 0.5, 1.0, 1.5, "group", "rms", "l1", "l2", "resnet", float("nan"), float("inf")]))
BASES = [
    {"dim": 8, "dim_mults": [1, 2], "image_size": 16, "num_frames": 4},
    {"dim": 6, "dim_mults": [1, 3], "image_size": 8, "num_frames": 2, "norm_type": "rms", "resnet_groups": 5},
    *C.PRESETS.values(),
]


@st.composite
def near_valid(draw) -> dict:
    """A valid config with up to three keys set to another (plausible or arbitrary) value or removed."""
    config = dict(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(KNOWN))
        if draw(st.booleans()):
            config[key] = draw(plausible | json_value)
        else:
            config.pop(key, None)
    return config


configs = st.one_of(
    near_valid(),
    st.dictionaries(st.sampled_from(KNOWN) | st.text(max_size=6), json_value, max_size=12),
    json_value,
)


def test_config_resolve_returns_a_full_config_or_config_error(request):
    outcomes = {"resolved": 0, "ConfigError": 0}

    @fuzz(request, "config_resolve")
    @given(config=configs)
    def check(config):
        try:
            out = C.resolve(config)
        except C.ConfigError as e:
            assert str(e)
            outcomes["ConfigError"] += 1
            return
        assert set(out) == set(KNOWN)
        assert json.loads(json.dumps(out, allow_nan=False)) == out  # plain finite JSON, storable in a checkpoint
        assert C.resolve(out) == out  # resolving is idempotent
        for key in ("dim", "image_size", "num_frames", "timesteps", "channels", "attn_heads", "resnet_groups"):
            assert type(out[key]) is int and out[key] >= 1
        assert all(type(m) is int and m >= 1 for m in out["dim_mults"]) and out["dim_mults"]
        assert out["image_size"] % 2 ** (len(out["dim_mults"]) - 1) == 0
        assert 0 < out["dynamic_thres_percentile"] <= 1 and math.isfinite(out["dynamic_thres_percentile"])
        outcomes["resolved"] += 1

    check()
    assert outcomes["resolved"] and outcomes["ConfigError"], outcomes


def test_config_files_of_any_bytes_load_or_raise_config_error(tmp_path, request):
    path = tmp_path / "config.json"

    @fuzz(request, "config_files")
    @given(data=st.one_of(st.binary(max_size=100), configs.map(lambda c: json.dumps(c).encode())))
    def check(data):
        path.write_bytes(data)
        try:
            C.load(path)
        except C.ConfigError as e:
            assert str(path) in str(e)  # the message names the file

    check()


small_configs = st.fixed_dictionaries({
    "dim": st.sampled_from([3, 4, 6, 8, 12]),
    "dim_mults": st.lists(st.integers(1, 3), min_size=1, max_size=3),
    "image_size": st.sampled_from([4, 6, 8]),
    "num_frames": st.integers(1, 3),
    "channels": st.sampled_from([1, 2, 3, 4]),
    "attn_heads": st.integers(1, 3),
    "attn_dim_head": st.integers(1, 9),
    "resnet_groups": st.integers(1, 6),
    "norm_type": st.sampled_from(["group", "rms"]),
    "init_kernel_size": st.sampled_from([1, 2, 3, 5]),
    "use_sparse_linear_attn": st.booleans(),
    "cond_dim": st.sampled_from([None, 1, 5]),
    "timesteps": st.integers(1, 4),
    "loss_type": st.sampled_from(["l1", "l2"]),
    "use_dynamic_thres": st.booleans(),
})


def test_every_config_resolve_accepts_trains_and_samples(request):
    """What ``resolve`` accepts really builds: the U-Net and diffusion model construct, a training loss is
    finite and a sample has the config's shape (the checks ``resolve`` makes are the model's real limits)."""
    import torch

    from vdeploy.diffusion import GaussianDiffusion
    from vdeploy.model import Unet3D

    built = []

    @fuzz(request, "config_builds")
    @given(config=small_configs)
    def check(config):
        try:
            r = C.resolve(config)
        except C.ConfigError:
            return
        torch.manual_seed(0)
        diffusion = GaussianDiffusion(Unet3D(**C.unet_kwargs(r)), **C.diffusion_kwargs(r))
        shape = (1, r["channels"], r["num_frames"], r["image_size"], r["image_size"])
        cond = torch.randn(1, r["cond_dim"]) if r["cond_dim"] else None
        loss = diffusion(torch.rand(shape), cond=cond)
        assert torch.isfinite(loss)
        video = diffusion.sample(cond=cond, batch_size=1, progress=False) if r["timesteps"] <= 2 else None
        assert video is None or tuple(video.shape) == shape
        built.append(r)

    check()
    assert built
