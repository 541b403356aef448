"""What the per-call section times: one row per way of running the denoiser.

The torch rows are fixed (``TORCH_ROWS``). The runtime rows come from the runtime's backends table:
every backend of ``BACKENDS`` that can run this model here, at every precision its entry lists
(``BackendSpec.precisions``), each opened through ``BACKENDS[name].open`` (``open_graph``) with one
``BackendOptions``; so a backend added to the table gets its rows with no edit here. ``FLAVOURS`` adds
the CPU comparisons (derived graphs, spinning threads, fused guidance against two calls).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vdeploy.runtime.cond_row import TokenLayout

from .common import GUIDANCE_SCALE, Inputs, first_line

TORCH_ROWS = {
    "torch-seed": "torch eager, the seed's video-diffusion-pytorch 0.6.3 Unet3D (same weights)",
    "torch": "torch eager, vdeploy.model.Unet3D (folded layout, position tables precomputed)",
    "torch-compile": "torch.compile of vdeploy's Unet3D (inductor)",
    "torch-fp16": "torch eager under autocast float16 (CUDA only)",
    "torch-bf16": "torch eager under autocast bfloat16 (CUDA only)",
    "torch-compile-fp16": "torch.compile of vdeploy's Unet3D under autocast float16 (CUDA only)",
    "torch-compile-bf16": "torch.compile of vdeploy's Unet3D under autocast bfloat16 (CUDA only)",
}
# torch.compile of the base U-Net takes 80-100 s per input shape on an H200 (inductor): on CUDA only the first
# batch size is compiled and timed unless asked (``--compile-batches``), so a GPU run stays within its minutes
CUDA_COMPILE_BATCHES = 1
# row names of the onnxruntime backends in earlier reports; other backends' rows carry their table name
ROW_PREFIX = {"cpu": "ort", "cuda": "ort-cuda", "tensorrt-ep": "ort-trt-ep"}
# backends that run on a CUDA GPU (the headline compares torch with the runtime on the same device)
GPU_BACKENDS = ("cuda", "tensorrt-ep", "tensorrt")


@dataclass(frozen=True)
class Flavour:
    """A further way of running a backend besides its plain graph at each precision.

    Args:
        backends: the table names it applies to.
        graph: ``plain``, ``cfg`` (the fused guidance graph), ``guided`` (the plain graph called twice,
            with cond and with the null embedding) or a derived graph (``slim``, ``offline``).
        spin: open with ``BackendOptions(spin=True)``.
        work_factor: denoiser evaluations per call.
    """

    backends: tuple[str, ...]
    graph: str
    summary: str
    spin: bool = False
    work_factor: int = 1
    precision: str = "fp32"
    cuda_graph: bool | None = None  # BackendOptions.cuda_graph (None: the default, CUDA graphs for a few shapes)
    nhwc: bool = False  # BackendOptions.nhwc (channels-last convolutions on CUDA)


FLAVOURS = {
    "slim": Flavour(("cpu",), "slim", "onnxslim'd graph (what export's --optimize auto keeps when faster)"),
    "offline": Flavour(("cpu",), "offline", "graph saved after onnxruntime's offline ENABLE_EXTENDED optimization"),
    "spin": Flavour(("cpu",), "plain", "plain graph, intra-op threads spin-wait (BackendOptions(spin=True))",
                    spin=True),
    "cfg": Flavour(("cpu",), "cfg", "fused CFG graph: cond + null as one batch of 2b, one call", work_factor=2),
    "guided": Flavour(("cpu",), "guided", "guidance as two calls of the plain graph (what --cfg replaces)",
                      work_factor=2),
    # the plain CUDA rows replay a CUDA graph per shape (the default); these run without one, for the comparison
    "nograph": Flavour(("cuda",), "plain", "without CUDA graphs (cuda_graph=False)", cuda_graph=False),
    "nograph-fp16": Flavour(("cuda",), "plain", "the fp16 graph without CUDA graphs (cuda_graph=False)",
                            precision="fp16", cuda_graph=False),
    "nograph-tf32": Flavour(("cuda",), "plain", "tf32 without CUDA graphs (cuda_graph=False)",
                            precision="tf32", cuda_graph=False),
    # channels-last convolutions (prefer_nhwc), with CUDA graphs
    "nhwc": Flavour(("cuda",), "plain", "channels-last convolutions (nhwc=True)", nhwc=True),
    "nhwc-tf32": Flavour(("cuda",), "plain", "tf32, channels-last convolutions (nhwc=True)", precision="tf32",
                         nhwc=True),
    "nhwc-fp16": Flavour(("cuda",), "plain", "the fp16 graph, channels-last convolutions (nhwc=True)",
                         precision="fp16", nhwc=True),
}


@dataclass
class Row:
    """One way of running the denoiser. ``make(batch)`` returns a zero-argument call that runs it once,
    synchronously, on fixed inputs of that batch size, and returns its output."""

    name: str
    family: str  # "torch" | "runtime"
    description: str
    make: Callable[[int], Callable[[], object]] | None = None
    backend: str | None = None  # the BACKENDS name of a runtime row
    precision: str = "fp32"
    flavour: str | None = None
    device: str = "cpu"
    work_factor: int = 1
    guided: bool = False  # returns the guided eps (at GUIDANCE_SCALE), not the plain one
    source: tuple | None = None  # (model dir, manifest, graph name, BackendOptions) it runs
    status: str = "ok"
    error: str | None = None
    setup_s: float = 0.0
    first_call_s: dict = field(default_factory=dict)
    times_ms: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)
    output: np.ndarray | None = None  # of the first call at the first batch size (for the error)
    max_batches: int | None = None  # time only the first this many batch sizes (torch.compile on CUDA)

    @property
    def shipped(self) -> bool:
        """What a user gets from ``vdeploy export`` + ``Pipeline.from_dir``: fp32, plain or slim'd graph."""
        return self.family == "runtime" and self.precision == "fp32" and self.flavour in (None, "slim")


