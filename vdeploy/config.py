"""Model configs: one flat JSON object of ``Unet3D`` plus ``GaussianDiffusion`` keyword arguments.

Torch-free, so the CLI can validate a config before it pays for ``import torch``.
"""

from __future__ import annotations

import json
from pathlib import Path

# Unet3D keyword arguments and their defaults, as in video-diffusion-pytorch 0.6.3, plus
# ``norm_type``: "group" (0.6.3, GroupNorm in Block) or "rms" (0.7.0, RMSNorm in Block).
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
}

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

PRESETS: dict[str, dict] = {
    # the demo: trains in minutes on 2 CPU cores. No sparse linear attention (a third of the
    # step time at 32 px) and 100 diffusion steps (full DDPM sampling in seconds).
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


class ConfigError(ValueError):
    """A model config that cannot be used; the message names the problem."""


def resolve(config: dict) -> dict:
    """Validate a flat config and fill in every default.

    Raises:
        ConfigError: unknown keys (all named), a missing required key, or a value of the wrong kind.
    """
    if not isinstance(config, dict):
        raise ConfigError(f"a model config must be a JSON object, got {type(config).__name__}")
    known = {**UNET_DEFAULTS, **DIFFUSION_DEFAULTS}
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
    out = {**known, **config}
    for key in ("dim", "image_size", "num_frames"):
        if out[key] is None:
            raise ConfigError(f"config is missing the required key '{key}'")
        if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] <= 0:
            raise ConfigError(f"config key '{key}' must be a positive integer, got {out[key]!r}")
    if not isinstance(out["dim_mults"], (list, tuple)) or not out["dim_mults"]:
        raise ConfigError(f"config key 'dim_mults' must be a non-empty list, got {out['dim_mults']!r}")
    out["dim_mults"] = [int(m) for m in out["dim_mults"]]
    if out["norm_type"] not in ("group", "rms"):
        raise ConfigError(f"config key 'norm_type' must be 'group' or 'rms', got {out['norm_type']!r}")
    if out["loss_type"] not in ("l1", "l2"):
        raise ConfigError(f"config key 'loss_type' must be 'l1' or 'l2', got {out['loss_type']!r}")
    if out["image_size"] % (2 ** (len(out["dim_mults"]) - 1)):
        raise ConfigError(
            f"image_size {out['image_size']} is not divisible by 2**{len(out['dim_mults']) - 1}, "
            f"which {len(out['dim_mults'])} dim_mults need"
        )
    if out["init_dim"] is not None and out["init_dim"] != out["dim"]:
        # upstream builds such a model, but its forward fails: the final block expects dim * 2 channels
        raise ConfigError(f"config key 'init_dim' must equal 'dim' ({out['dim']}) or be null, got {out['init_dim']!r}")
    return out


def load(spec: str | Path | dict) -> dict:
    """A preset name, a path to a JSON file, or a dict -> a resolved config."""
    if isinstance(spec, dict):
        return resolve(spec)
    spec = str(spec)
    if spec in PRESETS:
        return resolve(PRESETS[spec])
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"config '{spec}' is neither a preset ({', '.join(PRESETS)}) nor a JSON file")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    return resolve(data)


def unet_kwargs(config: dict) -> dict:
    """The ``Unet3D(**kwargs)`` part of a resolved config."""
    return {k: config[k] for k in UNET_DEFAULTS}


def diffusion_kwargs(config: dict) -> dict:
    """The ``GaussianDiffusion(unet, **kwargs)`` part of a resolved config."""
    return {"channels": config["channels"], **{k: config[k] for k in DIFFUSION_DEFAULTS}}
