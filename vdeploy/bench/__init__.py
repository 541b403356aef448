"""vdeploy.bench: PyTorch against the exported runtime, side by side on this machine.

    vdeploy bench --config small --json bench-out/latency.json --plot bench-out/latency.png
    python -m vdeploy.bench ...            # the same
    python benchmarks/latency.py ...       # the documented entry point of a checkout, the same code

Every figure is a ratio of two things measured in the same run. One module per section:

- ``rows``: what is timed: the torch models (the seed's 0.6.3 ``Unet3D``, vdeploy's, ``torch.compile``)
  and every backend of ``vdeploy.runtime.backends.BACKENDS`` that can run here, at every precision its
  table entry lists, plus the CPU flavours (onnxslim'd and onnxruntime-offline graphs, spinning
  threads, the fused CFG graph against guidance as two calls);
- ``latency``: per-call denoiser latency, round-robin over the rows, and each row's max abs error
  against torch fp32;
- ``sampling``: the seed's ``p_sample_loop`` against the runtime's ``ddpm`` over the same chain, the
  runtime's ``dpmpp`` end to end, and the share of sampling time outside the denoiser;
- ``cold_start`` (children: ``python -m vdeploy.bench.cold_child``): a fresh process loading the model
  directory against one importing torch and loading the checkpoint;
- ``flops``: FLOPs per call, this machine's measured matmul peak, onnxruntime's op profile;
- ``quality``: every sampler of ``SAMPLERS`` at every spacing of ``SPACINGS`` against the full-chain
  deterministic solution (PSNR), and the fewest steps reaching 30 dB;
- ``report``: the markdown report, the JSON (keys ``machine``, ``config``, ``results``,
  ``ort_speedup_vs_torch``, ``loop_overhead_pct``, ``sampling``, ``cold_start``, ``flops``, ``quality``,
  ``targets``, ...) and the plot; ``models``: configs, torch models, the exported model directories.

Measured numbers live in the report and the README, never here. This package imports nothing heavy
until :func:`main` runs (the cold-start child imports it before it starts its clock).
"""

from __future__ import annotations


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the benchmark; ``argv`` as on the command line. Returns the exit code (2: bad input)."""
    from .cli import main as cli_main

    return cli_main(argv, prog)


__all__ = ["main"]
