"""``vdeploy parity``: PyTorch and the compiled runtime sampled from the same noise, compared call by call.

* ``ddpm`` over all training steps: the torch side is upstream's loop itself,
  ``vdeploy.diffusion.GaussianDiffusion.p_sample_loop`` with explicit noise (x_T, then one array per
  step); the runtime side is ``vdeploy.runtime.Pipeline`` with the same ``noise``/``step_noise``.
* ``ddim``, ``dpmpp`` (and a respaced ``ddpm``): the same ``SamplerRun`` (``vdeploy.runtime.sampler_run``)
  around the torch denoiser (``Unet3D.forward_with_cond_scale``) and, through the Pipeline, around the
  compiled one (including the fused ``--cfg`` graph when the model directory has it).
* ``known=K``: the same with the first K frames given (``vdeploy.runtime.frame_conditioning``).

Both runs follow their own trajectories, so the per-call error includes what earlier steps accumulated.
Reported: the max abs error of every denoiser call (eps, after guidance), of the final video in [0, 1],
and its PSNR. Judged (``default_criterion``): fp32 and tf32 by the max abs errors (``atol``); the half
precisions, fp16 and bf16, by the final video's PSNR (``min_psnr``): their per-call error is what half precision
is, and what a user sees is the video.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np

from .spec import ExportError

log = logging.getLogger("vdeploy.export")

DEFAULT_ATOL = 1e-3  # fp32 CPU over a full loop (final max abs error <= 1e-3 for the tiny model)
BF16_ATOL = 0.25  # bfloat16 keeps 8 mantissa bits: its per-call scale on the tiny model (README, "Parity"), for atol=


# TF32 rounds convolution/matmul inputs to a 10-bit mantissa (unit round-off 2^-11 = 4.9e-4); the CUDA EP's
# TF32 default measured 4.6e-3 worst per call on the tiny model (issue 20): about 4x headroom
TF32_ATOL = 2e-2


# The half precisions are judged by the final video's PSNR against PyTorch fp32 (their per-call errors are
# reported), one bar per precision:
# - fp16 (GPUs): 35 dB, issue 20's bar, an RMS error of 10^(-35/20) = 1.8% of the [0, 1] range (about 4.5 of 255
#   levels); fp16 measured 39.7-48.2 dB on the H200 (README, "GPU").
# - bf16 (OpenVINO on CPUs with bfloat16): 30 dB, issue 23's bar for shipping a CPU precision (RMS 3.2% of the
#   range); bfloat16 keeps 8 mantissa bits to fp16's 11, and the demo recipe's model measured 32.4 dB on its worst
#   of 8 videos (README, "Performance": benchmarks/precision_check.py).
MIN_PSNR_DB = {"fp16": 35.0, "bf16": 30.0}


def default_atol(precision: str) -> float | None:
    """The max-abs tolerance a parity run of ``precision`` is held to when none is given; None for the half
    precisions, judged by the video's PSNR (``default_criterion``)."""
    if precision in MIN_PSNR_DB:
        return None
    return {"tf32": TF32_ATOL}.get(precision, DEFAULT_ATOL)


def default_criterion(precision: str) -> dict:
    """What a parity run of ``precision`` must meet when the caller gives nothing: ``{"atol": ...}`` (fp32, tf32:
    every per-call and the final max abs error) or ``{"min_psnr": ...}`` (fp16, bf16: the final video's PSNR in
    dB against PyTorch fp32)."""
    if precision in MIN_PSNR_DB:
        return {"min_psnr": MIN_PSNR_DB[precision]}
    return {"atol": default_atol(precision)}


