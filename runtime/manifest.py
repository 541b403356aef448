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

Format versions: 2 (this one) records roles, ``beta_schedule`` and ``prediction_type``; version 1 (the
first release) loads too, its roles taken from its input names (which were the role names).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from .atomic import write_text

FORMAT_VERSION = 2
READS_VERSIONS = (1, 2)
MANIFEST_NAME = "vdeploy.json"
SIGNATURE_NAME = "model.sig"  # runtime/signing.py: covers every other file, so `files` never lists it
ROLES = ("x", "t", "cond", "cond_scale", "frames", "mask")
PRECISIONS = ("fp32", "fp16")
BETA_SCHEDULES = ("cosine",)  # what the training half builds; any schedule runs from its stored betas
PREDICTION_TYPES = ("eps",)  # what the samplers implement
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

    @property
    def static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)


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
    ``tokenizer.json``; ``max_length`` caps the tokens.
    """

    cond_dim: int | None = None
    null_embedding: str | None = None
    text_encoder: str | None = None
    max_length: int | None = None
    pooling: str | None = None
    text_encoder_graph: Graph | None = None

    def to_json(self) -> dict:
        out = {"cond_dim": self.cond_dim, "null_embedding": self.null_embedding, "text_encoder": self.text_encoder}
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
    graphs costs about as much as its largest file.

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
            return sha256_file(model_dir / name)
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


# ----------------------------------------------------------- validation ----


def from_json(data, where: str = MANIFEST_NAME) -> Manifest:
    """A :class:`Manifest` from parsed JSON, every key type-checked; errors name the key and ``where``."""
    r = _Reader(where)
    r.expect(data, dict, "the top level")
    version = data.get("format_version")
    if version not in READS_VERSIONS:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
        raise ManifestError(
            f"{where} has format version {_short(version)}; this vdeploy reads versions "
            f"{', '.join(map(str, READS_VERSIONS))}"
            + ("; upgrade vdeploy" if newer else f"; {REEXPORT}")
        )
    for key in ("config", "graphs", "schedule", "conditioning", "files"):
        if key not in data:
            raise ManifestError(f"{where} lacks the key {key!r}; {REEXPORT}")
    config = r.expect(data["config"], dict, "config")
    for key in ("num_frames", "image_size", "timesteps"):
        r.positive_int(config.get(key), f"config.{key}")
    r.positive_int(config.get("channels", 3), "config.channels")

    files = r.expect(data["files"], dict, "files")
    for name, digest in files.items():
        r.path(name, f"files[{name!r}]")
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise ManifestError(f"{where}: files[{name!r}] must be a hex sha256, got {_short(digest)}")

    conditioning = _conditioning(r, r.expect(data["conditioning"], dict, "conditioning"), version)
    graphs_json = r.expect(data["graphs"], dict, "graphs")
    graphs = {name: _graph(r, g, f"graphs.{name}", version) for name, g in graphs_json.items()}
    if "denoiser" not in graphs:
        raise ManifestError(f"{where} lists no 'denoiser' graph")
    engines = tuple(_engine(r, e, f"engines[{i}]", graphs) for i, e in enumerate(r.expect(
        _given(data, "engines", []), list, "engines")))
    schedule = _schedule(r, r.expect(data["schedule"], dict, "schedule"), config)

    manifest = Manifest(
        config=config, graphs=graphs, schedule=schedule, conditioning=conditioning, engines=engines,
        source=r.expect(_given(data, "source", {}), dict, "source"),
        opset=data.get("opset"),
        parity=r.expect(_given(data, "parity", {}), dict, "parity"),
        export=r.expect(_given(data, "export", {}), dict, "export"),
        files=files, vdeploy_version=data.get("vdeploy_version"), format_version=version,
    )
    unlisted = [f for f in manifest.referenced_files() if f not in files]
    if unlisted:
        raise ManifestError(f"{where} references file(s) without a sha256: {', '.join(unlisted)}")
    for name, graph in graphs.items():
        _check_denoiser_graph(r, name, graph, manifest)
    return manifest


def _given(data: dict, key: str, default):
    """``data[key]``, or ``default`` where it is absent or null (a wrong type is still refused)."""
    value = data.get(key)
    return default if value is None else value


class _Reader:
    """Type checks that name the key and the file."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, key: str, message: str):
        raise ManifestError(f"{self.where}: {key} {message}")

    def expect(self, value, kind, key: str):
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            self.fail(key, f"must be a JSON {_JSON_NAMES.get(names, names)}, got {type(value).__name__} {_short(value)}")
        return value

    def positive_int(self, value, key: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            self.fail(key, f"must be a positive integer, got {_short(value)}")
        return value

    def optional(self, value, kind, key: str):
        return None if value is None else self.expect(value, kind, key)

    def choice(self, value, choices, key: str, what: str = "allowed"):
        if value not in choices:
            self.fail(key, f"is {_short(value)}; {what}: {', '.join(map(str, choices))}")
        return value

    def path(self, value, key: str) -> str:
        """A relative, normalized posix path without ``..``: nothing a manifest names may leave its directory."""
        self.expect(value, str, key)
        p = PurePosixPath(value)
        if (not value or "\\" in value or "\x00" in value or p.is_absolute() or ".." in p.parts
                or p.as_posix() != value.rstrip("/") or value.startswith("./")):
            self.fail(key, f"must be a relative path inside the model directory, got {value!r}")
        return value


_JSON_NAMES = {"dict": "object", "list": "array", "str": "string", "int": "integer", "bool": "boolean"}


def _short(value) -> str:
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int of 4300+ digits, a structure nested too deep to print
        return f"<a {type(value).__name__} too large to print>"
    return text if len(text) <= 60 else text[:57] + "..."


def _tensor(r: _Reader, data, key: str, version: int, is_input: bool) -> TensorSpec:
    r.expect(data, dict, key)
    name = r.expect(data.get("name"), str, f"{key}.name")
    dtype = r.expect(data.get("dtype", "float32"), str, f"{key}.dtype")
    shape = r.expect(data.get("shape", []), list, f"{key}.shape")
    for i, d in enumerate(shape):
        if d is not None and not isinstance(d, str) and (not isinstance(d, int) or isinstance(d, bool) or d < 0):
            r.fail(f"{key}.shape[{i}]", f"must be a size or an axis name, got {_short(d)}")
    role = None
    if is_input:
        role = data.get("role", name if version == 1 and name in ROLES else None)
        if version == 1 and role is None:
            r.fail(f"{key}.name", f"{name!r} is not one of the version-1 inputs {', '.join(ROLES[:4])}")
        r.choice(role, ROLES, f"{key}.role", "roles the runtime feeds")
    return TensorSpec(name, dtype, tuple(shape), role)


def _graph(r: _Reader, data, key: str, version: int) -> Graph:
    r.expect(data, dict, key)
    inputs = r.expect(data.get("inputs"), list, f"{key}.inputs")
    outputs = r.expect(data.get("outputs", []), list, f"{key}.outputs")
    graph = Graph(
        file=r.path(data.get("file"), f"{key}.file"),
        inputs=tuple(_tensor(r, t, f"{key}.inputs[{i}]", version, True) for i, t in enumerate(inputs)),
        outputs=tuple(_tensor(r, t, f"{key}.outputs[{i}]", version, False) for i, t in enumerate(outputs)),
        precision=r.choice(data.get("precision", "fp32"), PRECISIONS, f"{key}.precision"),
        guidance=r.expect(data.get("cfg", False), bool, f"{key}.cfg"),
        optimization=r.expect(data.get("optimization") or {}, dict, f"{key}.optimization"),
    )
    roles = [spec.role for spec in graph.inputs]
    duplicated = sorted({role for role in roles if roles.count(role) > 1})
    if duplicated:
        r.fail(f"{key}.inputs", f"give the role(s) {', '.join(duplicated)} more than once")
    return graph


def _engine(r: _Reader, data, key: str, graphs: dict) -> Engine:
    r.expect(data, dict, key)
    known = ("file", "graph", "gpu", "tensorrt_version", "precision", "profile", "onnx_sha256")
    return Engine(
        file=r.path(data.get("file"), f"{key}.file"),
        graph=r.choice(data.get("graph"), list(graphs), f"{key}.graph", "graphs in this manifest"),
        gpu=r.expect(data.get("gpu"), str, f"{key}.gpu"),
        tensorrt_version=r.expect(data.get("tensorrt_version"), str, f"{key}.tensorrt_version"),
        precision=r.choice(data.get("precision", "fp32"), PRECISIONS, f"{key}.precision"),
        profile=r.expect(data.get("profile") or {}, dict, f"{key}.profile"),
        onnx_sha256=r.optional(data.get("onnx_sha256"), str, f"{key}.onnx_sha256"),
        build={k: v for k, v in data.items() if k not in known},
    )


def _schedule(r: _Reader, data: dict, config: dict) -> Schedule:
    # version 1 wrote "name"; version 2 writes "beta_schedule"
    beta_schedule = r.expect(data.get("beta_schedule", data.get("name", "cosine")), str, "schedule.beta_schedule")
    prediction = r.expect(data.get("prediction_type", "eps"), str, "schedule.prediction_type")
    r.choice(prediction, PREDICTION_TYPES, "schedule.prediction_type", "the runtime's samplers implement")
    timesteps = r.positive_int(data.get("timesteps", config.get("timesteps")), "schedule.timesteps")
    if timesteps != config["timesteps"]:
        r.fail("schedule.timesteps", f"is {timesteps} but config.timesteps is {config['timesteps']}")
    betas = r.expect(data.get("betas") or [], list, "schedule.betas")
    if not betas and beta_schedule not in BETA_SCHEDULES:
        r.fail("schedule.betas", f"are missing and {beta_schedule!r} is not a schedule the runtime can compute "
                                 f"({', '.join(BETA_SCHEDULES)})")
    if betas and len(betas) != timesteps:
        r.fail("schedule.betas", f"has {len(betas)} values but timesteps is {timesteps}")
    for i, b in enumerate(betas):
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b < 1:
            r.fail(f"schedule.betas[{i}]", f"must be a number in [0, 1), got {_short(b)}")
    s = data.get("s", 0.008)
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < 1:
        r.fail("schedule.s", f"must be a number in [0, 1), got {_short(s)}")
    return Schedule(timesteps=timesteps, betas=tuple(float(b) for b in betas), beta_schedule=beta_schedule,
                    prediction_type=prediction, s=float(s))


def _conditioning(r: _Reader, data: dict, version: int) -> Conditioning:
    cond_dim = data.get("cond_dim")
    if cond_dim is not None:
        r.positive_int(cond_dim, "conditioning.cond_dim")
    null = data.get("null_embedding")
    text = data.get("text_encoder")
    graph = data.get("text_encoder_graph")
    conditioning = Conditioning(
        cond_dim=cond_dim,
        null_embedding=None if null is None else r.path(null, "conditioning.null_embedding"),
        text_encoder=None if text is None else r.path(text, "conditioning.text_encoder"),
        max_length=None if data.get("max_length") is None else r.positive_int(data["max_length"],
                                                                              "conditioning.max_length"),
        pooling=r.optional(data.get("pooling"), str, "conditioning.pooling"),
        text_encoder_graph=None if graph is None else _text_graph(r, graph, version),
    )
    if (null or text) and cond_dim is None:
        r.fail("conditioning.cond_dim", "is missing, but a null embedding or text encoder is given")
    return conditioning


def _text_graph(r: _Reader, data, version: int) -> Graph:
    # the text encoder's inputs are token ids and a mask, not denoiser roles
    r.expect(data, dict, "conditioning.text_encoder_graph")
    tensors = {k: tuple(TensorSpec(t.get("name"), t.get("dtype"), tuple(t.get("shape", [])))
                        for t in r.expect(data.get(k, []), list, f"conditioning.text_encoder_graph.{k}")
                        if isinstance(t, dict))
               for k in ("inputs", "outputs")}
    return Graph(file=r.path(data.get("file"), "conditioning.text_encoder_graph.file"), **tensors)


def _check_denoiser_graph(r: _Reader, name: str, graph: Graph, manifest: Manifest) -> None:
    """The roles and shapes a denoiser graph must have to fit the config."""
    key = f"graphs.{name}"
    needed = ["x", "t"] + (["cond"] if manifest.cond_dim is not None else []) + (["cond_scale"] if graph.guidance else [])
    missing = [role for role in needed if graph.input(role) is None]
    if missing:
        r.fail(f"{key}.inputs", f"lack the role(s) {', '.join(missing)} (it has {', '.join(graph.roles) or 'none'})")
    if manifest.cond_dim is None and graph.input("cond") is not None:
        r.fail(f"{key}.inputs", "have a cond input, but conditioning.cond_dim is not set")
    if graph.input("cond_scale") is not None and not graph.guidance:
        r.fail(f"{key}.inputs", "have a cond_scale input, but the graph is not marked cfg")
    x = graph.input("x")
    expected = (None, *manifest.video_shape)
    if len(x.shape) != 5:
        r.fail(f"{key}.inputs[x].shape", f"is {list(x.shape)}: rank {len(x.shape)}, expected 5 (b, c, f, h, w)")
    for axis, (got, want) in enumerate(zip(x.shape, expected)):
        if isinstance(got, int) and want is not None and got != want:
            r.fail(f"{key}.inputs[x].shape",
                   f"is {list(x.shape)}, but the config says (batch, {', '.join(map(str, expected[1:]))}) (axis {axis})")
    if len(graph.input("t").shape) != 1:
        r.fail(f"{key}.inputs[t].shape", f"is {list(graph.input('t').shape)}, expected (batch,)")
    cond = graph.input("cond")
    if cond is not None and (len(cond.shape) != 2 or (isinstance(cond.shape[1], int)
                                                       and cond.shape[1] != manifest.cond_dim)):
        r.fail(f"{key}.inputs[cond].shape", f"is {list(cond.shape)}, expected (batch, {manifest.cond_dim})")
    if not graph.outputs:
        r.fail(f"{key}.outputs", "are empty; the first output must be eps")