def row_name(backend: str, precision: str = "fp32", flavour: str | None = None) -> str:
    name = ROW_PREFIX.get(backend, backend) + (f"-{flavour}" if flavour else "")
    return name if precision == "fp32" else f"{name}-{precision}"


def row_names() -> list[str]:
    """Every row this runtime can have (``--backends`` choices)."""
    from vdeploy.runtime.backends import BACKENDS

    names = list(TORCH_ROWS)
    for backend, spec in BACKENDS.items():
        names += [row_name(backend, p) for p in spec.precisions]
        names += [row_name(backend, flavour=f) for f, fl in FLAVOURS.items() if backend in fl.backends]
    return names


# --------------------------------------------------------------------------------------------- calls --


def torch_call(model, inputs: Inputs, batch: int, device, cuda: bool, autocast=None):
    import contextlib

    import torch

    feed = inputs.torch(batch, device)
    x, t, cond = feed["x"], feed["t"], feed.get("cond")
    extras = {k: v for k, v in feed.items() if k in Inputs.EXTRA_ROLES}  # Denoiser takes them by role
    cast = (lambda: torch.autocast("cuda", dtype=autocast)) if autocast is not None else contextlib.nullcontext

    def call():
        with torch.inference_mode(), cast():
            out = model(x, t, cond=cond, **extras)
        if cuda:
            torch.cuda.synchronize()
        return out

    return call


def runtime_call(backend, graph, inputs: Inputs, batch: int, null_cond=None):
    """One call of ``backend`` (running ``graph``) on the inputs, fed by role; with ``null_cond``, guidance
    as two calls (the runtime's ``guided``) at ``GUIDANCE_SCALE``."""
    from vdeploy.runtime.samplers import guided

    feed = inputs.numpy(batch)
    names = {role: graph.input(role).name for role in ("x", "t", "cond", *Inputs.EXTRA_ROLES)
             if graph.input(role) is not None}
    feeds = {names[role]: feed[role] for role in names}
    # the roles guidance does not change: the same in both branches here and in ``references`` (a token model's
    # null branch keeps the tokens: the call's cost is the same, and the comparison against torch alike)
    fixed = {names[role]: feed[role] for role in ("frames", "mask") if role in names}
    scale = graph.input("cond_scale")
    if scale is not None:
        shape = tuple(d if isinstance(d, int) else batch for d in scale.shape)
        feeds[scale.name] = np.full(shape, GUIDANCE_SCALE, dtype=np.float32)
    if null_cond is None:
        return lambda: backend.run(feeds)[0]

    layout = token_layout(graph)
    if layout is None:
        def denoise(x, t, cond):
            return backend.run({names["x"]: x, names["t"]: t, names["cond"]: cond, **fixed})[0]

        cond = feed["cond"]
    else:  # a token model: guidance moves packed rows (pooled | tokens | mask), as the Pipeline does
        def denoise(x, t, rows):
            pooled, tokens, mask = layout.split(rows)
            return backend.run({names["x"]: x, names["t"]: t, names["cond"]: pooled, names["text_tokens"]: tokens,
                                names["text_mask"]: mask, **fixed})[0]

        cond = layout.pack(feed["cond"], feed["text_tokens"], feed["text_mask"])
    g = guided(denoise, null_cond, GUIDANCE_SCALE)
    return lambda: g(feed["x"], feed["t"], cond)


