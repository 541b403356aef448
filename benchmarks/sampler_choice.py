#!/usr/bin/env python
"""Re-measure candidate default samplers over several prompts and seeds (the quality table uses one of each).

    python benchmarks/sampler_choice.py --model demo/model --seeds 1,2,3

PSNR (dB, video in [0, 1]) of each candidate against the deterministic DDIM solution over every training
timestep from the same noise, 4 prompts per seed, cond_scale 2; mean and worst over all videos.
"""

from __future__ import annotations

import argparse

import numpy as np

PROMPTS = ["a red circle moving left", "a blue square moving down", "a green triangle moving right",
           "a yellow circle moving up"]
CANDIDATES = "dpmpp:trailing:25,dpmpp:logsnr:10,dpmpp:logsnr:12,dpmpp:logsnr:13,dpmpp:logsnr:15," \
             "unipc:logsnr:12,unipc:logsnr:15,ddim:logsnr:10,ddim:logsnr:15,unipc:trailing:15"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="an exported text-conditioned model directory")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--cond-scale", type=float, default=2.0)
    p.add_argument("--candidates", default=CANDIDATES, help="sampler:spacing:steps,...")
    p.add_argument("--backend", default="cpu")
    args = p.parse_args(argv)
    from vdeploy.runtime import Pipeline

    pipe = Pipeline.from_dir(args.model, backend=args.backend)
    candidates = [(s, sp, int(n)) for s, sp, n in (c.split(":") for c in args.candidates.split(","))]
    psnr: dict = {c: [] for c in candidates}
    for seed in (int(s) for s in args.seeds.split(",")):
        noise = np.random.default_rng(seed).standard_normal((len(PROMPTS), *pipe.shape), dtype=np.float32)
        common = dict(text=PROMPTS, noise=noise, cond_scale=args.cond_scale)
        reference = pipe(**common, sampler="ddim", steps=len(pipe.betas), eta=0.0)
        for sampler, spacing, steps in candidates:
            out = pipe(**common, sampler=sampler, steps=steps, spacing=spacing)
            mse = ((out.astype(np.float64) - reference) ** 2).reshape(len(PROMPTS), -1).mean(axis=1)
            psnr[(sampler, spacing, steps)] += list(10 * np.log10(1 / np.maximum(mse, 1e-20)))
    print("| sampler | spacing | steps | mean PSNR dB | worst dB | videos |\n| --- | --- | --- | --- | --- | --- |")
    for (sampler, spacing, steps), values in psnr.items():
        print(f"| {sampler} | {spacing} | {steps} | {np.mean(values):.1f} | {np.min(values):.1f} | {len(values)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
