"""Quality at fewer steps: every sampler of the runtime's ``SAMPLERS`` table at every spacing of
``SPACINGS`` (samplers that take a ``spacing`` option; the others once) and every ``--quality-steps``,
against the full-chain deterministic solution (DDIM, eta 0, every training timestep) from the same
starting noise; PSNR of the output video in [0, 1], and per sampler and spacing the fewest steps that
reach ``THRESHOLD_DB``. Samplers and spacings added to those tables are picked up with no edit here."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .common import first_line, progress

QUALITY_PROMPT = "a red circle moving left"  # a caption of the synthetic demo data (vdeploy data synth)
QUALITY_COND_SCALE = 2.0  # the demo's guidance scale
THRESHOLD_DB = 30.0
REFERENCE = ("ddim", {"eta": 0.0})  # deterministic; over every timestep it is the probability-flow chain
ESTIMATE_MARGIN = 1.3  # the step loop and other processes on a shared machine: the 278 s estimate ran > 360 s


def runs() -> list[tuple[str, str | None]]:
    """``(sampler, spacing or None)`` for every entry of the tables, in table order."""
    from vdeploy.runtime.samplers import SAMPLERS
    from vdeploy.runtime.schedule import SPACINGS

    return [(name, spacing) for name, spec in SAMPLERS.items()
            for spacing in (SPACINGS if "spacing" in spec.options else (None,))]


def psnr(mse: float) -> float | None:
    """PSNR in dB of videos in [0, 1] (None: identical)."""
    return None if mse == 0 else round(10 * float(np.log10(1.0 / mse)), 2)


def fewest_steps(rows: list[dict], threshold: float = THRESHOLD_DB) -> list[dict]:
    """Per (sampler, spacing), the fewest steps whose PSNR reaches ``threshold`` (None: none did)."""
    out: dict[tuple, dict] = {}
    for row in rows:
        key = (row["sampler"], row["spacing"])
        entry = out.setdefault(key, {"sampler": row["sampler"], "spacing": row["spacing"], "steps": None})
        reached = row.get("error") is None and (row["psnr_db"] is None or row["psnr_db"] >= threshold)
        if reached and (entry["steps"] is None or row["steps"] < entry["steps"]):
            entry["steps"] = row["steps"]
    return list(out.values())


def measure_quality(args, model_dir: Path, what: str, config: dict, threads: int, backend: str) -> dict:
    from vdeploy.runtime import BackendOptions, Pipeline
    from vdeploy.runtime.samplers import SAMPLERS

    T = int(config["timesteps"])
    ref_steps = min(args.quality_ref_steps or T, T)
    steps = [s for s in args.quality_steps if s <= T]
    pipe = Pipeline.from_dir(model_dir, backend=backend, options=BackendOptions(threads=threads))
    noise = np.random.default_rng(args.seed + 7).standard_normal((1, *pipe.shape), dtype=np.float32)
    guidance: dict = {}
    if pipe.text_encoder is not None:  # a captioned model: a prompt with guidance, as the demo samples
        guidance = {"text": QUALITY_PROMPT, "cond_scale": QUALITY_COND_SCALE}
    elif pipe.cond_dim:
        guidance = {"cond": pipe.null_cond}  # unconditional, through the learned null embedding
    ref_name, ref_options = REFERENCE
    pipe(batch_size=1, noise=noise, **guidance, sampler=ref_name, steps=1, **ref_options)  # warm-up, untimed
    calls = []
    for _ in range(3):  # the estimate: the median of 3 warm one-step runs per call, plus a margin
        t0 = time.perf_counter()
        pipe(batch_size=1, noise=noise, **guidance, sampler=ref_name, steps=1, **ref_options)
        calls.append(time.perf_counter() - t0)
    call_s = float(np.median(calls))
    table = runs()
    estimate = ESTIMATE_MARGIN * call_s * (ref_steps + len(table) * sum(steps))
    result = {"model": what, "config": {k: config[k] for k in ("dim", "dim_mults", "image_size", "num_frames",
                                                               "timesteps")},
              "reference": f"{ref_name} eta=0, {ref_steps} steps" + ("" if ref_steps == T else f" (of {T}: reduced)"),
              "noise_seed": args.seed + 7, "space": "output video in [0, 1]", "estimated_s": round(estimate, 1),
              "threshold_db": THRESHOLD_DB, "steps": steps,
              "conditioning": ({k: v for k, v in guidance.items() if k != "cond"} or
                               ("null embedding" if guidance else "unconditional model"))}
    if estimate > args.quality_budget:
        pipe.close()
        result["skipped"] = (f"estimated {estimate:.0f} s > --quality-budget {args.quality_budget:.0f} s; "
                             "pass a smaller model via --ckpt, --quality-ref-steps, or a larger budget")
        return result
    progress(f"quality: reference {ref_name} {ref_steps} steps + {len(table)} sampler/spacing runs at {steps} "
             f"(~{estimate:.0f} s)")
    try:
        t0 = time.perf_counter()
        ref = pipe(batch_size=1, noise=noise, **guidance, sampler=ref_name, steps=ref_steps, **ref_options)
        result["reference_s"] = round(time.perf_counter() - t0, 2)
        rows = []
        for sampler, spacing in table:
            options = {} if spacing is None else {"spacing": spacing}
            for s in steps:
                row = {"sampler": sampler, "spacing": spacing, "steps": s,
                       "draws_noise": SAMPLERS[sampler].draws_noise}
                t0 = time.perf_counter()
                try:
                    out = pipe(batch_size=1, noise=noise, **guidance, sampler=sampler, steps=s, seed=args.seed,
                               **options)
                except ValueError as e:  # e.g. a spacing that repeats a timestep at this many steps
                    rows.append(row | {"error": first_line(e), "psnr_db": None})
                    continue
                diff = out.astype(np.float64) - ref
                mse = float(np.mean(diff**2))
                rows.append(row | {"seconds": round(time.perf_counter() - t0, 3),
                                   "max_abs_err": round(float(np.abs(diff).max()), 5),
                                   "rmse": round(mse**0.5, 5), "psnr_db": psnr(mse)})
    finally:
        pipe.close()
    result["rows"] = rows
    result["fewest_steps"] = fewest_steps(rows)
    dropped = [s for s in args.quality_steps if s > T]
    if dropped:
        result["note"] = f"steps {dropped} exceed the model's {T} timesteps and were left out"
    return result