class ParityError(RuntimeError):
    """A parity run exceeded its tolerance; ``report`` holds every number."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def _noise(seed: int, shape: tuple, count: int):
    """x_T then ``count`` per-step arrays, the same sequence on every call (so each side gets its own copy)."""
    rng = np.random.default_rng(seed)
    for _ in range(count + 1):
        yield rng.standard_normal(shape, dtype=np.float32)


def run_parity(
    model_dir: str | Path,
    ckpt: str | Path,
    *,
    sampler: str = "ddpm",
    steps: int | None = None,
    batch_size: int = 1,
    cond_scale: float = 1.0,
    seed: int = 0,
    backend: str = "cpu",
    precision: str = "fp32",
    ema: bool = True,
    config=None,
    atol: float | None = None,
    min_psnr: float | None = None,
    raise_on_failure: bool = True,
    progress: bool = False,
    options: dict | None = None,
    known: int = 0,
    resample: int = 0,
    conditioning: str = "auto",
) -> dict:
    """Sample with PyTorch and with the runtime from the same noise and compare every denoiser call.

    Both sides step the same ``SamplerRun``: the runtime's is ``Pipeline.prepare`` driven through the compiled
    denoiser; the torch side drives a twin of it (``run.plan.machine`` from the same noise) around
    ``Unet3D.forward_with_cond_scale``, except for ``ddpm`` over every training step, where it is upstream's own
    loop (``GaussianDiffusion.p_sample_loop``; with known frames ``q_sample``/``p_sample`` step by step, RePaint's
    jump in torch).

    Args:
        model_dir: a model directory written by ``vdeploy export``.
        ckpt: the checkpoint it was exported from (architecture: the checkpoint's config, else ``config``,
            else the manifest's).
        sampler: a name in ``vdeploy.runtime.samplers.SAMPLERS``; ``ddpm`` (default) over every training
            step compares with upstream's own loop.
        steps: sampler steps (default: the sampler's ``default_steps``, all T for ddpm).
        batch_size: videos per run; a conditioned model gets random (seeded) embeddings (a token model also random
            tokens, each row with 1 to L real ones).
        cond_scale: classifier-free guidance scale (conditioned models).
        seed: seeds the noise, the embeddings and the known frames.
        backend, precision: what the runtime runs on (``Pipeline.from_dir``).
        atol: tolerance on every per-call error and on the final error.
        min_psnr: the least final-video PSNR (dB) that passes. With neither ``atol`` nor ``min_psnr`` the run is
            judged by ``default_criterion(precision)``: ``atol`` for fp32/tf32, the video's PSNR for fp16 (>= 35 dB)
            and bf16 (>= 30 dB): ``MIN_PSNR_DB``.
        raise_on_failure: raise :class:`ParityError` when a tolerance is exceeded (else ``passed: false``).
        progress: a progress bar for the torch run.
        options: the sampler's own options (``spacing``, ``eta``...), the same on both sides.
        known: frame-conditioned parity: the first ``known`` frames given (seeded uniform frames in [0, 1]),
            conditioned as ``conditioning`` says (``Pipeline.prepare``'s), ``resample`` RePaint rounds per step.

    Returns:
        ``{"per_call_max_abs_err": [...], "final_max_abs_err": ..., "psnr_db": ..., "passed": ..., "criterion":
        "atol" | "psnr" | "atol+psnr", "atol": ... or None, "min_psnr_db": ... or None, ...}``; with
        ``known``, also ``known_frames_max_abs_err`` and ``conditioning``.

    Raises:
        ExportError: unusable model directory, checkpoint or arguments.
        ParityError: a tolerance was exceeded (with ``raise_on_failure``).
    """
    import torch

    from vdeploy.runtime import Pipeline
    from vdeploy.runtime.manifest import ManifestError
    from vdeploy.runtime.samplers import sampler_spec
    from vdeploy.runtime.steps import drive

    from .exporter import load_unet

    if atol is None and min_psnr is None:
        criterion = default_criterion(precision)
        atol, min_psnr = criterion.get("atol"), criterion.get("min_psnr")
    try:
        spec = sampler_spec(sampler)
        pipe = Pipeline.from_dir(model_dir, backend=backend, precision=precision)
    except (ManifestError, ValueError) as e:
        raise ExportError(str(e)) from None
    unet, unet_config, _ = load_unet(ckpt, config=config, ema=ema, default_config=pipe.config)
    for key in ("channels", "num_frames", "image_size", "timesteps"):
        if unet_config[key] != pipe.config.get(key):
            raise ExportError(
                f"checkpoint and model directory disagree on {key}: {unet_config[key]} vs {pipe.config.get(key)}"
            )
    T = len(pipe.betas)
    n = steps if steps is not None else min(spec.default_steps or T, T)
    if not 1 <= n <= T:
        raise ExportError(f"steps must be between 1 and {T}, got {n}")
    shape = (batch_size, *pipe.shape)
    c, _, h, w = pipe.shape
    rng = np.random.default_rng(seed + 1)
    cond = _random_cond(rng, pipe, batch_size) if pipe.cond_dim else None
    layout = pipe.token_layout
    if cond is None and cond_scale != 1:
        raise ExportError("cond_scale needs a conditioned model; this one has no cond_dim")
    frames = rng.uniform(0, 1, (batch_size, c, known, h, w)).astype(np.float32) if known else None
    draws = spec.draws_noise
    frame_kw = dict(frames=frames, resample=resample, frames_noise=_stream(seed + 2, shape),
                    conditioning=conditioning) if known else {}

    # runtime: the Pipeline's run (its backends, its guidance path), every denoiser call recorded
    runtime_eps: list[np.ndarray] = []
    noise = _noise(seed, shape, n if draws else 0)
    log.info("parity: %s, %d steps, batch %d, runtime on %s", sampler, n, batch_size, pipe.backend_name)
    t0 = time.perf_counter()
    try:
        run = pipe.prepare(batch_size=batch_size, cond=cond, cond_scale=cond_scale, sampler=sampler, steps=n,
                           noise=next(noise), step_noise=noise if draws else None, **frame_kw, **(options or {}))
    except ValueError as e:
        raise ExportError(str(e)) from None
    denoise, _ = pipe.denoiser_for(run.cond_scale)
    runtime_video = run.finish(drive(run.machine, lambda x, t, cd, **inp: _record(runtime_eps,
                                                                                     denoise(x, t, cd, **inp))))
    runtime_seconds = time.perf_counter() - t0
    log.info("parity: runtime done in %.1f s; running PyTorch", runtime_seconds)

    # torch: upstream's loop for full DDPM, else a twin of the same run around the torch denoiser
    torch_eps: list[np.ndarray] = []
    noise = _noise(seed, shape, n if draws else 0)
    seed_loop = sampler == "ddpm" and n == T
    t0 = time.perf_counter()
    with torch.no_grad():
        if seed_loop and not known:
            torch_video = _torch_ddpm(unet, unet_config, shape, cond, cond_scale, noise, torch_eps, progress,
                                      layout=layout)
        elif seed_loop:
            torch_video = _torch_conditioned_ddpm(unet, unet_config, shape, cond, cond_scale, noise, run.plan.known_x0,
                                                  run.plan.mask, resample, _stream(seed + 2, shape), torch_eps,
                                                  trained=run.conditioning == "trained", layout=layout)
        else:
            torch_denoise = _torch_denoiser(unet, cond_scale, layout)
            bar = _bar(progress, n, f"torch {sampler}")
            x_T = next(noise)
            machine = run.plan.machine(x_T, pipe.betas, noise=noise if draws else None,
                                       known_noise=_stream(seed + 2, shape), callback=bar and (lambda _: bar.update(1)))
            x0 = drive(machine, lambda x, t, cd, **inp: _record(torch_eps, torch_denoise(x, t, cd, **inp)))
            if bar:
                bar.close()
            torch_video = run.finish(x0)
    torch_seconds = time.perf_counter() - t0

    per_call = [float(np.abs(a - b).max()) for a, b in zip(torch_eps, runtime_eps)]
    final = float(np.abs(torch_video - runtime_video).max())
    mse = float(np.mean((torch_video.astype(np.float64) - runtime_video.astype(np.float64)) ** 2))
    psnr = None if mse == 0 else 10 * math.log10(1.0 / mse)
    worst_call = max(per_call) if per_call else 0.0
    calls = n + resample * (n - 1) if known else n  # RePaint redoes every step but the last
    within_atol = atol is None or (worst_call <= atol and final <= atol)
    within_psnr = min_psnr is None or psnr is None or psnr >= min_psnr  # None: identical videos
    passed = len(torch_eps) == len(runtime_eps) == calls and within_atol and within_psnr
    criterion = "+".join(name for name, on in (("atol", atol is not None), ("psnr", min_psnr is not None)) if on)
    if seed_loop:
        reference = ("GaussianDiffusion.q_sample/p_sample (upstream's), RePaint jump in torch" if known
                     else "GaussianDiffusion.p_sample_loop")
    else:
        reference = f"vdeploy.runtime.samplers.{sampler} around Unet3D.forward_with_cond_scale"
    report = {
        "sampler": sampler,
        "steps": n,
        "calls": len(runtime_eps),
        "torch_calls": len(torch_eps),
        "batch_size": batch_size,
        "cond_scale": cond_scale,
        "seed": seed,
        "backend": pipe.backend_name,
        "precision": precision,
        "torch_reference": reference,
        "per_call_max_abs_err": per_call,
        "max_per_call_abs_err": worst_call,
        "final_max_abs_err": final,
        "psnr_db": psnr,
        "atol": atol,
        "min_psnr_db": min_psnr,
        "criterion": criterion,
        "passed": passed,
        "seconds": {"torch": round(torch_seconds, 2), "runtime": round(runtime_seconds, 2)},
        "model_dir": str(model_dir),
        "ckpt": str(ckpt),
    }
    if known:
        report.update(known=known, resample=resample, conditioning=run.conditioning,
                      known_frames_max_abs_err=float(np.abs(runtime_video[:, :, :known] - frames).max()))
    psnr_text = "inf" if psnr is None else f"{psnr:.1f}"
    bar = criterion_text(report)
    log.info("parity: worst per-call err %.2e, final err %.2e, PSNR %s dB (%s): %s",
             worst_call, final, psnr_text, bar, "ok" if passed else "FAILED")
    if not passed and raise_on_failure:
        why = [f"exceeded atol {atol:g}"] if not within_atol else []
        why += [f"video PSNR under {min_psnr:g} dB"] if not within_psnr else []
        raise ParityError(
            f"parity {' and '.join(why) or f'failed ({bar})'}: worst per-call max abs err {worst_call:.3g} "
            f"(call {int(np.argmax(per_call)) if per_call else '-'}), final max abs err {final:.3g}, "
            f"PSNR {psnr_text} dB over {len(per_call)} calls ({len(torch_eps)} torch, {len(runtime_eps)} runtime, "
            f"{calls} expected)",
            report,
        )
    return report


def criterion_text(report: dict) -> str:
    """What a parity report was judged by, in words: ``"atol 0.001"``, ``"video PSNR >= 35 dB"`` or both."""
    parts = []
    if report.get("atol") is not None:
        parts.append(f"atol {report['atol']:g}")
    if report.get("min_psnr_db") is not None:
        parts.append(f"video PSNR >= {report['min_psnr_db']:g} dB")
    return ", ".join(parts) or "no tolerance"


def run_conditioned_parity(model_dir: str | Path, ckpt: str | Path, *, known: int = 2, atol: float = DEFAULT_ATOL,
                           **kwargs) -> dict:
    """``run_parity(known=known, raise_on_failure=False, ...)``: frame-conditioned parity (the first ``known``
    frames given), returning the report whether or not it passed."""
    return run_parity(model_dir, ckpt, known=known, atol=atol, raise_on_failure=False, **kwargs)


def _random_cond(rng, pipe, batch_size: int) -> np.ndarray:
    """Seeded random conditioning rows: embeddings, for a token model packed with random tokens and masks of 1 to L
    real tokens (``vdeploy.runtime.cond_row``)."""
    pooled = rng.standard_normal((batch_size, pipe.cond_dim), dtype=np.float32)
    layout = pipe.token_layout
    if layout is None:
        return pooled
    n = layout.max_tokens
    tokens = rng.standard_normal((batch_size, n, layout.cond_dim), dtype=np.float32)
    mask = (np.arange(n)[None] < rng.integers(1, n + 1, size=(batch_size, 1))).astype(np.float32)
    return layout.pack(pooled, tokens * mask[..., None], mask)


def _torch_cond(cond, layout):
    """Conditioning rows -> ``(cond tensor, text kwargs)`` for the torch model: a token model's rows split into the
    pooled embedding and ``text_tokens``/``text_mask``."""
    import torch

    if cond is None:
        return None, {}
    if layout is None:
        return torch.from_numpy(np.ascontiguousarray(cond)), {}
    pooled, tokens, mask = layout.split(cond)
    return torch.from_numpy(pooled), {"text_tokens": torch.from_numpy(tokens), "text_mask": torch.from_numpy(mask)}


def _torch_denoiser(unet, cond_scale: float, layout=None):
    """``eps = denoise(x, t, cond[, frames=, mask=])`` on numpy arrays through the torch model (with guidance);
    ``layout``: a token model's conditioning rows (``Pipeline.token_layout``)."""
    import torch

    def denoise(x, t, cond, **inputs):
        c, text_kw = _torch_cond(cond, layout)
        frame_kw = {role: torch.from_numpy(np.ascontiguousarray(v)) for role, v in inputs.items()}  # frames, mask
        out = unet.forward_with_cond_scale(torch.from_numpy(x), torch.from_numpy(t), cond=c, cond_scale=cond_scale,
                                           **frame_kw, **text_kw)
        return out.float().numpy()

    return denoise


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step")


def _torch_ddpm(unet, config: dict, shape, cond, cond_scale, noise, record: list, progress: bool = False,
                layout=None) -> np.ndarray:
    """Upstream's ``p_sample_loop`` with explicit noise; every denoiser output recorded."""
    import torch

    from vdeploy import config as vconfig
    from vdeploy.diffusion import GaussianDiffusion

    diffusion = GaussianDiffusion(unet, **vconfig.diffusion_kwargs(config)).eval()
    original = unet.forward_with_cond_scale

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        record.append(out.float().numpy().copy())
        return out

    unet.forward_with_cond_scale = recording  # instance attribute: shadows the method for this run only
    cond_t, text_kw = _torch_cond(cond, layout)
    try:
        video = diffusion.p_sample_loop(
            shape, cond=cond_t, cond_scale=cond_scale, noise=(torch.from_numpy(z) for z in noise), progress=progress,
            **text_kw,
        )
    finally:
        del unet.forward_with_cond_scale
    return np.clip(video.float().numpy(), 0.0, 1.0)


def _stream(seed: int, shape: tuple):
    """An endless seeded stream of standard-normal arrays (the conditioning's draws; each side its own copy)."""
    rng = np.random.default_rng(seed)
    while True:
        yield rng.standard_normal(shape, dtype=np.float32)


def _record(calls: list, eps):
    calls.append(np.array(eps, dtype=np.float32))
    return eps


def _torch_conditioned_ddpm(unet, config: dict, shape, cond, cond_scale, noise, x0_known, mask, resample: int,
                            known_noise, record: list, trained: bool = False, layout=None) -> np.ndarray:
    """Upstream's ancestral loop with replacement and RePaint resampling, in torch, from explicit noise (the
    draw order of ``vdeploy.runtime.frame_conditioning``); ``trained``: the U-Net also gets the known frames and the
    mask on every call (a model trained with frame conditioning)."""
    import torch

    from vdeploy import config as vconfig
    from vdeploy.diffusion import GaussianDiffusion

    diffusion = GaussianDiffusion(unet, **vconfig.diffusion_kwargs(config)).eval()
    b, _, f = shape[:3]
    known_t, mask_t = torch.from_numpy(x0_known), torch.from_numpy(mask)
    frame_kw = {"frames": known_t, "mask": mask_t.reshape(b, f).float()} if trained else {}
    original = unet.forward_with_cond_scale
    unet.forward_with_cond_scale = lambda *a, **k: _record_torch(record, original(*a, **frame_kw, **k))
    cond_t, text_kw = _torch_cond(cond, layout)
    z = lambda: torch.from_numpy(next(known_noise))  # noqa: E731

    def replace(img, t):  # known frames <- q(x_t | x0_known), the runtime's draw order
        return diffusion.replace_known(img, known_t, mask_t, torch.full((b,), t, dtype=torch.long), z())

    try:
        img = torch.from_numpy(next(noise))
        for t in reversed(range(diffusion.num_timesteps)):
            tt = torch.full((b,), t, dtype=torch.long)
            img = replace(img, t)
            z_step = torch.from_numpy(next(noise))
            following = diffusion.p_sample(img, tt, cond=cond_t, cond_scale=cond_scale, noise=z_step, **text_kw)
            if t > 0:
                beta = diffusion.betas[t]
                for _ in range(resample):
                    following = replace(following, t - 1)
                    x = (1 - beta).sqrt() * following + beta.sqrt() * z()  # x_t ~ q(x_t | x_{t-1})
                    following = diffusion.p_sample(x, tt, cond=cond_t, cond_scale=cond_scale, noise=z(), **text_kw)
            img = following
        img = torch.where(mask_t, known_t, img)
    finally:
        del unet.forward_with_cond_scale
    return np.clip(((img + 1) * 0.5).float().numpy(), 0.0, 1.0)


def _record_torch(record: list, out):
    record.append(out.float().numpy().copy())
    return out
