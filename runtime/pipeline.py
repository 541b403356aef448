"""``Pipeline``: a model directory in, videos out; the sampling loop in numpy around the compiled denoiser."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import manifest as manifest_lib
from .backends import (
    KINDS,
    BackendUnavailable,
    OrtBackend,
    TensorRTBackend,
    auto_kinds,
    import_tensorrt,
    matching_engine,
    ort_providers,
)
from .manifest import ManifestError
from .samplers import guided, sampler_kwargs, sampler_spec
from .schedule import betas_from_spec

log = logging.getLogger("vdeploy.runtime")

DEFAULT_SAMPLER = "dpmpp"


class Pipeline:
    """A loaded model directory: call it to sample videos.

    Build it with ``Pipeline.from_dir``. Calls keep all their state local, so one pipeline may be
    called from several threads at once (the backends are thread-safe).

    Attributes:
        config: the model config from the manifest.
        shape: ``(channels, num_frames, image_size, image_size)`` of one video.
        betas: the float64 training betas.
        cond_dim: the conditioning width, or None for an unconditional model.
        backend_name: what runs the denoiser (e.g. ``"onnxruntime-cpu"``).
    """

    def __init__(self, model_dir: Path, manifest: dict, backend, cfg_backend=None, text_encoder=None):
        self.model_dir = Path(model_dir)
        self.manifest = manifest
        self.config = manifest["config"]
        self.shape = _video_shape(self.config)
        self.betas = _betas(manifest)
        conditioning = manifest.get("conditioning") or {}
        self.cond_dim = conditioning.get("cond_dim")
        self.null_cond = _null_embedding(self.model_dir, conditioning)
        self.backend = backend
        self.cfg_backend = cfg_backend
        self.text_encoder = text_encoder
        self.backend_name = backend.name

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        backend: str = "auto",
        *,
        precision: str = "fp32",
        threads: int | None = None,
        device_id: int = 0,
        max_batch: int = 16,
        verify: bool = True,
    ) -> Pipeline:
        """Load and validate a model directory written by ``vdeploy export``.

        Args:
            path: the model directory (``vdeploy.json`` and the files it lists).
            backend: ``"auto"`` (the fastest available: a native TensorRT plan for this GPU, then the
                onnxruntime TensorRT EP, CUDA, CPU; logs which), or one of ``"cpu"``, ``"cuda"``,
                ``"tensorrt-ep"``, ``"tensorrt"``.
            precision: ``"fp32"``, or ``"fp16"``: the fp16 graph on onnxruntime CPU/CUDA, the fp16 flag on
                the TensorRT EP, an fp16 plan for native TensorRT.
            threads: onnxruntime CPU intra-op threads (default: physical cores).
            device_id: the CUDA device.
            max_batch: the largest batch a TensorRT EP engine is built for.
            verify: check the sha256 of every listed file (on by default; the load refuses a tampered file).

        Raises:
            ManifestError: a missing, unreadable, tampered or inconsistent model directory.
            BackendUnavailable: the backend asked for cannot run here (the message says what to install).
        """
        if backend not in ("auto", *KINDS):
            raise ValueError(f"backend must be 'auto' or one of {', '.join(KINDS)}, got {backend!r}")
        if precision not in ("fp32", "fp16"):
            raise ValueError(f"precision must be 'fp32' or 'fp16', got {precision!r}")
        model_dir = Path(path)
        manifest = manifest_lib.load(model_dir, verify=False)
        args = (model_dir, manifest, backend, precision, threads, device_id, max_batch)
        if not verify:
            return cls._open_dir(*args)
        # Hash every file on other threads while the sessions open (together most of a cold start).
        # Nothing runs before every sha256 matched; a graph that fails to open is reported as the
        # tampering it may be.
        with ThreadPoolExecutor(max_workers=1) as pool:
            verified = pool.submit(manifest_lib.verify_files, model_dir, manifest)
            try:
                pipe = cls._open_dir(*args)
            except BaseException:
                verified.result()
                raise
            try:
                verified.result()
            except ManifestError:
                pipe.close()
                raise
        return pipe

    @classmethod
    def _open_dir(cls, model_dir: Path, manifest: dict, backend, precision, threads, device_id, max_batch):
        """``from_dir`` after the manifest is read: check it against the config, open the backends."""
        where = model_dir / manifest_lib.MANIFEST_NAME
        _video_shape(manifest["config"], where)
        _betas(manifest, where)
        cond_dim = (manifest.get("conditioning") or {}).get("cond_dim")
        graphs = {name: g for name, g in manifest["graphs"].items() if name.startswith("denoiser")}
        for name, graph in graphs.items():
            _check_graph_entry(name, graph, manifest["config"], cond_dim, where)
        engines = manifest.get("engines") or []
        kinds = auto_kinds(engines, "denoiser", device_id) if backend == "auto" else [backend]
        errors = []
        for kind in kinds:
            # fp16 on onnxruntime CPU/CUDA runs the fp16 graph; TensorRT converts the fp32 graph itself
            graph = "denoiser"
            if precision == "fp16" and kind in ("cpu", "cuda"):
                graph = _find_graph(graphs, cfg=False, precision="fp16", where=where)
            cfg_graph = _find_graph(graphs, cfg=True, precision=graphs[graph].get("precision", "fp32"), where=where,
                                    required=False)
            if kind == "tensorrt" and cfg_graph and matching_engine(engines, cfg_graph, device_id, precision) is None:
                cfg_graph = None
            try:
                plain = _open(model_dir, manifest, graph, kind, precision, threads, device_id, max_batch)
                cfg = None
                if cfg_graph is not None:
                    cfg = _open(model_dir, manifest, cfg_graph, kind, precision, threads, device_id, max_batch)
                break
            except BackendUnavailable as e:
                if backend != "auto":
                    raise
                errors.append(f"{kind}: {e}")
                log.info("backend %s unavailable: %s", kind, e)
        else:
            raise BackendUnavailable("no backend could start: " + "; ".join(errors))
        for opened, name in ((plain, graph), (cfg, cfg_graph)):
            if opened is not None:
                _check_backend_inputs(opened, graphs[name], name, where)
        log.info(
            "backend: %s (%s%s%s)", plain.name, plain.path.name, ", fused cfg graph" if cfg else "",
            f"; auto: the fastest of {', '.join(kinds)}" if backend == "auto" else "",
        )

        text_encoder = None
        conditioning = manifest.get("conditioning") or {}
        if conditioning.get("text_encoder"):
            from .text import TextEncoder

            text_kind = "cuda" if plain.kind != "cpu" and "CUDAExecutionProvider" in ort_providers() else "cpu"
            text_encoder = TextEncoder(
                model_dir / conditioning["text_encoder"],
                text_kind,
                max_length=conditioning.get("max_length"),
                threads=threads,
                onnx_sha256=manifest["files"].get(f"{conditioning['text_encoder'].rstrip('/')}/model.onnx"),
            )
        return cls(model_dir, manifest, plain, cfg, text_encoder)

    def close(self) -> None:
        """Release device memory held by native TensorRT backends (onnxruntime sessions free themselves)."""
        for backend in (self.backend, self.cfg_backend):
            if hasattr(backend, "close"):
                backend.close()

    def denoiser(self, backend=None) -> Callable:
        """The plain denoiser as the samplers' contract ``eps = denoise(x, t, cond)`` (one graph call)."""
        backend = backend or self.backend
        names = [spec.name for spec in backend.inputs]
        has_cond = self.cond_dim is not None

        def denoise(x, t, cond):
            feeds = {names[0]: x, names[1]: t}
            if has_cond:
                feeds[names[2]] = cond
            return np.asarray(backend.run(feeds)[0], dtype=np.float32)

        return denoise

    def _fused_cfg_denoiser(self, cond_scale: float) -> Callable:
        """One call of the ``--cfg`` graph: conditional and null predictions combined inside the graph."""
        backend = self.cfg_backend
        names = [spec.name for spec in backend.inputs]
        scale_spec = backend.inputs[3]

        def denoise(x, t, cond):
            shape = tuple(d if isinstance(d, int) else x.shape[0] for d in scale_spec.shape)
            scale = np.full(shape, cond_scale, dtype=np.float32)
            feeds = {names[0]: x, names[1]: t, names[2]: cond, names[3]: scale}
            return np.asarray(backend.run(feeds)[0], dtype=np.float32)

        return denoise

    def encode_text(self, text: str | list[str]) -> np.ndarray:
        """Prompts -> conditioning ``(b, cond_dim)`` through the model directory's text encoder."""
        if self.text_encoder is None:
            raise ValueError(f"{self.model_dir} has no text encoder; pass `cond` embeddings instead")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("`text` is empty")
        return self.text_encoder(texts)

    def __call__(
        self,
        batch_size: int = 1,
        cond: np.ndarray | None = None,
        text: str | list[str] | None = None,
        cond_scale: float = 1.0,
        sampler: str = DEFAULT_SAMPLER,
        steps: int | None = None,
        seed: int | None = None,
        noise: np.ndarray | None = None,
        step_noise: Iterable[np.ndarray] | None = None,
        callback: Callable[[dict], None] | None = None,
        progress: bool = False,
        **options,
    ) -> np.ndarray:
        """Sample videos.

        Args:
            batch_size: videos to sample (a ``cond``/``text``/``noise`` of b rows samples b; one cond row
                is repeated).
            cond: conditioning embeddings ``(b, cond_dim)`` (or ``(cond_dim,)``). A conditional model
                called without ``cond``/``text`` samples unconditionally with its learned null embedding.
            text: prompt(s), encoded by the model directory's text encoder.
            cond_scale: classifier-free guidance scale (1: none; else two denoiser calls per step, or one
                call of the fused ``--cfg`` graph when the model directory has it).
            sampler: a name in ``vdeploy.runtime.samplers.SAMPLERS`` (``dpmpp``: DPM-Solver++ 2M,
                ``ddim``, ``ddpm``: the seed's ancestral loop, ...).
            steps: denoiser steps; default: the sampler's ``default_steps`` (every training timestep
                for ddpm).
            seed: seeds the starting noise and every per-step noise (None: fresh entropy).
            noise: explicit starting noise ``(b, c, f, h, w)``, for reproducible runs and parity.
            step_noise: explicit per-step noise for samplers that draw it (one array per step).
            callback: called after every step with ``{"i", "t", "x", "x0", "eps"}``.
            progress: show a tqdm progress bar.
            **options: the sampler's own options, as its table entry lists them (``eta`` for ddim,
                ``spacing``, ...); an option the sampler does not take is a ValueError.

        Returns:
            float32 ``(b, c, f, h, w)`` in [0, 1].
        """
        spec = sampler_spec(sampler)
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if text is not None and cond is not None:
            raise ValueError("pass either `cond` or `text`, not both")
        if noise is not None:
            noise = np.asarray(noise, dtype=np.float32)
            if batch_size == 1 and noise.ndim == 5:
                batch_size = noise.shape[0]  # the noise's batch, as cond's rows give theirs
        if text is not None:
            cond = self.encode_text(text)
        cond, batch_size = self._resolve_cond(cond, batch_size)
        rng = np.random.default_rng(seed)
        shape = (batch_size, *self.shape)
        if noise is None:
            x = rng.standard_normal(shape, dtype=np.float32)
        else:
            x = noise
            if x.shape != shape:
                raise ValueError(f"noise has shape {x.shape}, expected {shape}")
        if not np.isfinite(cond_scale):
            raise ValueError(f"cond_scale must be a finite number, got {cond_scale!r}")

        # timing counts graph calls only: what the runtime adds around them is the "outside" share
        if self.cond_dim is None or cond_scale == 1:
            denoise, timing = _timed(self.denoiser())
        elif self.cfg_backend is not None:
            denoise, timing = _timed(self._fused_cfg_denoiser(cond_scale))
        else:
            plain, timing = _timed(self.denoiser())
            denoise = guided(plain, self.null_cond, cond_scale)

        num_steps = steps if steps is not None else (spec.default_steps or len(self.betas))
        kwargs = {
            "cond": cond, "clip_denoised": True,
            **sampler_kwargs(sampler, num_steps, options, noise=step_noise, rng=rng),
        }
        if self.config.get("use_dynamic_thres"):
            kwargs["dynamic_thres_percentile"] = self.config.get("dynamic_thres_percentile", 0.9)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=num_steps, desc=f"{sampler} sampling", unit="step")

        def on_step(info):
            if bar is not None:
                bar.update(1)
            if callback is not None:
                callback(info)

        start = time.perf_counter()
        try:
            x0 = spec.fn(denoise, x, self.betas, callback=on_step, **kwargs)
        finally:
            if bar is not None:
                bar.close()
        total = time.perf_counter() - start
        log.info(
            "%s: %d steps, batch %d, %.3f s; denoiser %d calls %.3f s, outside the denoiser %.1f%%",
            sampler, num_steps, batch_size, total, timing[0], timing[1],
            100.0 * (total - timing[1]) / total if total else 0.0,
        )
        return np.clip((x0 + 1) * 0.5, 0.0, 1.0)  # the seed's unnormalize_img

    def _resolve_cond(self, cond, batch_size):
        if cond is None:
            if self.cond_dim is None:
                return None, batch_size
            if self.null_cond is None:
                raise ValueError("this model is conditional: pass `cond` or `text`")
            return np.broadcast_to(self.null_cond.reshape(1, -1), (batch_size, self.cond_dim)).copy(), batch_size
        if self.cond_dim is None:
            raise ValueError("this model is unconditional (no cond_dim): `cond`/`text` cannot be used")
        cond = np.asarray(cond, dtype=np.float32)
        if cond.ndim == 1:
            cond = cond[None]
        if cond.ndim != 2 or cond.shape[1] != self.cond_dim:
            raise ValueError(f"cond must be (b, {self.cond_dim}), got shape {cond.shape}")
        if cond.shape[0] == 1 and batch_size > 1:
            cond = np.repeat(cond, batch_size, axis=0)
        elif batch_size not in (1, cond.shape[0]):
            raise ValueError(f"batch_size {batch_size} does not match the {cond.shape[0]} rows of cond")
        return cond, cond.shape[0]