def token_layout(graph):
    """The conditioning-row layout of a token model's graph (``text_tokens`` input), else None."""
    spec, cond = graph.input("text_tokens"), graph.input("cond")
    if spec is None or cond is None:
        return None
    return TokenLayout(cond_dim=int(cond.shape[1]), max_tokens=int(spec.shape[1]))


# ---------------------------------------------------------------------------------------------- rows --


def _open(row: Row, opener: Callable[[], Callable[[int], Callable]]) -> Row:
    """``row`` with ``make`` from ``opener()``; a row that cannot start is kept, with its error."""
    t0 = time.perf_counter()
    try:
        row.make = opener()
    except Exception as e:  # noqa: BLE001 (a backend that cannot start is reported, not fatal)
        row.status, row.error = "failed", first_line(e)
    row.setup_s = time.perf_counter() - t0
    return row


def torch_rows(wanted, unet, config: dict, inputs: Inputs, device: str,
               compile_batches: int | None = None) -> list[Row]:
    """The torch rows of ``TORCH_ROWS`` in ``wanted`` (the autocast ones on CUDA only). The compiled rows time
    the first ``compile_batches`` batch sizes (default: all on the CPU, ``CUDA_COMPILE_BATCHES`` on CUDA)."""
    import torch

    from vdeploy.export.wrapper import Denoiser

    from .models import load_seed_module, seed_unet

    tdev, cuda = torch.device(device), device == "cuda"
    denoiser = Denoiser(unet, config["num_frames"]).to(tdev).eval()

    def seed():
        model = seed_unet(load_seed_module(), unet, config, tdev)
        return lambda batch: torch_call(model, inputs, batch, tdev, cuda)

    def compiled(dtype=None):  # dtype: autocast traced into the compiled graph (its guards key on the mode)
        def opener():
            model = torch.compile(denoiser, dynamic=False)
            return lambda batch: torch_call(model, inputs, batch, tdev, cuda, autocast=dtype)
        return opener

    def autocast(dtype):
        return lambda: (lambda batch: torch_call(denoiser, inputs, batch, tdev, cuda, autocast=dtype))

    openers = {"torch-seed": seed, "torch": lambda: (lambda batch: torch_call(denoiser, inputs, batch, tdev, cuda)),
               "torch-compile": compiled(), "torch-fp16": autocast(torch.float16),
               "torch-bf16": autocast(torch.bfloat16), "torch-compile-fp16": compiled(torch.float16),
               "torch-compile-bf16": compiled(torch.bfloat16)}
    if compile_batches is None and cuda:
        compile_batches = CUDA_COMPILE_BATCHES
    rows = []
    for name, description in TORCH_ROWS.items():
        if name not in wanted or (name in AUTOCAST_ROWS and not cuda):
            continue
        row = _open(Row(name, "torch", description, device=device, precision=AUTOCAST_ROWS.get(name, "fp32")),
                    openers[name])
        if name.startswith("torch-compile"):
            row.extra["note"] = "compile time is in first_call_s; every batch size compiles once"
            if compile_batches is not None:
                row.max_batches = compile_batches
                row.extra["note"] += f"; only the first {compile_batches} batch size(s) (minutes each on CUDA)"
        rows.append(row)
    return rows


AUTOCAST_ROWS = {"torch-fp16": "fp16", "torch-bf16": "bf16", "torch-compile-fp16": "fp16",
                 "torch-compile-bf16": "bf16"}


