"""Checkpoints: atomic writes, safe loads, and one reader for every format the export stage meets.

A vdeploy checkpoint is a ``torch.save`` of a dict of tensors and plain containers only, so it
loads with ``torch.load(weights_only=True)``::

    format, format_version, vdeploy_version   "vdeploy-checkpoint", 1, "0.1.0"
    step                                       optimizer steps completed
    model, ema                                 GaussianDiffusion state dicts (keys "denoise_fn.*" + schedule buffers)
    optimizer, scaler                          their state dicts ({} for a disabled scaler)
    rng                                        torch / cuda / numpy / python RNG states as tensors and numbers
    data                                       the trainer's data-order state (seed, samples consumed)
    config                                     the resolved flat model config (vdeploy.config)
    text_encoder                               the caption encoder directory, or None
    trainer                                    the trainer's hyper-parameters, for reference

``model``/``ema`` have the same layout as in ``video-diffusion-pytorch``'s own ``model-N.pt``
(keys step, model, ema, scaler), which :func:`load_checkpoint` and :func:`load_denoiser_state`
read as well, as they do a bare ``Unet3D``/``GaussianDiffusion`` state dict (``.pt`` or
``.safetensors``).
"""

from __future__ import annotations

import os
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

import vdeploy
from vdeploy import config as vconfig
from vdeploy.runtime import atomic

