"""The model directory's manifest as types: the small frozen dataclasses of ``vdeploy.json`` (built by the
exporter and by test fixtures, written by ``Manifest.write``), its constants and file hashing. Reading an untrusted
``vdeploy.json`` is ``vdeploy.runtime.manifest`` (``load``) and ``manifest_check`` (every key checked); both
import this module, which imports neither."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from .atomic import write_text
from .steps import PREDICTION_TYPES  # noqa: F401 (what the samplers implement: steps.to_eps_x0 converts them)

FORMAT_VERSION = 2
READS_VERSIONS = (1, 2)
MANIFEST_NAME = "vdeploy.json"
SIGNATURE_NAME = "model.sig"  # runtime/signing.py: covers every other file, so `files` never lists it
ROLES = ("x", "t", "cond", "cond_scale", "frames", "mask", "text_tokens", "text_mask")
PRECISIONS = ("fp32", "fp16")
BETA_SCHEDULES = ("cosine",)  # what the training half builds; any schedule runs from its stored betas
REEXPORT = "re-export it with `vdeploy export --ckpt CKPT --out DIR`"


class ManifestError(ValueError):
    """A model directory that cannot be trusted or used; the message names the problem."""


# ------------------------------------------------------------------ types ----


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, numpy dtype name, shape (ints; axis names or None where dynamic),
    and for inputs the role the runtime feeds it by."""

    name: str
    dtype: str
    shape: tuple
    role: str | None = None

    def to_json(self) -> dict:
        out = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.role is not None:
            out["role"] = self.role
        return out


@dataclass(frozen=True)
class Graph:
    """One ONNX graph of the directory.

    Args:
        file: its path inside the model directory.
        inputs / outputs: tensor specs in graph order; inputs carry roles.
        precision: ``fp32`` or ``fp16`` (weights and activations; I/O stay float32).
        guidance: the fused classifier-free-guidance graph (``cond_scale`` input, guided eps out).
        optimization: what export did to the graph and why (onnxslim kept or not, its timings).
    """

    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str = "fp32"
    guidance: bool = False
    optimization: Mapping = field(default_factory=dict)

    def input(self, role: str) -> TensorSpec | None:
        """The input with ``role``, or None."""
        return next((spec for spec in self.inputs if spec.role == role), None)

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(spec.role for spec in self.inputs)

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``torch.onnx.export``'s form: ``{"x": {0: "batch", 3: "height"}, ...}``."""
        out = {}
        for spec in self.inputs + self.outputs:
            axes = {i: d for i, d in enumerate(spec.shape) if isinstance(d, str)}
            if axes:
                out[spec.name] = axes
        return out

    def to_json(self) -> dict:
        out = {
            "file": self.file,
            "precision": self.precision,
            "cfg": self.guidance,
            "inputs": [spec.to_json() for spec in self.inputs],
            "outputs": [spec.to_json() for spec in self.outputs],
            "dynamic_axes": {k: {str(i): d for i, d in v.items()} for k, v in self.dynamic_axes.items()},
        }
        if self.optimization:
            out["optimization"] = dict(self.optimization)
        return out


@dataclass(frozen=True)
class Engine:
    """A TensorRT plan built from one graph; usable only on the GPU and TensorRT version it names."""

    file: str
    graph: str
    gpu: str
    tensorrt_version: str
    precision: str
    profile: Mapping = field(default_factory=dict)  # {input: {"min": [...], "opt": [...], "max": [...]}}
    onnx_sha256: str | None = None
    build: Mapping = field(default_factory=dict)  # workspace_mb, build_seconds

    def to_json(self) -> dict:
        out = {"file": self.file, "graph": self.graph, "gpu": self.gpu, "tensorrt_version": self.tensorrt_version,
               "precision": self.precision, "profile": dict(self.profile)}
        if self.onnx_sha256:
            out["onnx_sha256"] = self.onnx_sha256
        return out | dict(self.build)


@dataclass(frozen=True)
class Schedule:
    """The training noise schedule: the float64 betas as the seed computes them (before its float32 cast)."""

    timesteps: int
    betas: tuple[float, ...] = ()
    beta_schedule: str = "cosine"
    prediction_type: str = "eps"
    s: float = 0.008

    def to_json(self) -> dict:
        return {"beta_schedule": self.beta_schedule, "prediction_type": self.prediction_type,
                "timesteps": self.timesteps, "s": self.s, "betas": list(self.betas)}

    def as_dict(self) -> dict:
        """The form ``vdeploy.runtime.schedule.betas_from_spec`` reads."""
        return {"name": self.beta_schedule, "timesteps": self.timesteps, "s": self.s,
                "betas": list(self.betas) or None}


