"""Reading an untrusted ``vdeploy.json``: every key type- and range-checked, every error naming the key
and the file (``ManifestError``). ``vdeploy.runtime.manifest.from_json`` and ``load`` call this."""

from __future__ import annotations

from pathlib import PurePosixPath

from .manifest_types import (
    BETA_SCHEDULES,
    FORMAT_VERSION,
    MANIFEST_NAME,
    PRECISIONS,
    PREDICTION_TYPES,
    READS_VERSIONS,
    REEXPORT,
    ROLES,
    Conditioning,
    Engine,
    Graph,
    Manifest,
    ManifestError,
    Schedule,
    TensorSpec,
)


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
    # the top-level precision summarizes the graphs' (written by Manifest.to_json): it must agree with them
    summary, precisions = data.get("precision"), sorted({g.precision for g in graphs.values()})
    if version >= 2 and summary is not None and summary != precisions:
        raise ManifestError(f"{where}: precision is {_short(summary)} but the graphs are {precisions}; {REEXPORT}")
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
        null_tokens=None if data.get("null_tokens") is None else r.path(data["null_tokens"], "conditioning.null_tokens"),
    )
    if (null or text or conditioning.null_tokens) and cond_dim is None:
        r.fail("conditioning.cond_dim", "is missing, but a null embedding, null tokens or text encoder is given")
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
    framed = manifest.config.get("frame_conditioning") is True
    needed = ["x", "t"] + (["cond"] if manifest.cond_dim is not None else []) + (["cond_scale"] if graph.guidance else [])
    needed += ["frames", "mask"] if framed else []
    tokens = manifest.config.get("text_cross_attention") is True
    needed += ["text_tokens", "text_mask"] if tokens else []
    missing = [role for role in needed if graph.input(role) is None]
    if missing:
        r.fail(f"{key}.inputs", f"lack the role(s) {', '.join(missing)} (it has {', '.join(graph.roles) or 'none'})")
    if not framed and (graph.input("frames") is not None or graph.input("mask") is not None):
        r.fail(f"{key}.inputs", "have frames/mask inputs, but the config's frame_conditioning is not true")
    if not tokens and (graph.input("text_tokens") is not None or graph.input("text_mask") is not None):
        r.fail(f"{key}.inputs", "have text_tokens/text_mask inputs, but the config's text_cross_attention is not true")
    if tokens:
        if manifest.cond_dim is None or not manifest.conditioning.null_tokens:
            r.fail("conditioning.null_tokens", "is missing, but the config's text_cross_attention is true (the "
                                               "unconditional branch needs the null token sequence)")
        length = manifest.config.get("text_max_tokens")
        want = {"text_tokens": (None, length, manifest.cond_dim), "text_mask": (None, length)}
        for role, shape in want.items():
            got = graph.input(role).shape
            if len(got) != len(shape) or any(w is not None and g != w for g, w in zip(got, shape)):
                expected = ", ".join("batch" if w is None else str(w) for w in shape)
                r.fail(f"{key}.inputs[{role}].shape", f"is {list(got)}, expected ({expected}) (config text_max_tokens, "
                                                     "conditioning.cond_dim)")
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
    frames, mask = graph.input("frames"), graph.input("mask")
    if frames is not None and len(frames.shape) != 5:
        r.fail(f"{key}.inputs[frames].shape", f"is {list(frames.shape)}, expected 5 axes like x (b, c, f, h, w)")
    f = manifest.video_shape[1]
    if mask is not None and (len(mask.shape) != 2 or (isinstance(mask.shape[1], int) and mask.shape[1] != f)):
        r.fail(f"{key}.inputs[mask].shape", f"is {list(mask.shape)}, expected (batch, {f})")
    if not graph.outputs:
        r.fail(f"{key}.outputs", "are empty; the first output must be eps")
