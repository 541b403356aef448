"""One cold start in a fresh process, for ``vdeploy.bench.cold_start``::

    python -m vdeploy.bench.cold_child runtime MODEL_DIR BACKEND THREADS
    python -m vdeploy.bench.cold_child torch CKPT DEVICE THREADS

It prints one line ``BENCH {json}``: wall-clock stamps (``start`` before any import of numpy, onnxruntime
or torch; ``imported``; ``loaded``; ``first_call`` after one denoiser call), the peak RSS at load and at
the end, and (runtime side) whether torch got imported.
"""

from __future__ import annotations

import time

START = time.time()

import json  # noqa: E402 (after the clock starts)
import sys  # noqa: E402


def hwm_kb() -> int:
    """This process image's peak RSS (VmHWM). getrusage's ru_maxrss would also count the parent's
    memory that the fork copied before exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def runtime_side(model_dir: str, backend: str, threads: int) -> dict:
    import numpy as np

    from vdeploy.runtime import BackendOptions, Pipeline

    imported = time.time()
    pipe = Pipeline.from_dir(model_dir, backend=backend, options=BackendOptions(threads=threads))
    loaded, rss = time.time(), hwm_kb()
    x = np.zeros((1, *pipe.shape), dtype=np.float32)
    cond = None if pipe.cond_dim is None else pipe.null_cond
    pipe.denoiser()(x, np.zeros((1,), dtype=np.int64), cond)
    return {"imported": imported, "loaded": loaded, "first_call": time.time(), "rss_loaded_kb": rss,
            "torch_imported": "torch" in sys.modules}


def torch_side(ckpt: str, device: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    imported = time.time()
    from vdeploy.export import load_unet

    unet, config, _ = load_unet(ckpt)
    loaded, rss = time.time(), hwm_kb()
    dev = torch.device(device)
    unet = unet.to(dev)
    x = torch.zeros((1, config["channels"], config["num_frames"], config["image_size"], config["image_size"]),
                    device=dev)
    cond = None if not config.get("cond_dim") else torch.zeros((1, config["cond_dim"]), device=dev)
    with torch.inference_mode():
        unet(x, torch.zeros((1,), dtype=torch.long, device=dev), cond=cond)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return {"imported": imported, "loaded": loaded, "first_call": time.time(), "rss_loaded_kb": rss}


SIDES = {"runtime": runtime_side, "torch": torch_side}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 4 or argv[0] not in SIDES:
        print(__doc__, file=sys.stderr)
        return 2
    side, path, where, threads = argv
    stamps = SIDES[side](path, where, int(threads))
    print("BENCH " + json.dumps({"start": START, **stamps, "peak_kb": hwm_kb()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
