"""The model directory's manifest, ``vdeploy.json``: the one typed contract between export and runtime.

Small frozen dataclasses, built by the exporter (and by test fixtures) and read by the runtime::

    Manifest
      config            the resolved flat model config (Unet3D + GaussianDiffusion kwargs)
      graphs            {name: Graph}      "denoiser" (fp32, plain) is always there
        Graph           file, precision, guidance, inputs/outputs (TensorSpec, each with a role)
      engines           (Engine, ...)      TensorRT plans built from a graph, for one GPU + TRT version
      schedule          Schedule           beta_schedule, prediction_type, timesteps, the float64 betas
      conditioning      Conditioning       cond_dim, null embedding file, text encoder directory
      source, opset, parity, export        provenance: checkpoint, versions, what export measured
      files             {relative path: sha256} of every file in the directory but the manifest

Graph inputs are looked up by **role**, never by position: ``x`` (float32 ``(b, c, f, h, w)``), ``t``
(int64 ``(b,)``), ``cond`` (float32 ``(b, cond_dim)``, conditioned models), ``cond_scale`` (the fused
guidance graph: the scale, shape ``[1]``, ``[]`` or ``["batch"]``), and the frame-conditioning inputs
``frames``/``mask``. The first output is ``eps``.

Model directories come from strangers: :func:`load` accepts only relative, normalized paths that stay
inside the directory (symlinks resolved), every file the runtime may open must be listed in ``files``
with its sha256, and every malformed value is a :class:`ManifestError` naming the key and the file.

The types live in ``manifest_types`` (re-exported here); this module reads: ``load``, ``from_json`` (through
``manifest_check``), ``verify_files``.

Format versions: 2 (this one) records roles, ``beta_schedule`` and ``prediction_type``; version 1 (the
first release) loads too, its roles taken from its input names (which were the role names).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from .digests import file_sha256
from .manifest_check import from_json as _checked
from .manifest_types import (  # noqa: F401 (the types, re-exported: `from vdeploy.runtime.manifest import Graph`)
    BETA_SCHEDULES, FORMAT_VERSION, MANIFEST_NAME, PRECISIONS, PREDICTION_TYPES, READS_VERSIONS, REEXPORT, ROLES,
    SIGNATURE_NAME, Conditioning, Engine, Graph, Manifest, ManifestError, Schedule, TensorSpec, sha256_file,
)


def load(model_dir: str | Path, verify: bool = True) -> Manifest:
    """Read and validate ``vdeploy.json``.

    Args:
        model_dir: the model directory written by ``vdeploy export``.
        verify: check that every listed file exists and has its recorded sha256 (files not listed are
            never opened, so they are ignored).

    Raises:
        ManifestError: no manifest, unreadable JSON, an unknown format version, a missing or mistyped
            key, a path outside the directory, a file the runtime would open that is not listed, or a
            file whose sha256 differs (tampered or truncated). The message names the key and the file.
    """
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST_NAME
    if not model_dir.is_dir():
        raise ManifestError(f"model directory {model_dir} does not exist")
    if not path.is_file():
        raise ManifestError(f"{model_dir} has no {MANIFEST_NAME}: is it a directory written by `vdeploy export`?")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, UTF-8, an int of 4300+ digits
        raise ManifestError(f"cannot read {path}: {e}") from None
    manifest = from_json(data, where=str(path))
    for name in manifest.files:
        target = _inside(model_dir, name, f"{path}: files[{name!r}]")
        if target.exists() and not target.is_file():  # a FIFO or device would block or never end a read
            raise ManifestError(f"{path}: files[{name!r}] is not a regular file (a directory, FIFO or device)")
    if verify:
        verify_files(model_dir, manifest.files)
    return manifest


def verify_files(model_dir: str | Path, files: Mapping[str, str]) -> None:
    """Check that every file in ``files`` (relative path -> sha256) exists and has its recorded sha256.

    The files are hashed on a small thread pool (hashlib releases the GIL), so a directory of several
    graphs costs about as much as its largest file; a file unchanged since it was last hashed here is not
    read again (``digests.file_sha256``).

    Raises:
        ManifestError: a listed file is missing, or its sha256 differs (tampered or truncated).
    """
    from concurrent.futures import ThreadPoolExecutor

    model_dir = Path(model_dir)
    for name in files:
        if not (model_dir / name).is_file():
            raise ManifestError(f"{model_dir / name} is listed in {MANIFEST_NAME} but missing")

    def digest(name):
        try:
            return file_sha256(model_dir / name)
        except OSError as e:
            raise ManifestError(f"cannot read {model_dir / name}: {e.strerror or e}") from None

    with ThreadPoolExecutor(max_workers=min(4, max(1, len(files)))) as pool:
        digests = dict(zip(files, pool.map(digest, files)))
    for name, expected in files.items():
        if digests[name] != expected:
            raise ManifestError(
                f"{model_dir / name} does not match the sha256 in {MANIFEST_NAME}: modified or corrupt; {REEXPORT}"
            )


def _inside(model_dir: Path, name: str, where: str) -> Path:
    """``model_dir / name`` after resolving symlinks, refused unless it stays inside ``model_dir``."""
    root = model_dir.resolve()
    target = (model_dir / name).resolve()
    if target != root and root not in target.parents:
        raise ManifestError(f"{where}: {name!r} resolves to {target}, outside the model directory")
    return target


def from_json(data, where: str = MANIFEST_NAME) -> Manifest:
    """A :class:`Manifest` from parsed JSON, every key type-checked; errors name the key and ``where``
    (``vdeploy.runtime.manifest_check``)."""
    return _checked(data, where)