@dataclass(frozen=True)
class Conditioning:
    """How the denoiser is conditioned: the embedding width, the learned null embedding, the text encoder.

    ``null_embedding`` is a float32 ``.npy`` of shape ``(cond_dim,)`` or ``(1, cond_dim)``: the graph called
    with it as ``cond`` is upstream's ``null_cond_prob=1``. ``text_encoder`` is a subdirectory with
    ``model.onnx`` (int64 ``input_ids``/``attention_mask`` -> float32 ``embedding (b, cond_dim)``) and
    ``tokenizer.json``; ``max_length`` caps the tokens. A model with token-level text conditioning (config
    ``text_cross_attention``: its denoiser graphs take ``text_tokens``/``text_mask``) has ``null_tokens``, a float32
    ``.npy`` of its learned null token sequence ``(L, cond_dim)`` (fed with an all-ones mask for the unconditional
    branch), and its text encoder also outputs ``tokens`` ``(b, n, cond_dim)``.
    """

    cond_dim: int | None = None
    null_embedding: str | None = None
    text_encoder: str | None = None
    max_length: int | None = None
    pooling: str | None = None
    text_encoder_graph: Graph | None = None
    null_tokens: str | None = None

    def to_json(self) -> dict:
        out = {"cond_dim": self.cond_dim, "null_embedding": self.null_embedding, "text_encoder": self.text_encoder}
        if self.null_tokens is not None:
            out["null_tokens"] = self.null_tokens
        if self.text_encoder is not None:
            out.update(max_length=self.max_length, pooling=self.pooling)
            if self.text_encoder_graph is not None:
                out["text_encoder_graph"] = self.text_encoder_graph.to_json()
        return out

    @property
    def text_encoder_files(self) -> tuple[str, ...]:
        if not self.text_encoder:
            return ()
        folder = self.text_encoder.rstrip("/")
        return (f"{folder}/model.onnx", f"{folder}/tokenizer.json")


@dataclass(frozen=True)
class Manifest:
    """Everything ``vdeploy.json`` holds; see the module docstring."""

    config: Mapping
    graphs: Mapping[str, Graph]
    schedule: Schedule
    conditioning: Conditioning = Conditioning()
    engines: tuple[Engine, ...] = ()
    source: Mapping = field(default_factory=dict)
    opset: int | None = None
    parity: Mapping = field(default_factory=dict)
    export: Mapping = field(default_factory=dict)
    files: Mapping[str, str] = field(default_factory=dict)
    vdeploy_version: str | None = None
    format_version: int = FORMAT_VERSION

    @property
    def cond_dim(self) -> int | None:
        return self.conditioning.cond_dim

    @property
    def video_shape(self) -> tuple[int, int, int, int]:
        """``(channels, num_frames, image_size, image_size)`` of one video."""
        size = self.config["image_size"]
        return self.config.get("channels", 3), self.config["num_frames"], size, size

    def find_graph(self, *, guidance: bool = False, precision: str = "fp32") -> str | None:
        """The name of the graph with that guidance and precision, or None."""
        return next((name for name, g in self.graphs.items()
                     if g.guidance == guidance and g.precision == precision), None)

    def referenced_files(self) -> list[str]:
        """The files the runtime may open: graphs, engines, the null embedding, the text encoder's files."""
        files = [g.file for g in self.graphs.values()] + [e.file for e in self.engines]
        if self.conditioning.null_embedding:
            files.append(self.conditioning.null_embedding)
        if self.conditioning.null_tokens:
            files.append(self.conditioning.null_tokens)
        return files + list(self.conditioning.text_encoder_files)

    def to_json(self) -> dict:
        return {
            "format_version": self.format_version,
            "vdeploy_version": self.vdeploy_version,
            "config": dict(self.config),
            "source": dict(self.source),
            "opset": self.opset,
            "precision": sorted({g.precision for g in self.graphs.values()}),
            "graphs": {name: g.to_json() for name, g in self.graphs.items()},
            "engines": [e.to_json() for e in self.engines],
            "schedule": self.schedule.to_json(),
            "conditioning": self.conditioning.to_json(),
            "parity": dict(self.parity),
            "export": dict(self.export),
            "files": dict(self.files),
        }

    def write(self, model_dir: str | Path) -> Manifest:
        """Hash every file in ``model_dir`` into ``files`` and write ``vdeploy.json`` atomically.

        Returns:
            The manifest as written (this format version, ``files`` filled in).

        Raises:
            ManifestError: the manifest references a file that is not in the directory.
        """
        model_dir = Path(model_dir)
        files = {name: sha256_file(model_dir / name) for name in _model_files(model_dir)}
        written = replace(self, files=files, format_version=FORMAT_VERSION)
        missing = [f for f in written.referenced_files() if f not in files]
        if missing:
            raise ManifestError(f"{model_dir}: the manifest references missing file(s): {', '.join(missing)}")
        write_text(model_dir / MANIFEST_NAME, json.dumps(written.to_json(), indent=2) + "\n")
        return written


# ------------------------------------------------------------- file I/O ----


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _model_files(model_dir: Path) -> list[str]:
    """Every file under ``model_dir`` except the manifest, its signature and temporaries, as sorted posix
    relative paths."""
    return sorted(
        p.relative_to(model_dir).as_posix()
        for p in model_dir.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME and not (p.name.startswith(f".{MANIFEST_NAME}.") and ".tmp" in p.name)
        and p.relative_to(model_dir).as_posix() != SIGNATURE_NAME
    )
