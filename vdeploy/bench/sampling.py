"""Sampling: the seed's ``p_sample_loop`` against the runtime's ``ddpm`` over the same chain (the first
``k`` steps of each, extrapolated per step when fewer than all), the runtime's ``dpmpp`` end to end,
interleaved in rounds; and the share of runtime sampling time spent outside the denoiser."""

from __future__ import annotations

import time

import numpy as np

from .common import Inputs, Stop, load_average, log, progress


class TimedBackend:
    """A runtime backend whose ``run`` time is summed: the denoiser's share of a sampling run."""

    def __init__(self, inner):
        self.inner = inner
        self.inputs, self.outputs, self.name = inner.inputs, inner.outputs, inner.name
        self.seconds, self.calls = 0.0, 0

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def run(self, feeds):
        t0 = time.perf_counter()
        out = self.inner.run(feeds)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out

    def close(self) -> None:
        if hasattr(self.inner, "close"):
            self.inner.close()


def random_conditioning(seed: int, config: dict) -> dict[str, np.ndarray]:
    """The sampling comparison's conditioning, the same for torch and the runtime: a random ``cond`` (1, cond_dim)
    where the model has one, and for a token model random ``text_tokens`` with an all-kept ``text_mask``."""
    return {k: v for k, v in Inputs(config, seed).numpy(1).items() if k in ("cond", "text_tokens", "text_mask")}


def seed_sampler(seed: int, config: dict, unet, device: str):
    """``(run(k) -> seconds for the first k steps of the seed's p_sample_loop, description)``."""
    import torch

    from vdeploy import config as vconfig

    from .models import load_seed_module, seed_unet

    tdev = torch.device(device)
    shape = (1, config["channels"], config["num_frames"], config["image_size"], config["image_size"])
    conditioning = {k: torch.from_numpy(v).to(tdev) for k, v in random_conditioning(seed, config).items()}
    cond = conditioning.pop("cond", None)
    try:
        module = load_seed_module()
        model = seed_unet(module, unet, config, tdev)
        diffusion = module.GaussianDiffusion(model, **vconfig.diffusion_kwargs(config)).to(tdev)
        what, counted, kwargs = "video-diffusion-pytorch 0.6.3 GaussianDiffusion.p_sample_loop (the seed)", model, {}
    except Exception as e:  # noqa: BLE001
        from vdeploy.diffusion import GaussianDiffusion

        log.warning("the seed cannot run this model (%s); using vdeploy.diffusion's faithful copy", e)
        diffusion = GaussianDiffusion(unet, **vconfig.diffusion_kwargs(config)).to(tdev)
        what = f"vdeploy.diffusion.GaussianDiffusion.p_sample_loop (the seed cannot run this model: {e})"
        counted, kwargs = unet, {"progress": False, **conditioning}  # a token model's text_tokens/text_mask

    def run(k: int) -> float:
        calls = [0]
        original = counted.forward_with_cond_scale

        def counting(*a, **kw):
            if calls[0] >= k:
                raise Stop
            calls[0] += 1
            return original(*a, **kw)

        counted.forward_with_cond_scale = counting  # a torch model's instance attribute: one call per step
        try:
            t0 = time.perf_counter()
            try:
                diffusion.p_sample_loop(shape, cond=cond, **kwargs)
            except Stop:
                pass
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0
        finally:
            del counted.forward_with_cond_scale

    return run, what


