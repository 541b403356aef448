#!/usr/bin/env python
"""PyTorch against the exported runtime, side by side on this machine (the implementation is the
installed package ``vdeploy.bench``; ``vdeploy bench`` and ``python -m vdeploy.bench`` run the same code).

    python benchmarks/latency.py --config small --json bench-out/latency.json --plot bench-out/latency.png
    python benchmarks/latency.py --config small --ckpt demo/model ...   # quality on a trained model
    python benchmarks/latency.py --help                                 # every option

What it measures, every figure a ratio of two things measured in the same run: per-call denoiser latency
of torch (the seed's model, vdeploy's, torch.compile) and of every runtime backend and precision that
runs here (with each one's max abs error against torch fp32); sampling (the seed's 1000-step loop, the
runtime's ddpm and dpmpp) and the share of sampling time outside the denoiser; cold start; FLOPs and the
matmul peak; quality of every sampler and spacing at fewer steps. Output: a markdown report on stdout,
``--json`` (keys ``machine``, ``config``, ``results``, ``ort_speedup_vs_torch``, ``loop_overhead_pct``,
``sampling``, ``cold_start``, ``flops``, ``quality``, ``targets``, ...) and ``--plot``.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from vdeploy.bench import main

    sys.exit(main(sys.argv[1:], prog="benchmarks/latency.py"))
