"""The model directory's manifest, ``vdeploy.json``: the one contract between export and runtime.

The export stage writes it (``write``), the runtime reads it (``load``). Layout, format version 1::

    {
      "format_version": 1,
      "vdeploy_version": "0.1.0",
      "config": {...},            # resolved flat model config (Unet3D + GaussianDiffusion kwargs)
      "source": {"checkpoint": "...", "format": "vdeploy" | "video-diffusion-pytorch",
                 "step": 1000, "ema": true},
      "opset": 17,
      "graphs": {                 # one entry per ONNX graph; "denoiser" (fp32) is always there
        "denoiser": {
          "file": "denoiser.onnx", "precision": "fp32", "cfg": false,
          "inputs":  [{"name": "x", "dtype": "float32", "shape": ["batch", 3, 8, 32, 32]}, ...],
          "outputs": [{"name": "eps", "dtype": "float32", "shape": ["batch", 3, 8, 32, 32]}],
          "dynamic_axes": {"x": {"0": "batch"}, ...}
        },
        "denoiser_cfg": {..., "cfg": true},      # optional: cond and null in one call (--cfg)
        "denoiser_fp16": {..., "precision": "fp16"}  # optional
      },
      "engines": [                # optional TensorRT plans built from one of the graphs
        {"file": "denoiser.<gpu>.plan", "graph": "denoiser", "gpu": "...", "tensorrt_version": "...",
         "precision": "fp16", "profile": {"x": {"min": [...], "opt": [...], "max": [...]}, ...}}
      ],
      "schedule": {"name": "cosine", "s": 0.008, "timesteps": 1000, "betas": [...]},
      "conditioning": {"cond_dim": null | int, "null_embedding": "null_cond_emb.npy" | null,
                       "text_encoder": "text_encoder" | null},
      "parity": {...},            # what export measured against PyTorch, per graph
      "files": {"denoiser.onnx": "<sha256>", ...}   # every file in the directory but this one
    }

The graph contract the runtime relies on (``vdeploy.runtime.pipeline``); it reads the graphs whose
key starts with ``denoiser``:

- inputs, in this order: ``x`` float32 ``(b, c, f, h, w)``; ``t`` int64 ``(b,)``; ``cond`` float32
  ``(b, cond_dim)`` only when ``cond_dim`` is set; the ``cfg`` graph adds ``cond_scale`` float32 (shape
  ``[]``, ``[1]`` or ``["batch"]``) and returns the guided eps in one call. The first output is eps.
  Static dims of ``x`` must equal ``(channels, num_frames, image_size, image_size)`` of ``config``.
- the unconditional prediction is the graph called with the learned null embedding as ``cond``
  (``null_embedding``: a float32 ``.npy`` of shape ``(cond_dim,)`` or ``(1, cond_dim)``), which is what
  upstream's ``null_cond_prob=1`` computes.
- ``schedule.betas``: the float64 betas as the seed computes them (before its float32 cast);
  ``len(betas) == timesteps``.
- ``text_encoder``: a subdirectory holding ``model.onnx`` (int64 ``input_ids`` and ``attention_mask``
  ``(b, n)`` -> float32 ``embedding`` ``(b, cond_dim)``, already pooled) and ``tokenizer.json`` (for the
  ``tokenizers`` library); ``conditioning.max_length`` (optional) caps the token count.

Every file the runtime loads (graphs, engines, null embedding, text encoder) must be listed in
``files``; ``load`` refuses a manifest that references an unlisted file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

FORMAT_VERSION = 1
MANIFEST_NAME = "vdeploy.json"
REQUIRED_KEYS = ("format_version", "config", "graphs", "schedule", "conditioning", "files")


class ManifestError(ValueError):
    """A model directory that cannot be trusted or used; the message names the problem."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _model_files(model_dir: Path) -> list[str]:
    """Every file under ``model_dir`` except the manifest, as sorted posix relative paths."""
    return sorted(
        p.relative_to(model_dir).as_posix()
        for p in model_dir.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME
    )


