#!/usr/bin/env python
"""Where a runtime call spends its GPU time: every CUDA kernel of a few denoiser calls, by kind (benchmarks/gpu.sh).

    python benchmarks/gpu_kernels.py MODEL_DIR [MODEL_DIR ...] --json OUT/kernels.json [--precisions fp16,tf32] \
        [--batch 4] [--layouts nchw,nhwc]

onnxruntime's own profiler times the CPU side of each node (kernels launch asynchronously), so this one records
the GPU side: torch's profiler (CUPTI, process-wide) traces every kernel the onnxruntime CUDA backend launches,
with CUDA graphs off so each call launches its kernels. Reported per precision and layout (``nhwc``:
``BackendOptions.nhwc``, channels-last convolutions): GPU ms per call, kernels per call,
and the time and count per kind (``KINDS``: convolution and matmul, normalization and reductions, elementwise,
casts, layout copies), the costliest kernels by name, and every kernel's ms and count per call (``all``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


# a kernel's kind, by the first pattern its (lower-case) name matches; the last is the catch-all
KINDS = {
    "reduce/norm": r"reduce|norm|softmax|variance",  # cuDNN's reduce_tensor (ReduceMean) included
    "cast": r"op_cast|cast<|castkernel",
    "layout": r"transpose|nchwtonhwc|nhwctonchw|copy|concat|slice|gather|_pad|expand|tile(?!size)|flip_filter",
    "conv/matmul": r"conv|gemm|xmma|cutlass|sm90_|sm80_|nvjet|wgmma|implicit|winograd|fft|dgrad|wgrad",
    "elementwise": r"elementwise|op_generic_tensor|binary|unary|sigmoid|silu|gelu|mul|add|sub|div|sqrt|erf|sin|"
                   r"cos|where|pow",
    "other": r".",
}


def kind_of(name: str) -> str:
    low = name.lower()
    return next(kind for kind, pattern in KINDS.items() if re.search(pattern, low))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dirs", type=Path, nargs="+", help="model directories (each run is named DIR:precision-layout "
                   "where more than one is given)")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--precisions", default="fp16,tf32")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--calls", type=int, default=5, help="profiled calls per precision, after 3 warm-up calls [5]")
    p.add_argument("--layouts", default="nchw", help="nchw and/or nhwc (BackendOptions.nhwc) [nchw]")
    p.add_argument("--top", type=int, default=15, help="costliest kernels listed by name [15]")
    args = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from vdeploy.bench.common import Inputs
    from vdeploy.runtime import manifest as vmanifest
    from vdeploy.runtime.backends import BackendOptions, graph_for, open_graph

    report: dict = {"models": [str(d) for d in args.model_dirs], "batch": args.batch, "kinds": KINDS, "runs": {}}
    runs = [(d, p, layout) for d in args.model_dirs for layout in args.layouts.split(",")
            for p in args.precisions.split(",") if p and layout]
    for model_dir, precision, layout in runs:
        label = (f"{model_dir.name}:" if len(args.model_dirs) > 1 else "") + f"{precision}-{layout}"
        entry: dict = {}
        try:
            m = vmanifest.load(model_dir)
            options = BackendOptions(precision=precision, cuda_graph=False, nhwc=layout == "nhwc")
            name = graph_for("cuda", m, options)
            if name is None:
                raise ValueError(f"the model dir has no {precision} graph")
            backend = open_graph("cuda", model_dir, m, name, options)
            feed = Inputs(dict(m.config), 0).numpy(args.batch)  # every input the graph takes, by role
            feeds = {spec.name: feed[spec.role] for spec in m.graphs[name].inputs}
            try:
                for _ in range(3):
                    backend.run(feeds)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(args.calls):
                        backend.run(feeds)
                    torch.cuda.synchronize()
            finally:  # the next run opens its own session: this one's device memory goes first
                backend.close()
            by_name: dict[str, list] = {}
            for ev in prof.events():
                if ev.device_type.name != "CUDA":
                    continue
                t = by_name.setdefault(ev.name, [0.0, 0])
                t[0] += ev.device_time / 1e3  # us -> ms
                t[1] += 1
            total = sum(v[0] for v in by_name.values())
            kinds: dict[str, list] = {}
            for kname, (ms, count) in by_name.items():
                k = kinds.setdefault(kind_of(kname), [0.0, 0])
                k[0] += ms
                k[1] += count
            n = args.calls
            entry = {
                "gpu_ms_per_call": round(total / n, 3),
                "kernels_per_call": round(sum(v[1] for v in by_name.values()) / n, 1),
                "by_kind": {k: {"ms_per_call": round(v[0] / n, 3), "share_pct": round(100 * v[0] / total, 1),
                                "kernels_per_call": round(v[1] / n, 1)}
                            for k, v in sorted(kinds.items(), key=lambda kv: -kv[1][0])},
                "top": [{"kernel": kname[:160], "kind": kind_of(kname), "ms_per_call": round(v[0] / n, 4),
                         "per_call": round(v[1] / n, 1)}
                        for kname, v in sorted(by_name.items(), key=lambda kv: -kv[1][0])[: args.top]],
                "all": {kname[:200]: [round(v[0] / n, 4), round(v[1] / n, 1)] for kname, v in by_name.items()},
            }
        except Exception as e:  # noqa: BLE001 - recorded, the next precision runs
            entry = {"error": f"{type(e).__name__}: {e}"[:400]}
        report["runs"][label] = entry
        print(json.dumps({label: {k: v for k, v in entry.items() if k not in ("top", "all")}}), flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