def measure_sampling(args, config: dict, unet, row, per_call_s: float, device: str) -> dict:
    """Seed p_sample_loop vs runtime ddpm over the same chain (first k steps), and runtime dpmpp end to
    end, interleaved in rounds. The runtime side is a ``Pipeline`` over ``row``'s graph, opened with the
    runtime's ``open_graph`` and wrapped to time its calls."""
    from vdeploy.runtime import Pipeline
    from vdeploy.runtime.backends import open_graph

    T = int(config["timesteps"])
    dpmpp_steps = min(args.dpmpp_steps, T)
    k = args.loop_steps or (T if per_call_s * T <= 8.0 else max(10, min(T, int(round(8.0 / max(per_call_s, 1e-6))))))
    k = max(1, min(k, T))
    directory, manifest, graph, options = row.source
    timed = TimedBackend(open_graph(row.backend, directory, manifest, graph, options))
    pipe = Pipeline(directory, manifest, timed, graph=graph)
    seed_run, seed_what = seed_sampler(args.seed, config, unet, device)
    conditioning = random_conditioning(args.seed, config)
    cond = conditioning.get("cond")
    if "text_tokens" in conditioning:  # a token model's conditioning row packs pooled | tokens | mask
        cond = pipe.token_layout.pack(cond, conditioning["text_tokens"], conditioning["text_mask"])

    def runtime_run(sampler: str, steps: int | None, stop_after: int | None) -> tuple[float, float, int]:
        done = [0]

        def stop(info):
            done[0] += 1
            if stop_after is not None and done[0] >= stop_after:
                raise Stop

        timed.reset()
        t0 = time.perf_counter()
        try:
            pipe(batch_size=1, cond=cond, sampler=sampler, steps=steps, seed=args.seed, callback=stop)
        except Stop:
            pass
        return time.perf_counter() - t0, timed.seconds, timed.calls

    seed_run(1)  # warm-up: one step each
    pipe(batch_size=1, cond=cond, sampler="dpmpp", steps=1, seed=args.seed)
    rounds = {"seed": [], "ddpm": [], "dpmpp": []}
    try:
        for r in range(args.sampling_rounds):
            progress(f"sampling round {r + 1}/{args.sampling_rounds}: seed loop {k} steps, runtime ddpm {k} "
                     f"steps, dpmpp {dpmpp_steps} steps (load {load_average()})")
            rounds["seed"].append(seed_run(k))
            rounds["ddpm"].append(runtime_run("ddpm", None, k if k < T else None))
            rounds["dpmpp"].append(runtime_run("dpmpp", dpmpp_steps, None))
    finally:
        pipe.close()
    med = lambda xs: float(np.median(xs))  # noqa: E731
    seed_step = med([s / k for s in rounds["seed"]])
    ddpm_step = med([w / k for w, _, _ in rounds["ddpm"]])
    dpmpp_s = med([w for w, _, _ in rounds["dpmpp"]])
    overhead = lambda runs: med([100.0 * (w - d) / w for w, d, _ in runs])  # noqa: E731
    extrapolated = k < T
    return {
        "batch": 1,
        "timesteps": T,
        "measured_steps": k,
        "extrapolated": extrapolated,
        "note": (f"the {T}-step loops were timed over their first {k} steps (every step costs one "
                 f"denoiser call at any t) and extrapolated per step to {T}" if extrapolated
                 else f"all {T} steps measured"),
        "rounds": args.sampling_rounds,
        "runtime_backend": row.name,
        "seed_sampler": seed_what,
        "seed_ddpm": {"per_step_ms": round(seed_step * 1e3, 3), "total_s": round(seed_step * T, 2)},
        "runtime_ddpm": {"per_step_ms": round(ddpm_step * 1e3, 3), "total_s": round(ddpm_step * T, 2),
                         "loop_overhead_pct": round(overhead(rounds["ddpm"]), 3)},
        "runtime_dpmpp": {"steps": dpmpp_steps, "total_s": round(dpmpp_s, 3),
                          "per_step_ms": round(dpmpp_s / dpmpp_steps * 1e3, 3),
                          "loop_overhead_pct": round(overhead(rounds["dpmpp"]), 3)},
        "ddpm_speedup_equal_steps": round(seed_step / ddpm_step, 3),
        "dpmpp_speedup_vs_seed_1000": round(seed_step * T / dpmpp_s, 2),
        "raw_s": {"seed": [round(s, 4) for s in rounds["seed"]],
                  "runtime_ddpm": [[round(a, 4), round(b, 4), c] for a, b, c in rounds["ddpm"]],
                  "runtime_dpmpp": [[round(a, 4), round(b, 4), c] for a, b, c in rounds["dpmpp"]]},
    }
