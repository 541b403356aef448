"""Model configs: one flat JSON object of ``Unet3D`` plus ``GaussianDiffusion`` keyword arguments.

Torch-free, so the CLI can validate a config before it pays for ``import torch``.
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path

# Unet3D keyword arguments and their defaults, as in video-diffusion-pytorch 0.6.3, plus
# ``norm_type``: "group" (0.6.3, GroupNorm in Block) or "rms" (0.7.0, RMSNorm in Block), and
# ``frame_conditioning``: MCVD-style masked frame conditioning (known frames and a per-frame mask as extra
# input channels of the stem conv; off: upstream's model), ``text_cross_attention`` with ``text_max_tokens``:
# Imagen-style token-level text conditioning (cross-attention to the caption's token embeddings beside the pooled
# vector; off: upstream's model), ``text_standardize``: the pooled caption embedding mapped through an affine map
# fitted on the training captions before it reaches the U-Net ("std": centred, each dimension divided by its
# spread; "whiten": centred and PCA-whitened with shrinkage; "none": upstream's raw vector; the map is stored in
# the U-Net's state dict, see vdeploy.text.fit_standardizer), ``frame_position``: each frame's absolute index
# (sinusoidal, through a learned map that starts at zero) added to the stem's features (off: upstream's model, whose
# temporal attentions know only relative frame positions), ``frame_film``: every ResNet block's FiLM per frame, through
# a small MLP of the time and caption vector and the frame's index that starts at zero (off: upstream's model, whose
# FiLM is the same for every frame).
UNET_DEFAULTS: dict = {
    "dim": None,  # required
    "cond_dim": None,
    "out_dim": None,
    "dim_mults": [1, 2, 4, 8],
    "channels": 3,
    "attn_heads": 8,
    "attn_dim_head": 32,
    "use_bert_text_cond": False,
    "init_dim": None,
    "init_kernel_size": 7,
    "use_sparse_linear_attn": True,
    "block_type": "resnet",
    "resnet_groups": 8,
    "norm_type": "group",
    "frame_conditioning": False,
    "text_cross_attention": False,
    "text_max_tokens": 16,
    "text_standardize": "none",
    "frame_position": False,
    "frame_film": False,
}

# vdeploy's own Unet3D keys that ``unet_kwargs`` passes only where they differ from the default (the seed's
# Unet3D takes the kwargs of any config it can build)
_OWN_UNET_KEYS = ("text_cross_attention", "text_max_tokens", "text_standardize", "frame_position", "frame_film")

# GaussianDiffusion keyword arguments and their defaults (``channels`` is shared with Unet3D).
DIFFUSION_DEFAULTS: dict = {
    "image_size": None,  # required
    "num_frames": None,  # required
    "text_use_bert_cls": False,
    "timesteps": 1000,
    "loss_type": "l1",
    "use_dynamic_thres": False,
    "dynamic_thres_percentile": 0.9,
}

# The noise schedule and what the U-Net predicts: vdeploy's own keys, recorded in the model directory's
# manifest. The seed has its cosine schedule and eps prediction; ``prediction_type`` "v" (Salimans & Ho 2022)
# is vdeploy's opt-in: the U-Net predicts v = sqrt(abar) eps - sqrt(1 - abar) x0.
SCHEDULE_DEFAULTS: dict = {
    "beta_schedule": "cosine",
    "prediction_type": "eps",
}

# How the training loss weighs the timesteps: vdeploy's own keys. "none" is the seed's plain mean; "min_snr"
# is Min-SNR-gamma (Hang et al. 2023) with ``min_snr_gamma``.
TRAINING_DEFAULTS: dict = {
    "loss_weighting": "none",
    "min_snr_gamma": 5.0,
}

PRESETS: dict[str, dict] = {
    # tests (and, at 16 px, the demo below): trains in minutes on 2 CPU cores. No sparse linear attention
    # (a third of the step time at 32 px) and 100 diffusion steps (full DDPM sampling in seconds).
    "tiny": {
        "dim": 16,
        "dim_mults": [1, 2, 4],
        "attn_heads": 2,
        "attn_dim_head": 16,
        "use_sparse_linear_attn": False,
        "image_size": 32,
        "num_frames": 8,
        "timesteps": 100,
    },
    "small": {"dim": 32, "dim_mults": [1, 2, 4, 8], "image_size": 32, "num_frames": 8, "timesteps": 1000},
    "base": {"dim": 64, "dim_mults": [1, 2, 4, 8], "image_size": 64, "num_frames": 16, "timesteps": 1000},
}
# make demo's model: tiny at 16 px (2.5x faster steps: 3000 of them fit the demo's time, and sampled
# videos were clearer than from 1000 steps at 32 px), v-prediction with a squared error, unweighted, caption
# vectors standardized (the ablation's choice with make demo's --high-noise-share 0.5: Min-SNR's v weight, about
# the SNR itself at the noisiest steps, would silence what that flag trains; README "Frame-conditioned sampling")
PRESETS["demo"] = {**PRESETS["tiny"], "image_size": 16, "prediction_type": "v", "loss_weighting": "none",
                   "loss_type": "l2", "text_standardize": "std"}


class ConfigError(ValueError):
    """A model config that cannot be used; the message names the key, the value and what is allowed."""


# Upper bounds: far above any model this package can train or export, low enough that a typo
# (``"dim": 640000``) is refused here instead of failing with MemoryError inside torch.
_LIMITS = {
    "dim": 4096, "cond_dim": 65536, "out_dim": 4, "channels": 4, "attn_heads": 256, "attn_dim_head": 1024,
    "init_dim": 4096, "init_kernel_size": 31, "resnet_groups": 4096, "image_size": 4096, "num_frames": 1024,
    "timesteps": 100_000, "text_max_tokens": 512,
}
_MAX_DIM_MULT, _MAX_LEVELS = 64, 8
_BOOLS = ("use_bert_text_cond", "use_sparse_linear_attn", "text_use_bert_cls", "use_dynamic_thres",
          "frame_conditioning", "text_cross_attention", "frame_position", "frame_film")
_CHOICES = {"norm_type": ("group", "rms"), "loss_type": ("l1", "l2"), "block_type": ("resnet",),
            "beta_schedule": ("cosine",), "prediction_type": ("eps", "v"), "loss_weighting": ("none", "min_snr"),
            "text_standardize": ("none", "std", "whiten")}


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _int_key(out: dict, key: str, *, optional: bool = False) -> None:
    """``out[key]`` must be an integer in 1.._LIMITS[key] (or None when ``optional``); stored as a plain int."""
    v = out[key]
    if v is None and optional:
        return
    if not _is_int(v) or not 1 <= v <= _LIMITS[key]:
        allowed = f"an integer from 1 to {_LIMITS[key]}" + (" or null" if optional else "")
        raise ConfigError(f"config key '{key}' must be {allowed}, got {v!r}")
    out[key] = int(v)


def resolve(config: dict) -> dict:
    """Validate a flat config (every key's type and range) and fill in every default.

    Raises:
        ConfigError: unknown keys (all named), a missing required key, or a value of the wrong type or
            out of range; the message names the key, the value and what is allowed.
    """
    if not isinstance(config, dict):
        raise ConfigError(f"a model config must be a JSON object, got {type(config).__name__}")
    known = {**UNET_DEFAULTS, **DIFFUSION_DEFAULTS, **SCHEDULE_DEFAULTS, **TRAINING_DEFAULTS}
    unknown = sorted(set(map(str, config)) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
    out = {**known, **config}
    for key in ("dim", "image_size", "num_frames"):
        if out[key] is None:
            raise ConfigError(f"config is missing the required key '{key}'")
        if not _is_int(out[key]) or out[key] <= 0:
            raise ConfigError(f"config key '{key}' must be a positive integer, got {out[key]!r}")
    for key in ("dim", "image_size", "num_frames", "attn_heads", "attn_dim_head", "timesteps", "init_kernel_size",
                "resnet_groups", "text_max_tokens"):
        _int_key(out, key)
    for key in ("cond_dim", "out_dim", "init_dim"):
        _int_key(out, key, optional=True)
    if out["channels"] not in (1, 3, 4) or not _is_int(out["channels"]):
        raise ConfigError(f"config key 'channels' must be 1, 3 or 4 (grey, RGB, RGBA video), got {out['channels']!r}")
    out["channels"] = int(out["channels"])
    if out["dim"] < 4 or out["dim"] % 2:
        # the sinusoidal time embedding takes dim // 2 frequencies and needs at least two
        raise ConfigError(f"config key 'dim' must be an even integer >= 4, got {out['dim']!r}")
    if out["init_kernel_size"] % 2 == 0:
        raise ConfigError(f"config key 'init_kernel_size' must be odd (the stem conv keeps the frame size), "
                          f"got {out['init_kernel_size']!r}")
    mults = out["dim_mults"]
    if (not isinstance(mults, (list, tuple)) or not 1 <= len(mults) <= _MAX_LEVELS
            or not all(_is_int(m) and 1 <= m <= _MAX_DIM_MULT for m in mults)):
        raise ConfigError(f"config key 'dim_mults' must be a list of 1 to {_MAX_LEVELS} integers from 1 to "
                          f"{_MAX_DIM_MULT}, got {mults!r}")
    out["dim_mults"] = [int(m) for m in mults]
    for key in _BOOLS:
        if not isinstance(out[key], bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {out[key]!r}")
    for key, choices in _CHOICES.items():
        if not isinstance(out[key], str) or out[key] not in choices:
            allowed = " or ".join(repr(c) for c in choices)
            raise ConfigError(f"config key '{key}' must be {allowed}, got {out[key]!r}")
    p = out["dynamic_thres_percentile"]
    if not isinstance(p, numbers.Real) or isinstance(p, bool) or not math.isfinite(p) or not 0 < p <= 1:
        raise ConfigError(f"config key 'dynamic_thres_percentile' must be a number in (0, 1], got {p!r}")
    out["dynamic_thres_percentile"] = float(p)
    g = out["min_snr_gamma"]
    if not isinstance(g, numbers.Real) or isinstance(g, bool) or not math.isfinite(g) or not 0 < g <= 1e6:
        raise ConfigError(f"config key 'min_snr_gamma' must be a positive number (at most 1e6), got {g!r}")
    out["min_snr_gamma"] = float(g)
    if out["out_dim"] is not None and out["out_dim"] != out["channels"]:
        # the diffusion loss compares the U-Net's output with noise of `channels` channels
        raise ConfigError(f"config key 'out_dim' must equal 'channels' ({out['channels']}) or be null, "
                          f"got {out['out_dim']!r}")
    if out["image_size"] % (2 ** (len(out["dim_mults"]) - 1)):
        raise ConfigError(
            f"image_size {out['image_size']} is not divisible by 2**{len(out['dim_mults']) - 1}, "
            f"which {len(out['dim_mults'])} dim_mults need"
        )
    if out["init_dim"] is not None and out["init_dim"] != out["dim"]:
        # upstream builds such a model, but its forward fails: the final block expects dim * 2 channels
        raise ConfigError(f"config key 'init_dim' must equal 'dim' ({out['dim']}) or be null, got {out['init_dim']!r}")
    if out["norm_type"] == "group":
        widths = sorted({out["dim"] * m for m in [1, *out["dim_mults"]]})
        groups = out["resnet_groups"]
        if any(w % groups for w in widths):
            raise ConfigError(f"config key 'resnet_groups' ({groups}) must divide every block width "
                              f"dim * dim_mults = {widths} (GroupNorm splits the channels into equal groups)")
    return out


def load(spec: str | Path | dict) -> dict:
    """A preset name, a path to a JSON file, or a dict -> a resolved config."""
    if isinstance(spec, dict):
        return resolve(spec)
    spec = str(spec)
    if spec in PRESETS:
        return resolve(PRESETS[spec])
    path = Path(spec)
    try:
        is_file = path.is_file()
    except (OSError, ValueError):  # a name the OS refuses (too long, a NUL byte)
        is_file = False
    if not is_file:
        raise ConfigError(f"config '{spec}' is neither a preset ({', '.join(PRESETS)}) nor a JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    except RecursionError:
        raise ConfigError(f"cannot read config {path}: nested too deeply") from None
    try:
        return resolve(data)
    except ConfigError as e:
        raise ConfigError(f"config {path}: {e}") from None


def unet_kwargs(config: dict) -> dict:
    """The ``Unet3D(**kwargs)`` part of a resolved config.

    vdeploy's own keys (``text_cross_attention``, ``text_max_tokens``, ``text_standardize``) are passed only where
    they differ from the default, as :func:`diffusion_kwargs` does with its own.
    """
    return {k: config[k] for k in UNET_DEFAULTS
            if k not in _OWN_UNET_KEYS or (k in config and config[k] != UNET_DEFAULTS[k])}


def diffusion_kwargs(config: dict) -> dict:
    """The ``GaussianDiffusion(unet, **kwargs)`` part of a resolved config.

    vdeploy's own keys (``prediction_type``, ``loss_weighting``, ``min_snr_gamma``) are passed only where they
    differ from the seed's behaviour, so the seed's ``GaussianDiffusion`` takes the kwargs of any config it can
    build.
    """
    kwargs = {"channels": config["channels"], **{k: config[k] for k in DIFFUSION_DEFAULTS}}
    own = {"prediction_type": SCHEDULE_DEFAULTS["prediction_type"], **TRAINING_DEFAULTS}
    kwargs.update({k: config[k] for k, default in own.items() if k in config and config[k] != default})
    return kwargs
