"""What token-level text conditioning (config ``text_cross_attention``) costs per denoiser call, and how much more
the tokens tell the directions apart than the pooled vector does.

Separation: the embedded MiniLM on "a red circle moving {left,right,up,down}": the cosine similarity of the pooled
vectors (what the U-Net gets without tokens) against that of the direction word's token state (what the
cross-attention reads), for every pair of directions.

The ``demo`` preset at MiniLM's width (cond_dim 384), random weights, with and without the cross-attentions: one
exported ``denoiser.onnx`` each (``optimize="none"``), timed in torch eager and in onnxruntime CPU at the same
thread count, all arms interleaved call by call so that a busy machine slows them alike; medians per call. With
``--threads 1`` (the default) both run every op on the calling thread, and the CPU time that thread spent
(``time.thread_time``) is reported beside the wall time: a machine shared with other jobs stretches the wall time
of a call, much less its CPU time.

    python benchmarks/text_tokens_cost.py [--batches 1,2] [--rounds 30] [--threads 1] [--tokens 7] [--json FILE]
        [--skip-cost]

``--tokens``: real tokens per caption (the rest of ``text_max_tokens`` is padding); "a red circle moving left" is
7 MiniLM tokens with [CLS] and [SEP]. Batch 2 is one guided step through the plain graph's cond+null rows.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vdeploy import config as vconfig
from vdeploy.export import export_unet
from vdeploy.model import Unet3D
from vdeploy.runtime.ort import OrtBackend

COND_DIM = 384  # the embedded MiniLM's width


def build(tokens: bool, out: Path):
    config = vconfig.resolve({**vconfig.PRESETS["demo"], "cond_dim": COND_DIM, "text_cross_attention": tokens})
    torch.manual_seed(0)
    unet = Unet3D(**vconfig.unet_kwargs(config)).eval()
    export_unet(unet, config, out, optimize="none")
    return unet, config


def feeds(config: dict, batch: int, real_tokens: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    c, f, s = config["channels"], config["num_frames"], config["image_size"]
    feed = {"x": rng.standard_normal((batch, c, f, s, s), dtype=np.float32),
            "t": np.full((batch,), config["timesteps"] // 2, np.int64),
            "cond": rng.standard_normal((batch, COND_DIM), dtype=np.float32)}
    if config["text_cross_attention"]:
        n = config["text_max_tokens"]
        feed["text_tokens"] = rng.standard_normal((batch, n, COND_DIM), dtype=np.float32)
        feed["text_mask"] = (np.arange(n)[None] < min(real_tokens, n)).repeat(batch, 0).astype(np.float32)
    return feed


def separation() -> dict:
    """Cosine similarities between the four directions: pooled vectors vs the direction word's token state."""
    from vdeploy.text import TextEncoder

    encoder = TextEncoder()
    directions = ["left", "right", "up", "down"]
    captions = [f"a red circle moving {d}" for d in directions]
    pooled, tokens, mask = encoder.encode(captions, 16)
    word = int(mask[0].sum()) - 2  # the direction word, before [SEP] (every caption has the same token count)
    cos = torch.nn.functional.cosine_similarity
    pairs = {f"{directions[i]}/{directions[j]}": (round(float(cos(pooled[i], pooled[j], dim=0)), 3),
                                                    round(float(cos(tokens[i, word], tokens[j, word], dim=0)), 3))
             for i, j in itertools.combinations(range(4), 2)}
    print("| directions | pooled vectors | direction token |\n| --- | --- | --- |")
    for name, (p, t) in pairs.items():
        print(f"| {name} | {p:.3f} | {t:.3f} |")
    means = [round(statistics.mean(v[k] for v in pairs.values()), 3) for k in (0, 1)]
    print(f"| mean | {means[0]:.3f} | {means[1]:.3f} |")
    return {"pairs": pairs, "mean": means}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,2")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=7)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--skip-cost", action="store_true", help="the separation table only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"separation": separation(), "args": vars(args) | {"json": str(args.json)}}
    if not args.skip_cost:
        result.update(cost(args))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def cost(args) -> dict:
    """Median ms per call of each arm, runner and batch size (printed as a table)."""
    batches = [int(b) for b in args.batches.split(",")]
    work = Path(tempfile.mkdtemp(prefix="text-tokens-cost-"))
    arms = {}
    for name, tokens in (("pooled only", False), ("pooled + tokens", True)):
        folder = work / ("tokens" if tokens else "pooled")
        unet, config = build(tokens, folder)
        arms[name] = (unet, config, OrtBackend(folder / "denoiser.onnx", "cpu", threads=args.threads))
    times: dict[tuple, list[float]] = {}
    with torch.no_grad():
        for _ in range(args.rounds + 3):  # 3 warm-up rounds, then timed
            for b in batches:
                for name, (unet, config, backend) in arms.items():
                    feed = feeds(config, b, args.tokens)
                    x, t, *_ = tensors = [torch.from_numpy(v) for v in feed.values()]
                    kwargs = dict(zip(list(feed)[2:], tensors[2:]))  # cond, text_tokens, text_mask
                    for runner in ("torch", "onnxruntime"):
                        start, cpu = time.perf_counter(), time.thread_time()
                        unet(x, t, **kwargs) if runner == "torch" else backend.run(feed)
                        took = (time.perf_counter() - start, time.thread_time() - cpu)
                        times.setdefault((name, runner, b), []).append(took)
    rows = []
    for (name, runner, b), ts in sorted(times.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
        wall, cpu = (statistics.median(t[k] for t in ts[3:]) * 1e3 for k in (0, 1))
        rows.append({"arm": name, "runner": runner, "batch": b, "median_ms": round(wall, 2),
                     "median_thread_cpu_ms": round(cpu, 2)})
    params = {name: sum(p.numel() for p in unet.parameters()) for name, (unet, _, _) in arms.items()}
    print(f"demo config, cond_dim {COND_DIM}, {args.threads} threads, {args.rounds} interleaved rounds, "
          f"{args.tokens} real tokens; params: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in params.items()))
    cpu = args.threads == 1  # the calling thread's CPU time is the call's only with one thread
    print("| batch | runner | pooled only (ms) | pooled + tokens (ms) | ratio |"
          + (" CPU ms, pooled only | CPU ms, pooled + tokens | CPU ratio |" if cpu else "")
          + "\n| --- | --- | --- | --- | --- |" + (" --- | --- | --- |" if cpu else ""))
    for b in batches:
        for runner in ("torch", "onnxruntime"):
            a, t = (next(r for r in rows if r["arm"] == arm and r["runner"] == runner and r["batch"] == b)
                    for arm in arms)
            line = f"| {b} | {runner} | {a['median_ms']:.2f} | {t['median_ms']:.2f} | {t['median_ms'] / a['median_ms']:.2f}x |"
            if cpu:
                ca, ct = a["median_thread_cpu_ms"], t["median_thread_cpu_ms"]
                line += f" {ca:.2f} | {ct:.2f} | {ct / ca:.2f}x |"
            print(line)
    return {"rows": rows, "params": params}


if __name__ == "__main__":
    main()
