"""FLOPs per denoiser call, this machine's measured float32 matmul peak, and onnxruntime's op profile."""

from __future__ import annotations

import contextlib
import time

from .common import Inputs


def count_flops(unet, config: dict, inputs: Inputs, batches: list[int]) -> dict:
    """Matmul/conv FLOPs of one denoiser call (``torch.utils.flop_counter``; elementwise ops not counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vdeploy.export.wrapper import Denoiser

    den = Denoiser(unet, config["num_frames"]).cpu().eval()
    out = {}
    for batch in batches:
        feed = inputs.torch(batch, "cpu")
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), counter:
            den(feed["x"], feed["t"], feed.get("cond"), **{k: v for k, v in feed.items() if k in Inputs.EXTRA_ROLES})
        out[str(batch)] = int(counter.get_total_flops())
    by_op = {}
    with contextlib.suppress(Exception):
        by_op = {str(k): int(v) for k, v in counter.get_flop_counts()["Global"].items()}
    return {"per_call": out, "method": "torch.utils.flop_counter.FlopCounterMode (conv, matmul, bmm, addmm; "
            "2 FLOPs per MAC; norms, softmax and elementwise ops not counted)", "by_op_last_batch": by_op}


def _best_of(fn, repeats: int, sync=None) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        best = min(best, time.perf_counter() - t0)
    return best


def _ort_matmul(n: int, threads: int):
    """A one-node onnxruntime MatMul session (MLAS, the kernels the exported graphs run on)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from vdeploy.runtime.platform import ort_session_options

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])], "matmul",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in ("A", "B")],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(model.SerializeToString(), ort_session_options(ort, threads),
                                providers=["CPUExecutionProvider"])


def matmul_peak(device: str, threads: int, sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5) -> dict:
    """This machine's measured float32 matmul throughput (GFLOP/s): the best square product of torch,
    numpy and onnxruntime at each size (on CUDA: torch, TF32 off). ``peak_gflops`` is the highest."""
    import torch

    result: dict = {"threads": threads, "sizes": list(sizes), "gflops": {}}
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        n = 8192
        a, b = torch.randn(n, n, device="cuda"), torch.randn(n, n, device="cuda")
        _best_of(lambda: a @ b, 3, torch.cuda.synchronize)
        seconds = _best_of(lambda: a @ b, 10, torch.cuda.synchronize)
        result["gflops"][f"torch_cuda_{n}"] = round(2 * n**3 / seconds / 1e9, 1)
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        an, bn = a.numpy(), b.numpy()
        candidates = {"torch": lambda: a @ b, "numpy": lambda: an @ bn}
        with contextlib.suppress(Exception):
            session = _ort_matmul(n, threads)
            feed = {"A": an, "B": bn}
            candidates["onnxruntime"] = lambda: session.run(None, feed)
        for lib, fn in candidates.items():
            fn()  # warm-up
            result["gflops"][f"{lib}_cpu_{n}"] = round(2 * n**3 / _best_of(fn, repeats) / 1e9, 1)
    on = [v for k, v in result["gflops"].items() if ("cuda" in k) == (device == "cuda")]
    result["peak_gflops"] = max(on)
    result["peak_source"] = max((v, k) for k, v in result["gflops"].items() if v in on)[1]
    return result


def ort_profile(row, inputs: Inputs, threads: int, runs: int) -> dict:
    """onnxruntime's per-op profile of the graph ``row`` runs (a CPU onnxruntime row), batch 1."""
    from vdeploy.export.profile import profile_graph

    directory, manifest, graph_name, _ = row.source
    graph = manifest.graphs[graph_name]
    feed = inputs.numpy(1)
    feeds = {spec.name: feed[spec.role] for spec in graph.inputs if spec.role in feed}
    prof = profile_graph(directory / graph.file, feeds, threads=threads, runs=runs)
    return {"graph": graph.file, "row": row.name, **{k: prof[k] for k in ("run_ms", "kernel_ms", "by_op", "by_part")},
            "top_nodes": prof["top_nodes"][:10]}