def write(model_dir: str | Path, manifest: dict) -> dict:
    """Hash every file in ``model_dir`` into ``manifest["files"]`` and write ``vdeploy.json`` atomically.

    Returns:
        The manifest as written (with ``format_version`` and ``files`` filled in).
    """
    model_dir = Path(model_dir)
    manifest = {**manifest, "format_version": FORMAT_VERSION}
    manifest["files"] = {name: sha256_file(model_dir / name) for name in _model_files(model_dir)}
    fd, tmp = tempfile.mkstemp(dir=model_dir, prefix=".vdeploy.", suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, model_dir / MANIFEST_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return manifest


def referenced_files(manifest: dict) -> list[str]:
    """The files the runtime may load: graphs, engines, the null embedding, the text encoder's files."""
    files = [g["file"] for g in manifest["graphs"].values()]
    files += [e["file"] for e in manifest.get("engines", [])]
    conditioning = manifest.get("conditioning") or {}
    if conditioning.get("null_embedding"):
        files.append(conditioning["null_embedding"])
    if conditioning.get("text_encoder"):
        encoder = conditioning["text_encoder"].rstrip("/")
        files += [f"{encoder}/model.onnx", f"{encoder}/tokenizer.json"]
    return files


def load(model_dir: str | Path, verify: bool = True) -> dict:
    """Read and validate ``vdeploy.json``.

    Args:
        model_dir: the model directory written by ``vdeploy export``.
        verify: check that every listed file exists and has its recorded sha256 (files not
            listed are never loaded, so they are ignored).

    Raises:
        ManifestError: no manifest, unreadable JSON, another format version, a missing key,
            a graph file not listed, or a file whose sha256 differs (tampered or truncated).
    """
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST_NAME
    if not model_dir.is_dir():
        raise ManifestError(f"model directory {model_dir} does not exist")
    if not path.is_file():
        raise ManifestError(f"{model_dir} has no {MANIFEST_NAME}: is it a directory written by `vdeploy export`?")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"cannot read {path}: {e}") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path} is not a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"{path} has format version {version!r}; this vdeploy reads version {FORMAT_VERSION}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ManifestError(f"{path} lacks key(s): {', '.join(missing)}")
    if "denoiser" not in manifest["graphs"]:
        raise ManifestError(f"{path} lists no 'denoiser' graph")
    listed = manifest["files"]
    referenced = referenced_files(manifest)
    unlisted = [f for f in referenced if f not in listed]
    if unlisted:
        raise ManifestError(f"{path} references file(s) without a sha256: {', '.join(unlisted)}")
    if verify:
        verify_files(model_dir, manifest)
    return manifest


def verify_files(model_dir: str | Path, manifest: dict) -> None:
    """Check that every file listed in ``manifest["files"]`` exists and has its recorded sha256.

    The files are hashed on a small thread pool (hashlib releases the GIL), so a directory of several
    graphs costs about as much as its largest file.

    Raises:
        ManifestError: a listed file is missing, or its sha256 differs (tampered or truncated).
    """
    from concurrent.futures import ThreadPoolExecutor

    model_dir = Path(model_dir)
    listed = manifest["files"]
    for name in listed:
        if not (model_dir / name).is_file():
            raise ManifestError(f"{model_dir / name} is listed in {MANIFEST_NAME} but missing")
    with ThreadPoolExecutor(max_workers=min(4, max(1, len(listed)))) as pool:
        digests = dict(zip(listed, pool.map(lambda name: sha256_file(model_dir / name), listed)))
    for name, expected in listed.items():
        if digests[name] != expected:
            raise ManifestError(
                f"{model_dir / name} does not match the sha256 in {MANIFEST_NAME}: modified or corrupt; "
                "re-export the model"
            )
