"""What the runtime reads from a model directory besides the manifest, each file treated as untrusted: the
schedule's betas, the learned null embedding (and null token sequence), the ONNX graphs' external data (checked
before any is opened)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .manifest import Manifest, ManifestError
from .schedule import betas_from_spec


def check_external_data_files(model_dir: Path, manifest: Manifest) -> None:
    """Every ONNX graph of the directory (denoisers, text encoder) keeps its external data inside it, in
    files the manifest hashes: checked before onnxruntime opens any (``onnx_external``)."""
    from .onnx_external import check_external_data

    graphs = [g.file for g in manifest.graphs.values()] + list(manifest.conditioning.text_encoder_files[:1])
    for name in dict.fromkeys(graphs):
        check_external_data(model_dir, name, manifest.files)


def schedule_betas(manifest: Manifest, where) -> np.ndarray:
    """The training betas the manifest's schedule gives; a bad schedule is a ManifestError naming ``where``."""
    try:
        return betas_from_spec(manifest.schedule.as_dict())
    except (ValueError, TypeError) as e:
        raise ManifestError(f"{where}: bad schedule: {e}") from None


def null_embedding(model_dir: Path, manifest: Manifest) -> np.ndarray | None:
    """The learned null embedding ``(1, cond_dim)``; every malformed file is a ManifestError naming it."""
    name = manifest.conditioning.null_embedding
    if not name:
        return None
    null = _load_array(model_dir, name, "null embedding")
    cond_dim = manifest.cond_dim
    if null.size != cond_dim or null.ndim > 2 or not np.issubdtype(null.dtype, np.floating):
        raise ManifestError(f"null embedding {model_dir / name} has shape {null.shape} ({null.dtype}), "
                            f"expected float ({cond_dim},) or (1, {cond_dim})")
    if not np.all(np.isfinite(null)):
        raise ManifestError(f"null embedding {model_dir / name} holds NaN or Inf values")
    return null.astype(np.float32).reshape(1, -1)


def null_tokens(model_dir: Path, manifest: Manifest, max_tokens: int) -> np.ndarray | None:
    """A token model's learned null token sequence ``(max_tokens, cond_dim)``; malformed: a ManifestError."""
    name = manifest.conditioning.null_tokens
    if not name:
        return None
    null = _load_array(model_dir, name, "null token sequence")
    shape = (max_tokens, manifest.cond_dim)
    if null.shape not in (shape, (1, *shape)) or not np.issubdtype(null.dtype, np.floating):
        raise ManifestError(f"null token sequence {model_dir / name} has shape {null.shape} ({null.dtype}), "
                            f"expected float {shape}")
    if not np.all(np.isfinite(null)):
        raise ManifestError(f"null token sequence {model_dir / name} holds NaN or Inf values")
    return null.astype(np.float32).reshape(shape)


def _load_array(model_dir: Path, name: str, what: str):
    """One ``.npy`` array of the directory, memory-mapped; anything else is a ManifestError naming it."""
    try:
        # mapped, not read: a header claiming terabytes is refused by its size below, not allocated
        null = np.load(model_dir / name, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        if "pickle" in str(e) or "Python objects" in str(e):  # never follow numpy's allow_pickle advice
            raise ManifestError(f"the {what} {model_dir / name} is not a .npy array (pickled data or "
                                "another format); it was not loaded: loading a pickle could run code") from None
        raise ManifestError(f"cannot read the {what} {model_dir / name}: {e}") from None
    if not isinstance(null, np.ndarray):  # an .npz archive
        null.close()
        raise ManifestError(f"the {what} {model_dir / name} is an .npz archive, expected one .npy array")
    return null