def runtime_rows(wanted, model, inputs: Inputs, threads: int) -> tuple[list[Row], list[Row]]:
    """``(rows, skipped)``: a row for every wanted (backend, precision or flavour) that can run here, and
    the others with the reason."""
    from vdeploy.runtime.backends import BACKENDS, BackendOptions, graph_for, open_graph

    manifest = model.manifest
    null = null_embedding(model)
    rows: list[Row] = []
    skipped: list[Row] = []

    def add(name, backend, description, options, where, graph, *, flavour=None, work_factor=1, use_null=False):
        directory, m = where
        device = "cuda" if backend in GPU_BACKENDS else "cpu"

        def opener():
            opened = open_graph(backend, directory, m, graph, options)
            spec = m.graphs[graph]
            return lambda batch: runtime_call(opened, spec, inputs, batch, null if use_null else None)

        row = Row(name, "runtime", description, backend=backend, precision=options.precision, flavour=flavour,
                  device=device, work_factor=work_factor, guided=work_factor == 2,
                  source=(directory, m, graph, options))
        rows.append(_open(row, opener))

    def skip(name, backend, description, why):
        skipped.append(Row(name, "runtime", description, backend=backend, status="skipped", error=why))

    for backend, spec in BACKENDS.items():
        for precision in spec.precisions:
            name = row_name(backend, precision)
            if name not in wanted:
                continue
            description = f"{spec.summary}, {precision}"
            try:
                options = BackendOptions(precision=precision, threads=threads)
            except ValueError as e:  # a precision this runtime's options do not take
                skip(name, backend, description, str(e))
                continue
            why = spec.unavailable(manifest, options)
            graph = graph_for(backend, manifest, options)
            if why is None and graph is None:
                why = f"the model dir has no {precision} denoiser graph" + (" (export with --fp16)"
                                                                             if precision == "fp16" else "")
            if why is not None:
                skip(name, backend, description, why)
                continue
            add(name, backend, description, options, (model.path, manifest), graph)
        for flavour, fl in FLAVOURS.items():
            name = row_name(backend, flavour=flavour)
            if backend not in fl.backends or name not in wanted:
                continue
            description = f"{spec.summary}, {fl.summary}"
            options = BackendOptions(threads=threads, spin=fl.spin, precision=fl.precision, cuda_graph=fl.cuda_graph,
                                     nhwc=fl.nhwc)
            where, graph = (model.path, manifest), graph_for(backend, manifest, options)
            why = spec.unavailable(manifest, options)
            if fl.graph in ("cfg", "guided") and manifest.cond_dim is None:
                why = "the model is unconditioned (no cond_dim): pass --cond-dim N for the CFG comparison"
            elif why is None and fl.graph == "cfg":
                graph = graph_for(backend, manifest, options, guidance=True)
                why = None if graph else "no CFG graph exported"
            elif why is None and graph is None:
                why = f"the model dir has no {fl.precision} denoiser graph"
            elif why is None and fl.graph == "guided":
                why = None if null is not None else "the model dir has no null embedding"
            elif why is None and fl.graph != "plain":  # a derived graph
                if fl.graph in model.derived:
                    where, graph = model.derived[fl.graph], "denoiser"
                else:
                    why = "graph not available (see notes)"
            if why is not None:
                skip(name, backend, description, why)
                continue
            add(name, backend, description, options, where, graph, flavour=flavour, work_factor=fl.work_factor,
                use_null=fl.graph == "guided")
    return rows, skipped


def references(unet, config: dict, inputs: Inputs, batch: int, null_cond) -> dict:
    """torch fp32 (CPU) outputs the rows are checked against: ``eps`` and, for conditioned models, the
    guided eps at ``GUIDANCE_SCALE``."""
    import torch

    from vdeploy.export.wrapper import Denoiser

    den = Denoiser(unet, config["num_frames"]).cpu().eval()
    feed = inputs.torch(batch, "cpu")
    extras = {k: v for k, v in feed.items() if k in Inputs.EXTRA_ROLES}
    with torch.inference_mode():
        eps = den(feed["x"], feed["t"], feed.get("cond"), **extras).double().numpy()
        out = {"eps": eps}
        if null_cond is not None and "cond" in feed:
            null_extras = dict(extras)
            null_pooled = null_cond
            if "text_tokens" in feed:  # the packed null row of a token model: null pooled vector and null tokens
                tokens = feed["text_tokens"]
                layout = TokenLayout(cond_dim=tokens.shape[2], max_tokens=tokens.shape[1])
                null_pooled, null_tokens, null_mask = layout.split(null_cond)
                null_extras.update(text_tokens=torch.from_numpy(null_tokens).expand_as(tokens),
                                   text_mask=torch.from_numpy(null_mask).expand_as(feed["text_mask"]))
            null = den(feed["x"], feed["t"], torch.from_numpy(null_pooled).expand_as(feed["cond"]),
                       **null_extras).double().numpy()
            out["guided"] = null + (eps - null) * GUIDANCE_SCALE
    return out


def null_embedding(model) -> np.ndarray | None:
    """The unconditional row guidance uses: the null embedding ``(1, cond_dim)``, for a token model packed with
    its null token sequence (``runtime.cond_row``), as the Pipeline does; None without one."""
    from vdeploy.runtime.model_files import null_tokens

    name = model.manifest.conditioning.null_embedding
    if not name:
        return None
    null = np.load(Path(model.path) / name).reshape(1, -1).astype(np.float32)
    layout = token_layout(model.manifest.graphs["denoiser"])
    if layout is None:
        return null
    return layout.null_row(null, null_tokens(Path(model.path), model.manifest, layout.max_tokens))
