"""``Pipeline``: a model directory in, videos out; the sampling loop in numpy around the compiled denoiser."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import manifest as manifest_lib
from .backends import (BACKENDS, BackendOptions, BackendUnavailable, auto_order, backend_spec, graph_for, open_graph,
                       precision_refused)
from .manifest import Manifest, ManifestError
from .frame_conditioning import frame_feeds, known_frames
from .cond_row import TokenLayout
from .model_files import check_external_data_files, null_embedding, null_tokens, schedule_betas
from .sampler_run import CONDITIONING, SamplerRun, plan_run
from .samplers import sampler_spec
from .steps import drive, guided

log = logging.getLogger("vdeploy.runtime")

DEFAULT_SAMPLER = "dpmpp"
Prepared = SamplerRun  # the name ``prepare``'s result had before SamplerRun


class Pipeline:
    """A loaded model directory: call it to sample videos.

    Build it with ``Pipeline.from_dir``. Calls keep all their state local, so one pipeline may be
    called from several threads at once (the backends are thread-safe).

    Attributes:
        manifest: the model directory's typed manifest (``vdeploy.runtime.manifest.Manifest``).
        config: the model config from the manifest.
        shape: ``(channels, num_frames, image_size, image_size)`` of one video.
        betas: the float64 training betas.
        cond_dim: the conditioning width, or None for an unconditional model.
        token_layout: a model with token-level text conditioning (config ``text_cross_attention``): the
            ``vdeploy.runtime.cond_row.TokenLayout`` of its conditioning rows; None otherwise.
        cond_width: the width of a conditioning row (``cond``): ``cond_dim``, or for a token model the packed row of
            pooled embedding, tokens and mask (``token_layout.width``).
        frame_conditioned: the model was trained with masked frame conditioning (its graphs take ``frames``
            and ``mask``): ``frames=`` uses the trained method by default.
        backend_name: what runs the denoiser (e.g. ``"onnxruntime-cpu"``).
    """

    def __init__(self, model_dir: Path, manifest: Manifest, backend, cfg_backend=None, text_encoder=None, *,
                 graph: str = "denoiser", cfg_graph: str | None = None):
        self.model_dir = Path(model_dir)
        self.manifest = manifest
        self.config = dict(manifest.config)
        self.shape = manifest.video_shape
        self.betas = schedule_betas(manifest, self.model_dir / manifest_lib.MANIFEST_NAME)
        self.cond_dim = manifest.cond_dim
        self.null_cond = null_embedding(self.model_dir, manifest)
        self.backend = backend
        self.cfg_backend = cfg_backend
        self.graph = manifest.graphs[graph]
        self.token_layout = token_layout(self.graph, manifest)
        self.cond_width = self.token_layout.width if self.token_layout is not None else self.cond_dim
        if self.token_layout is not None and self.null_cond is not None:  # null for the pooled vector and the tokens
            self.null_cond = self.token_layout.null_row(self.null_cond, null_tokens(self.model_dir, manifest,
                                                                               self.token_layout.max_tokens))
        self.cfg_graph = None
        if cfg_backend is not None:
            self.cfg_graph = manifest.graphs[cfg_graph or manifest.find_graph(guidance=True)]
        self.text_encoder = text_encoder
        self.frame_conditioned = self.graph.input("frames") is not None
        self.prediction_type = manifest.schedule.prediction_type  # what the denoiser predicts (eps; v: issue 22)
        self.backend_name = backend.name

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        backend: str = "auto",
        *,
        options: BackendOptions | None = None,
        verify: bool = True,
        public_key: str | Path | None = None,
        **option_kwargs,
    ) -> Pipeline:
        """Load and validate a model directory written by ``vdeploy export``.

        Args:
            path: the model directory (``vdeploy.json`` and the files it lists).
            backend: ``"auto"`` (the first that runs here in ``BACKENDS``' ``auto_rank`` order, the CPU backends
                ranked by a cached warm-up measurement (``runtime/ranking.py``); logs which and why)
                or a name in ``vdeploy.runtime.backends.BACKENDS`` (``cpu``, ``cuda``, ``tensorrt-ep``,
                ``tensorrt``, ...).
            options: a :class:`~vdeploy.runtime.backends.BackendOptions` (precision, threads, device_id,
                max_batch, spin, cache); or give its fields as keywords (``precision="fp16"``).
            verify: check the sha256 of every listed file (on by default; the load refuses a tampered file).
            public_key: a PEM public key (EC P-256/384/521): the directory must carry a valid ``model.sig``
                made with its private key (``vdeploy export --sign-key``) over exactly these files; checked
                before anything in the directory is parsed or opened. Needs ``vdeploy[signing]``.

        Raises:
            ManifestError: a missing, unreadable, tampered or inconsistent model directory; with
                ``public_key``, also an unsigned, re-signed (other key) or modified one
                (``vdeploy.runtime.signing.SignatureError``).
            BackendUnavailable: the backend asked for cannot run here (the message says what to install).
        """
        if backend != "auto":
            backend_spec(backend)
        if options is None:
            options = BackendOptions(**option_kwargs)
        elif option_kwargs:
            raise ValueError("pass either `options` or its fields as keywords, not both")
        model_dir = Path(path)
        if public_key is not None:  # who made it, before anything in it is parsed
            from .signing import verify_dir

            verify_dir(model_dir, public_key)
        manifest = manifest_lib.load(model_dir, verify=False)
        if not verify:
            return cls._open_dir(model_dir, manifest, backend, options)
        # Hash every file on other threads while the sessions open (together most of a cold start).
        # Nothing runs before every sha256 matched; a graph that fails to open is reported as the
        # tampering it may be.
        with ThreadPoolExecutor(max_workers=1) as pool:
            verified = pool.submit(manifest_lib.verify_files, model_dir, manifest.files)
            try:
                pipe = cls._open_dir(model_dir, manifest, backend, options)
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
    def _open_dir(cls, model_dir: Path, manifest: Manifest, backend: str, options: BackendOptions) -> Pipeline:
        """``from_dir`` after the manifest is read: pick the backend, open the denoiser graphs on it."""
        where = model_dir / manifest_lib.MANIFEST_NAME
        schedule_betas(manifest, where)
        null_embedding(model_dir, manifest)
        layout = token_layout(manifest.graphs["denoiser"], manifest)
        if layout is not None:
            null_tokens(model_dir, manifest, layout.max_tokens)
        check_external_data_files(model_dir, manifest)
        if backend == "auto":
            kinds, skipped = auto_order(manifest, options, model_dir)
            for reason in skipped:
                log.info("backend %s", reason)
            if not kinds:
                raise BackendUnavailable("no backend can run here: " + "; ".join(skipped))
        else:
            refused = precision_refused(backend, options)
            if refused:
                raise ValueError(refused)
            reason = BACKENDS[backend].unavailable(manifest, options)
            if reason is not None:
                raise BackendUnavailable(f"{backend}: {reason}")
            kinds = [backend]
        errors = []
        for kind in kinds:
            graph = graph_for(kind, manifest, options)
            if graph is None:
                raise ManifestError(f"{where} has no {options.precision} denoiser graph "
                                    f"(export with --{options.precision} or use precision='fp32')")
            try:
                plain = open_graph(kind, model_dir, manifest, graph, options)
                break
            except BackendUnavailable as e:
                if backend != "auto":
                    raise
                errors.append(f"{kind}: {e}")
                log.info("backend %s unavailable: %s", kind, e)
        else:
            raise BackendUnavailable("no backend could start: " + "; ".join(errors))
        cfg = text_encoder = None
        try:  # what opened is released if a later part fails (a corrupt text encoder, say)
            cfg_graph = graph_for(kind, manifest, options, guidance=True)
            if cfg_graph is not None:
                try:
                    cfg = open_graph(kind, model_dir, manifest, cfg_graph, options)
                except BackendUnavailable as e:  # e.g. no TensorRT plan of it: guidance as two calls instead
                    log.info("fused guidance graph %s not on %s (%s): guidance runs as two calls",
                             cfg_graph, kind, e)
            log.info(
                "backend: %s (%s%s%s)", plain.name, plain.path.name, ", fused cfg graph" if cfg else "",
                f"; auto: the fastest of {', '.join(kinds)}" if backend == "auto" else "",
            )

            conditioning = manifest.conditioning
            if conditioning.text_encoder:
                from .onnx_external import graph_digest
                from .text import TextEncoder

                text_kind = "cuda" if BACKENDS[kind].device == "cuda" and \
                    BACKENDS["cuda"].unavailable(manifest, options) is None else "cpu"
                model_file = conditioning.text_encoder_files[0]
                text_encoder = TextEncoder(
                    model_dir / conditioning.text_encoder,
                    text_kind,
                    max_length=conditioning.max_length,
                    threads=options.threads,
                    onnx_sha256=graph_digest(model_dir, model_file, manifest.files),
                )
            return cls(model_dir, manifest, plain, cfg, text_encoder, graph=graph, cfg_graph=cfg_graph)
        except BaseException:
            for opened in (plain, cfg, text_encoder):
                if hasattr(opened, "close"):
                    opened.close()
            raise

    def close(self) -> None:
        """Release what the backends hold (sessions, device memory of native TensorRT, compiled models)."""
        for backend in (self.backend, self.cfg_backend, self.text_encoder):
            if hasattr(backend, "close"):
                backend.close()

    def denoiser(self, backend=None) -> Callable:
        """The plain denoiser as the samplers' contract ``eps = denoise(x, t, cond)`` (one graph call);
        ``backend``: another backend running the same graph (benchmarks)."""
        backend = backend or self.backend
        graph = self.graph
        x_name, t_name = graph.input("x").name, graph.input("t").name
        frame_inputs = frame_feeds(graph, self.model_dir)
        cond_feeds = self._cond_feeds(graph)

        def denoise(x, t, cond, **inputs):
            feeds = {x_name: x, t_name: t, **frame_inputs(x, inputs), **cond_feeds(cond)}
            return np.asarray(backend.run(feeds)[0], dtype=np.float32)

        return denoise

    def _fused_cfg_denoiser(self, cond_scale: float) -> Callable:
        """One call of the ``--cfg`` graph: conditional and null predictions combined inside the graph."""
        backend = self.cfg_backend
        graph = self.cfg_graph
        x_name, t_name = graph.input("x").name, graph.input("t").name
        scale_spec = graph.input("cond_scale")
        frame_inputs = frame_feeds(graph, self.model_dir)
        cond_feeds = self._cond_feeds(graph)

        def denoise(x, t, cond, **inputs):
            shape = tuple(d if isinstance(d, int) else x.shape[0] for d in scale_spec.shape)
            scale = np.full(shape, cond_scale, dtype=np.float32)
            feeds = {x_name: x, t_name: t, **cond_feeds(cond), scale_spec.name: scale, **frame_inputs(x, inputs)}
            return np.asarray(backend.run(feeds)[0], dtype=np.float32)

        return denoise

    def _cond_feeds(self, graph) -> Callable[[np.ndarray], dict]:
        """``cond rows -> feeds`` of a graph's conditioning inputs, by role: ``cond`` as it is, or a token model's
        packed rows split into ``cond``, ``text_tokens`` and ``text_mask`` (``cond_row``)."""
        if graph.input("cond") is None:  # an unconditional model
            return lambda cond: {}
        cond_name = graph.input("cond").name
        if self.token_layout is None:
            return lambda cond: {cond_name: cond}
        tokens_name, mask_name = graph.input("text_tokens").name, graph.input("text_mask").name
        split = self.token_layout.split

        def feeds(cond):
            pooled, tokens, mask = split(cond)
            return {cond_name: pooled, tokens_name: tokens, mask_name: mask}

        return feeds

    def encode_text(self, text: str | list[str]) -> np.ndarray:
        """Prompts -> conditioning rows ``(b, cond_width)`` through the model directory's text encoder: the pooled
        embeddings ``(b, cond_dim)``, or for a token model the packed rows of pooled embedding, tokens and mask."""
        if self.text_encoder is None:
            if self.cond_dim is None:
                raise ValueError(f"{self.model_dir} is an unconditional model (no cond_dim): it samples without "
                                 "prompts; leave `text` out")
            raise ValueError(f"{self.model_dir} has no text encoder; pass `cond` embeddings instead")
        texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
        if texts is None or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"`text` must be a string or a list of strings, got {_short(text)}")
        if not texts:
            raise ValueError("`text` is empty")
        if self.token_layout is not None:
            return self.token_layout.pack(*self.text_encoder.encode(texts, self.token_layout.max_tokens))
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
        frames: np.ndarray | None = None,
        known_mask: np.ndarray | None = None,
        resample: int = 0,
        frames_noise: Iterable[np.ndarray] | None = None,
        conditioning: str = "auto",
        **options,
    ) -> np.ndarray:
        """Sample videos.

        Args:
            batch_size: videos to sample (a ``cond``/``text``/``noise`` of b rows samples b; one cond row
                is repeated).
            cond: conditioning embeddings ``(b, cond_dim)`` (or ``(cond_dim,)``); for a model with token-level text
                conditioning, rows ``(b, cond_width)`` as ``encode_text`` returns them. A conditional model
                called without ``cond``/``text`` samples unconditionally with its learned null embedding.
            text: prompt(s), encoded by the model directory's text encoder.
            cond_scale: classifier-free guidance scale (1: none; else two denoiser calls per step, or one
                call of the fused ``--cfg`` graph when the model directory has it).
            sampler: a name in ``vdeploy.runtime.samplers.SAMPLERS`` (``dpmpp``: DPM-Solver++ 2M,
                ``ddim``, ``ddpm``: upstream's ancestral loop, ...).
            steps: denoiser steps; default: the sampler's ``default_steps`` (every training timestep
                for ddpm).
            seed: seeds the starting noise and every per-step noise (None: fresh entropy).
            noise: explicit starting noise ``(b, c, f, h, w)``, for reproducible runs and parity.
            step_noise: explicit per-step noise for samplers that draw it (one array per step).
            callback: called after every step with ``{"i", "t", "x", "x0", "eps"}``.
            progress: show a tqdm progress bar.
            frames: known frames in [0, 1], ``(c, k, h, w)`` or ``(b, c, k, h, w)`` (a b-row array samples b):
                the first ``k < f`` frames of every video (image-to-video, continuation), or a full video with
                ``known_mask`` (interpolation, in-filling). Every sampler replaces the known frames by their
                forward-diffused version before each denoiser call (``vdeploy.runtime.frame_conditioning``); a
                model trained with frame conditioning also gets them as inputs. The output's known frames are
                the given ones. Longer videos: ``extend``.
            known_mask: booleans ``(f,)`` or ``(b, f)``: which frames of a full-length ``frames`` are known.
            resample: RePaint resampling rounds per step with ``frames`` (ddpm and ddim; 0: none).
            frames_noise: explicit noise for the conditioning's own draws (parity; one array per draw).
            conditioning: ``"auto"`` (``"trained"`` when the model has frame conditioning, else
                ``"replacement"``), ``"trained"`` or ``"replacement"`` (training-free, any model).
            **options: the sampler's own options, as its table entry lists them (``eta`` for ddim,
                ``spacing``, ...); an option the sampler does not take is a ValueError.

        Returns:
            float32 ``(b, c, f, h, w)`` in [0, 1].
        """
        bar = None

        def on_step(info):
            if bar is not None:
                bar.update(1)
            if callback is not None:
                callback(info)

        run = self.prepare(batch_size=batch_size, cond=cond, text=text, cond_scale=cond_scale, sampler=sampler,
                           steps=steps, seed=seed, noise=noise, step_noise=step_noise, callback=on_step, frames=frames,
                           known_mask=known_mask, resample=resample, frames_noise=frames_noise,
                           conditioning=conditioning, **options)
        # timing counts graph calls only: what the runtime adds around them is the "outside" share
        denoise, timing = self.denoiser_for(run.cond_scale)
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=run.steps, desc=f"{sampler} sampling", unit="step")
        start = time.perf_counter()
        try:
            x0 = drive(run.machine, denoise)
        finally:
            if bar is not None:
                bar.close()
        total = time.perf_counter() - start
        log.info(
            "%s: %d steps, batch %d, %.3f s; denoiser %d calls %.3f s, outside the denoiser %.1f%%",
            sampler, run.steps, run.batch_size, total, timing[0], timing[1],
            100.0 * (total - timing[1]) / total if total else 0.0,
        )
        return run.finish(x0)

    def extend(self, video: np.ndarray | None = None, frames: int | None = None, overlap: int = 1,
               seed: int | None = None, **kwargs) -> np.ndarray:
        """A video longer than the model's frame count, autoregressively: each window of ``f`` frames is sampled
        with its first ``overlap`` frames known (the last ``overlap`` frames so far, conditioned as
        ``__call__(frames=...)``: the trained method where the model has it) and adds ``f - overlap`` new frames.

        Args:
            video: the start, ``(b, c, k, h, w)`` or ``(c, k, h, w)`` in [0, 1], kept as it is (``k >= overlap``);
                None samples a first window with ``kwargs``.
            frames: the length of the result (at least the start's).
            overlap: known frames per window, 1 to ``f - 1``.
            seed: seeds every window (each gets its own seed drawn from it).
            **kwargs: for every window's ``__call__`` (``text``/``cond``, ``sampler``, ``steps``, ``resample``,
                ``conditioning``, ``cond_scale``, ...; not ``frames``/``known_mask``/``noise``); a first window
                sampled from nothing (``video=None``) takes them less ``resample``/``conditioning``.

        Returns:
            float32 ``(b, c, frames, h, w)`` in [0, 1]; its first frames are ``video``'s.
        """
        f = self.shape[1]
        if not isinstance(overlap, (int, np.integer)) or not 1 <= overlap < f:
            raise ValueError(f"overlap must be 1 to {f - 1} frames for this {f}-frame model, got {overlap!r}")
        clash = sorted({"frames", "known_mask", "noise", "step_noise", "frames_noise"} & set(kwargs))
        if clash:
            raise ValueError(f"extend sets each window's {', '.join(clash)} itself")
        rng = np.random.default_rng(seed)
        window_seed = lambda: int(rng.integers(2**63 - 1))  # noqa: E731
        if video is None:
            plain = {k: v for k, v in kwargs.items() if k not in ("resample", "conditioning")}
            video = self(seed=window_seed(), **plain)
        video = np.asarray(video, dtype=np.float32)
        if video.ndim == 4:
            video = video[None]
        if video.ndim != 5 or video.shape[1] != self.shape[0] or video.shape[3:] != self.shape[2:]:
            c, _, h, w = self.shape
            raise ValueError(f"video must be (b, {c}, k, {h}, {w}) or ({c}, k, {h}, {w}), got shape {video.shape}")
        frames = video.shape[2] if frames is None else frames
        if not isinstance(frames, (int, np.integer)) or frames < video.shape[2]:
            raise ValueError(f"frames must be an integer >= the video's {video.shape[2]} frames, got {frames!r}")
        if video.shape[2] < overlap:
            raise ValueError(f"the video has {video.shape[2]} frames, fewer than overlap {overlap}")
        kwargs.setdefault("batch_size", video.shape[0])
        parts, total = [video], video.shape[2]
        while total < frames:
            last = np.concatenate(parts[-overlap:], axis=2)[:, :, -overlap:]  # each part has >= 1 frame
            window = self(frames=last, seed=window_seed(), **kwargs)
            if parts[0].shape[0] != window.shape[0]:  # one start row for several prompts: every video starts with it
                parts = [np.broadcast_to(p, (window.shape[0], *p.shape[1:])) for p in parts]
            parts.append(window[:, :, overlap:])
            total += f - overlap
        return np.concatenate(parts, axis=2)[:, :, :frames]

    def prepare(
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
        frames: np.ndarray | None = None,
        known_mask: np.ndarray | None = None,
        resample: int = 0,
        frames_noise: Iterable[np.ndarray] | None = None,
        conditioning: str = "auto",
        **options,
    ) -> SamplerRun:
        """Make one sampling run ready without calling the denoiser: ``__call__`` is exactly
        ``run = prepare(...); run.finish(drive(run.machine, denoiser_for(run.cond_scale)[0]))`` (``SamplerRun``).

        The same arguments as ``__call__`` (less ``progress``), checked the same way (every bad one raises
        ValueError here, before any step). The starting noise and the per-step noise come from ``seed`` as in
        a ``__call__``, so a driver that batches the machine's requests with others' (the serving batcher)
        gets that call's video.
        """
        sampler_spec(sampler)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if (isinstance(cond_scale, bool) or not isinstance(cond_scale, (int, float, np.integer, np.floating))
                or not np.isfinite(cond_scale)):
            raise ValueError(f"cond_scale must be a finite number, got {_short(cond_scale)}")
        if text is not None and cond is not None:
            raise ValueError("pass either `cond` or `text`, not both")
        if noise is not None:
            noise = _real_array(noise, "noise")
            if not np.all(np.isfinite(noise)):
                raise ValueError("noise holds NaN or Inf values")
            if batch_size == 1 and noise.ndim == 5:
                batch_size = noise.shape[0]  # the noise's batch, as cond's rows give theirs
                if batch_size < 1:
                    raise ValueError(f"noise has shape {noise.shape}: no videos (batch 0)")
        if frames is not None and batch_size == 1 and np.ndim(frames) == 5:
            batch_size = np.shape(frames)[0]  # so do the known frames' rows
        if text is not None:
            cond = self.encode_text(text)
        cond, batch_size = self._resolve_cond(cond, batch_size)
        try:
            rng = np.random.default_rng(seed)
        except TypeError:
            raise ValueError(f"seed must be a non-negative integer or None, got {_short(seed)}") from None
        shape = (batch_size, *self.shape)
        if noise is None:
            x = rng.standard_normal(shape, dtype=np.float32)
        else:
            x = noise
            if x.shape != shape:
                raise ValueError(f"noise has shape {x.shape}, expected {shape}")

        if conditioning not in CONDITIONING:
            raise ValueError(f"conditioning must be one of {', '.join(CONDITIONING)}, got {_short(conditioning)}")
        if conditioning == "trained" and not self.frame_conditioned:
            raise ValueError(f"{self.model_dir} was not trained with frame conditioning (config "
                             "frame_conditioning): use conditioning='replacement' (training-free) or 'auto'")
        known = method = None
        if frames is None:
            if known_mask is not None or resample or frames_noise is not None or conditioning != "auto":
                raise ValueError("known_mask, resample, frames_noise and conditioning need `frames` (the known "
                                 "frames)")
        else:
            method = "trained" if conditioning == "trained" or (
                conditioning == "auto" and self.frame_conditioned) else "replacement"
            known = known_frames(frames, known_mask, shape)
        plan = plan_run(sampler, steps=steps, timesteps=len(self.betas), cond=cond, options=options,
                        config=self.config, prediction_type=self.prediction_type, known_frames=known, method=method,
                        resample=resample)
        machine = plan.machine(x, self.betas, noise=step_noise, rng=rng, known_noise=frames_noise, callback=callback)
        return SamplerRun(machine, plan, batch_size, float(cond_scale), self.guidance(cond_scale), x, rng)

    def guidance(self, cond_scale: float) -> str:
        """How a run at ``cond_scale`` calls the graphs: ``"none"`` (the plain graph; unconditional models and
        ``cond_scale == 1``), ``"fused"`` (one call of the ``--cfg`` graph) or ``"two-calls"`` (the plain graph
        on cond and on the null embedding, combined as ``null + (cond - null) * cond_scale``)."""
        if self.cond_dim is None or cond_scale == 1:
            return "none"
        return "fused" if self.cfg_backend is not None else "two-calls"

    def denoiser_for(self, cond_scale: float) -> tuple[Callable, list]:
        """The denoiser a run at ``cond_scale`` uses (its guidance path, ``guidance``), and its ``[calls, seconds]``
        of graph time (local to the run, so thread-safe)."""
        guidance = self.guidance(cond_scale)
        if guidance == "fused":
            return _timed(self._fused_cfg_denoiser(cond_scale))
        denoise, timing = _timed(self.denoiser())
        if guidance == "two-calls":
            denoise = guided(denoise, self.null_cond, cond_scale)
        return denoise, timing

    timed_denoiser = denoiser_for  # its former name (the serving batcher's)

    def _resolve_cond(self, cond, batch_size):
        if cond is None:
            if self.cond_dim is None:
                return None, batch_size
            if self.null_cond is None:
                raise ValueError("this model is conditional: pass `cond` or `text`")
            return np.broadcast_to(self.null_cond.reshape(1, -1), (batch_size, self.cond_width)).copy(), batch_size
        if self.cond_dim is None:
            raise ValueError("this model is unconditional (no cond_dim): `cond`/`text` cannot be used")
        cond = _real_array(cond, "cond")
        if cond.ndim == 1:
            cond = cond[None]
        if self.token_layout is not None and cond.ndim == 2 and cond.shape[1] == self.cond_dim != self.cond_width:
            raise ValueError(f"this model also attends to the prompt's tokens (text_cross_attention): pass `text`, or "
                             f"`cond` rows of width {self.cond_width} from encode_text (pooled embedding, tokens, "
                             f"mask), not pooled embeddings alone ({self.cond_dim})")
        if cond.ndim != 2 or cond.shape[1] != self.cond_width or cond.shape[0] < 1:
            raise ValueError(f"cond must be (b, {self.cond_width}) with b >= 1, got shape {cond.shape}")
        if not np.all(np.isfinite(cond)):
            raise ValueError("cond holds NaN or Inf values")
        if cond.shape[0] == 1 and batch_size > 1:
            cond = np.repeat(cond, batch_size, axis=0)
        elif batch_size not in (1, cond.shape[0]):
            raise ValueError(f"batch_size {batch_size} does not match the {cond.shape[0]} rows of cond")
        return cond, cond.shape[0]


def token_layout(graph, manifest: Manifest) -> TokenLayout | None:
    """The conditioning-row layout of a graph with ``text_tokens``/``text_mask`` inputs (a token model), else None."""
    spec = graph.input("text_tokens")
    if spec is None or graph.input("text_mask") is None or manifest.cond_dim is None:
        return None
    return TokenLayout(cond_dim=manifest.cond_dim, max_tokens=int(spec.shape[1]))


def _real_array(value, name: str) -> np.ndarray:
    """``value`` as float32, refusing what is not real numbers (strings, objects, complex) with a ValueError."""
    try:
        kind = np.asarray(value).dtype.kind
        if kind not in "fiub":
            raise TypeError(kind)
        with np.errstate(over="ignore"):  # a float64 1e300 becomes inf here, refused by the finite checks
            return np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an array of real numbers, got {_short(value)}") from None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _timed(denoise):
    """Wrap a denoiser to count its calls and seconds (local to one sampling run, so thread-safe)."""
    timing = [0, 0.0]

    def timed(x, t, cond, **inputs):
        start = time.perf_counter()
        out = denoise(x, t, cond, **inputs)
        timing[0] += 1
        timing[1] += time.perf_counter() - start
        return out

    return timed, timing