def _timed(denoise):
    """Wrap a denoiser to count its calls and seconds (local to one sampling run, so thread-safe)."""
    timing = [0, 0.0]

    def timed(x, t, cond):
        start = time.perf_counter()
        out = denoise(x, t, cond)
        timing[0] += 1
        timing[1] += time.perf_counter() - start
        return out

    return timed, timing


def _video_shape(config: dict, where="the manifest") -> tuple:
    try:
        channels = int(config.get("channels", 3))
        frames, size = int(config["num_frames"]), int(config["image_size"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ManifestError(f"{where}: config lacks a usable channels/num_frames/image_size ({e})") from None
    return channels, frames, size, size


def _betas(manifest: dict, where="the manifest") -> np.ndarray:
    try:
        betas = betas_from_spec(manifest["schedule"])
    except (ValueError, TypeError, AttributeError) as e:
        raise ManifestError(f"{where}: bad schedule: {e}") from None
    timesteps = manifest["config"].get("timesteps")
    if timesteps is not None and len(betas) != timesteps:
        raise ManifestError(f"{where}: schedule has {len(betas)} betas but config timesteps={timesteps}")
    return betas


def _null_embedding(model_dir: Path, conditioning: dict) -> np.ndarray | None:
    name = conditioning.get("null_embedding")
    if not name:
        return None
    try:
        null = np.load(model_dir / name, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ManifestError(f"cannot read the null embedding {model_dir / name}: {e}") from None
    cond_dim = conditioning.get("cond_dim")
    if null.size != cond_dim or null.ndim > 2:
        raise ManifestError(f"null embedding {name} has shape {null.shape}, expected ({cond_dim},) or (1, {cond_dim})")
    return null.astype(np.float32).reshape(1, -1)


def _find_graph(graphs: dict, *, cfg: bool, precision: str, where, required: bool = True) -> str | None:
    for name, graph in graphs.items():
        if bool(graph.get("cfg")) == cfg and graph.get("precision", "fp32") == precision:
            return name
    if required:
        raise ManifestError(f"{where} has no {precision} {'cfg ' if cfg else ''}denoiser graph")
    return None


def _check_graph_entry(name: str, graph: dict, config: dict, cond_dim, where) -> None:
    """The manifest's input shapes must fit the config: ``x`` (b, c, f, h, w), ``t`` (b,), ``cond`` (b, D)."""
    inputs = graph.get("inputs")
    if not isinstance(inputs, list) or len(inputs) < 2:
        raise ManifestError(f"{where}: graph {name!r} must list its inputs (x, t[, cond][, cond_scale])")
    expected = (None, *_video_shape(config, where))
    x_shape = inputs[0].get("shape", [])
    if len(x_shape) != 5:
        raise ManifestError(
            f"{where}: graph {name!r} input {inputs[0].get('name')!r} has rank {len(x_shape)}, expected 5"
        )
    for axis, (got, want) in enumerate(zip(x_shape, expected)):
        if isinstance(got, int) and want is not None and got != want:
            raise ManifestError(
                f"{where}: graph {name!r} input {inputs[0].get('name')!r} has shape {x_shape}, but the config "
                f"says (batch, {', '.join(map(str, expected[1:]))}) (axis {axis})"
            )
    if len(inputs[1].get("shape", [])) != 1:
        raise ManifestError(f"{where}: graph {name!r} timestep input must be (batch,)")
    wanted = 2 + (cond_dim is not None) + bool(graph.get("cfg"))
    if len(inputs) != wanted:
        raise ManifestError(
            f"{where}: graph {name!r} has {len(inputs)} inputs, expected {wanted} "
            f"(x, t{', cond' if cond_dim is not None else ''}{', cond_scale' if graph.get('cfg') else ''})"
        )
    if cond_dim is not None:
        c_shape = inputs[2].get("shape", [])
        if len(c_shape) != 2 or (isinstance(c_shape[1], int) and c_shape[1] != cond_dim):
            raise ManifestError(f"{where}: graph {name!r} cond input has shape {c_shape}, expected (batch, {cond_dim})")


def _check_backend_inputs(backend, graph: dict | None, name: str, where) -> None:
    """The loaded graph must have the inputs the manifest lists, in order, with the same ranks."""
    if graph is None:
        return
    listed = [(i["name"], len(i.get("shape", []))) for i in graph["inputs"]]
    actual = [(spec.name, len(spec.shape)) for spec in backend.inputs]
    if listed != actual:
        raise ManifestError(f"{where}: graph {name!r} has inputs {actual}, but the manifest lists {listed}")


def _profile(graph: dict, config: dict, cond_dim, max_batch: int) -> dict:
    """A TensorRT shape profile ``{input: (min, opt, max)}``: batch 1 to ``max_batch``, the rest from the config."""
    concrete = {0: (None, *_video_shape(config)), 1: (None,), 2: (None, cond_dim)}
    profile = {}
    for index, spec in enumerate(graph["inputs"]):
        shape = spec.get("shape", [])
        if all(isinstance(d, int) for d in shape):
            continue  # static inputs (cond_scale) need no profile
        dims = []
        for axis, dim in enumerate(shape):
            if isinstance(dim, int):
                dims.append((dim, dim, dim))
            elif axis == 0:
                dims.append((1, 1, max_batch))
            else:
                known = concrete.get(index, ())
                value = known[axis] if axis < len(known) else None
                if value is None:
                    raise ManifestError(f"cannot bound dynamic axis {axis} ({dim!r}) of input {spec['name']!r}")
                dims.append((value, value, value))
        profile[spec["name"]] = tuple(tuple(d[i] for d in dims) for i in range(3))
    return profile


def _open(model_dir, manifest, graph_name, kind, precision, threads, device_id, max_batch):
    """Open one graph of the model directory on one backend kind."""
    graphs, engines = manifest["graphs"], manifest.get("engines") or []
    if kind == "tensorrt":
        import_tensorrt()  # names the extra to install when the bindings are missing
        entry = matching_engine(engines, graph_name, device_id, precision)
        if entry is None:
            listed = ", ".join(
                f"{e.get('file')} ({e.get('gpu')}, TensorRT {e.get('tensorrt_version')})" for e in engines
            )
            raise BackendUnavailable(
                f"no TensorRT plan of graph {graph_name!r} for this GPU and TensorRT version in {model_dir}"
                + (f" (it has: {listed})" if listed else "")
                + "; build one with `vdeploy export --tensorrt` or use backend='tensorrt-ep'"
            )
        if entry.get("precision", precision) != precision:
            log.info("TensorRT: no %s plan of %r for this GPU; using the %s plan",
                     precision, graph_name, entry["precision"])
        return TensorRTBackend(model_dir / entry["file"], device_id=device_id)
    graph = graphs[graph_name]
    profile = None
    if kind == "tensorrt-ep":
        conditioning = manifest.get("conditioning") or {}
        profile = _profile(graph, manifest["config"], conditioning.get("cond_dim"), max_batch)
    return OrtBackend(
        model_dir / graph["file"],
        kind,
        threads=threads,
        device_id=device_id,
        fp16=precision == "fp16",
        profile=profile,
        onnx_sha256=manifest["files"].get(graph["file"]),
    )