FORMAT = "vdeploy-checkpoint"
FORMAT_VERSION = 1
LAST_NAME = "model-last.pt"
_MILESTONE = re.compile(r"^model-(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or not a checkpoint; the message names the file."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint that could not be written (a full disk, no permission); an earlier file is unchanged."""


# ------------------------------------------------------------------ writing ----


def save_checkpoint(data: dict, path: str | os.PathLike) -> Path:
    """Write ``data`` with ``torch.save`` atomically: temporary file in the same folder, fsync, rename.

    A crash at any moment leaves either the old file or the new one, never a torn file.

    Raises:
        CheckpointError: the weights (``model``/``ema``) hold NaN or Inf, so nothing is written; or the
            write failed (:class:`CheckpointWriteError`, also an ``OSError``: a full disk, say), in which
            case an earlier file at ``path`` is unchanged.
    """
    path = Path(path)
    kept = f"the previous {path.name} is unchanged" if path.exists() else "nothing was written"
    bad = nonfinite_tensors(data)
    if bad:
        names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CheckpointError(f"refused to write checkpoint {path}: its weights hold NaN or Inf ({names}); {kept}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in atomic.stale_temps(path):  # left by a run that was killed while writing
            stale.unlink(missing_ok=True)
        with atomic.atomic_open(path, "wb") as f:
            torch.save(data, f)
    except (OSError, RuntimeError) as e:  # torch's zip writer may turn a failed write into a RuntimeError
        cause = next((c for c in (e, e.__context__, e.__cause__) if isinstance(c, OSError)), e)
        reason = getattr(cause, "strerror", None) or str(cause).strip().splitlines()[0]
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {reason}; {kept}") from None
    return path


def nonfinite_tensors(data: dict, keys: tuple[str, ...] = ("model", "ema")) -> list[str]:
    """Names (``"model/denoise_fn.init_conv.weight"``) of the floating tensors under ``keys`` holding NaN or Inf."""
    bad = []
    for key in keys:
        sd = data.get(key)
        if not isinstance(sd, dict):
            continue
        for name, t in sd.items():
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(f"{key}/{name}")
    return bad


def link_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Make ``dst`` the same file as ``src`` atomically (hard link, or a copy where links fail)."""
    src, dst = Path(src), Path(dst)
    for stale in atomic.stale_temps(dst):  # left by a run that was killed while linking
        stale.unlink(missing_ok=True)
    tmp = atomic.temp_name(dst)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            import shutil

            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    atomic.fsync_dir(dst.parent)
    return dst


def make_checkpoint(
    *,
    step: int,
    model: dict,
    ema: dict,
    optimizer: dict | None,
    scaler: dict | None,
    config: dict | None,
    rng: dict | None = None,
    data: dict | None = None,
    text_encoder: str | None = None,
    trainer: dict | None = None,
) -> dict:
    """The checkpoint dict in the documented layout (see the module docstring)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vdeploy_version": vdeploy.__version__,
        "step": int(step),
        "model": model,
        "ema": ema,
        "optimizer": optimizer,
        "scaler": scaler if scaler is not None else {},
        "rng": rng if rng is not None else rng_state(),
        "data": data,
        "config": config,
        "text_encoder": text_encoder,
        "trainer": trainer,
    }


# --------------------------------------------------------------------- RNG ----


def rng_state() -> dict:
    """torch (CPU and CUDA), numpy and python RNG states as tensors and numbers (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only where the device count matches)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    npst = state["numpy"]
    np.random.set_state(
        ("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))


# ------------------------------------------------------------------ reading ----


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely (``weights_only=True``; never runs code) and say what it is.

    Accepts vdeploy checkpoints, ``video-diffusion-pytorch``'s ``model-N.pt`` (step, model, ema,
    scaler) and bare ``Unet3D``/``GaussianDiffusion`` state dicts (``.pt`` or ``.safetensors``).

    Returns:
        the checkpoint dict, with ``"format"`` set to ``"vdeploy-checkpoint"``,
        ``"video-diffusion-pytorch"`` or ``"state_dict"`` and, for the last two, the keys
        ``step``, ``model``, ``ema``, ``config`` filled in (None where unknown).

    Raises:
        CheckpointError: the file is missing, unreadable, refused by the safe loader, or not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch raises many kinds for torn or hostile files)
        raise CheckpointError(_load_failure(path, e)) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a checkpoint: it holds a {type(data).__name__}, not a dict")
    if data.get("format") == FORMAT:
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise CheckpointError(
                f"{path} has checkpoint format version {data['format_version']}, newer than this vdeploy "
                f"({vdeploy.__version__}, format {FORMAT_VERSION}) reads: upgrade vdeploy"
            )
        _require_state_dict(data.get("model"), path, "model")
        return data
    if "model" in data and isinstance(data["model"], dict):  # the seed's Trainer.save
        _require_state_dict(data["model"], path, "model")
        if data.get("ema") is not None:
            _require_state_dict(data["ema"], path, "ema")
        return {**data, "format": "video-diffusion-pytorch", "step": _int_or_none(data.get("step")),
                "ema": data.get("ema"), "config": None}
    if data and all(isinstance(v, torch.Tensor) for v in data.values()):
        return {"format": "state_dict", "step": None, "model": data, "ema": None, "config": None}
    keys = ", ".join(sorted(map(str, data))[:8])
    raise CheckpointError(f"{path} is not a vdeploy or video-diffusion-pytorch checkpoint (top-level keys: {keys})")


# torch's weights_only refusal names the pickle global it met: "... unsupported GLOBAL posix.system whose ...",
# "Unsupported global: GLOBAL __main__.Evil was not an allowed global ..."
_REFUSED_GLOBAL = re.compile(r"GLOBAL\s+([\w.]+)")


def _load_failure(path: Path, e: Exception) -> str:
    """One line for a failed ``torch.load``. A refused pickle says what it refused and never repeats
    torch's advice to retry with ``weights_only=False``, the one thing not to do with such a file."""
    text = str(e)
    found = _REFUSED_GLOBAL.search(text)
    if found:
        return (f"cannot load checkpoint {path}: its pickle asks for the global {found.group(1)}, which is not a "
                "tensor or a plain container; the file was not loaded, because loading it could run code")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if "Weights only load failed" in text:  # drop torch's boilerplate (and its weights_only=False advice)
        boilerplate = ("weights_only", "Weights only", "Please file an issue", "documentation")
        detail = [line.replace("WeightsUnpickler error:", "").strip() for line in lines
                  if not any(w in line for w in boilerplate)]
        where = next((d for d in detail if d), "an unknown step")
        return (f"cannot load checkpoint {path}: the safe loader stopped at '{where}' "
                "(a corrupt file, or a pickle of more than tensors and plain containers); it was not loaded")
    return f"cannot load checkpoint {path}: {lines[0] if lines else type(e).__name__}"


def _load_safetensors(path: Path) -> dict:
    import json

    try:
        from safetensors import safe_open
        from safetensors.torch import load_file

        sd = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot load checkpoint {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    try:
        config = json.loads(meta["config"]) if "config" in meta else None
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: its 'config' metadata is not valid JSON") from None
    return {"format": "state_dict", "step": _int_or_none(meta.get("step")), "model": sd, "ema": None, "config": config}


def _require_state_dict(sd: Any, path: Path, key: str) -> None:
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: '{key}' is not a state dict of tensors")


def _int_or_none(v) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _strip_prefix(sd: dict, prefix: str) -> dict:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def unet_state_dict(sd: dict) -> dict:
    """A ``Unet3D`` state dict from a ``GaussianDiffusion`` one (``denoise_fn.*``, schedule buffers
    dropped) or from a ``Unet3D`` one (unchanged); DDP's ``module.`` and torch.compile's
    ``_orig_mod.`` prefixes are removed."""
    sd = _strip_prefix(_strip_prefix(dict(sd), "module."), "_orig_mod.")
    if any(k.startswith("denoise_fn.") for k in sd):
        sd = {k[len("denoise_fn."):]: v for k, v in sd.items() if k.startswith("denoise_fn.")}
        sd = _strip_prefix(_strip_prefix(sd, "module."), "_orig_mod.")
    return sd


def load_denoiser_state(path: str | os.PathLike, ema: bool = True) -> tuple[dict, dict | None, int | None]:
    """The ``Unet3D`` weights, model config and step from any checkpoint :func:`load_checkpoint` reads.

    Args:
        path: a vdeploy checkpoint, a ``video-diffusion-pytorch`` ``model-N.pt``, or a bare state dict.
        ema: take the EMA weights (the ones to deploy) where the checkpoint has them; otherwise
            the raw training weights.

    Returns:
        ``(state_dict, config, step)``: a ``Unet3D`` state dict for ``load_state_dict(strict=True)``;
        the resolved flat config (see :mod:`vdeploy.config`), or None for formats that carry none;
        the optimizer step, or None where unknown.
    """
    ckpt = load_checkpoint(path)
    sd = ckpt.get("ema") if ema else None
    if ema and sd is None:
        warnings.warn(f"{path} has no EMA weights; using the training weights", stacklevel=2)
    if sd is None:
        sd = ckpt["model"]
    config = ckpt.get("config")
    if config is not None:
        try:
            config = vconfig.resolve(dict(config))
        except vconfig.ConfigError as e:
            raise CheckpointError(f"{path}: its stored model config is invalid: {e}") from None
    return unet_state_dict(sd), config, _int_or_none(ckpt.get("step"))


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """``folder/model-last.pt`` if present, else the ``model-N.pt`` with the largest N, else None."""
    folder = Path(folder)
    last = folder / LAST_NAME
    if last.is_file():
        return last
    numbered = [(int(m.group(1)), p) for p in folder.glob("model-*.pt") if (m := _MILESTONE.match(p.name))]
    return max(numbered)[1] if numbered else None
