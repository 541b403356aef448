"""What every section shares: the progress log, the load average, the machine, the fixed inputs."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("vdeploy.bench")

GUIDANCE_SCALE = 3.0  # the cond_scale of the guided per-call rows


class Stop(Exception):
    """Raised from a step hook to end a sampling loop after the measured steps."""


def progress(message: str) -> None:
    log.info("[%s] %s", time.strftime("%H:%M:%S"), message)


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def first_line(error: BaseException, limit: int = 300) -> str:
    """``"Type: first line of the message"``, for a row or section that failed."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:limit]


def machine_info(threads: int, device: str) -> dict:
    import onnxruntime
    import torch

    from vdeploy.runtime.platform import gpu_name, physical_cores

    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "memory_gib": mem_gib,
        "threads": threads,
        "device": device,
        "gpu": gpu_name() if device == "cuda" else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "ort_providers": onnxruntime.get_available_providers(),
        "load_average_start": load_average(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class Inputs:
    """Fixed random denoiser inputs per batch size, by role, as numpy arrays (and torch tensors on demand):
    ``x``, ``t``, ``cond`` where the config has ``cond_dim``, ``frames``/``mask`` of plain generation (no frame
    known) for a frame-conditioned model, and random ``text_tokens`` with an all-kept ``text_mask`` for a model
    with token-level text conditioning: every input its graph takes."""

    # roles beyond x, t, cond: what ``Denoiser`` and the runtime's graphs take by keyword
    EXTRA_ROLES = ("frames", "mask", "text_tokens", "text_mask")

    def __init__(self, config: dict, seed: int):
        self.config = config
        self.seed = seed
        self._np: dict[int, dict] = {}

    def numpy(self, batch: int) -> dict:
        if batch not in self._np:
            c = self.config
            rng = np.random.default_rng(self.seed + batch)
            feed = {
                "x": rng.standard_normal((batch, c["channels"], c["num_frames"], c["image_size"], c["image_size"]),
                                         dtype=np.float32),
                "t": rng.integers(0, c["timesteps"], size=(batch,), dtype=np.int64),
            }
            if c.get("cond_dim"):
                feed["cond"] = rng.standard_normal((batch, c["cond_dim"]), dtype=np.float32)
            if c.get("frame_conditioning"):
                feed["frames"] = np.zeros_like(feed["x"])
                feed["mask"] = np.zeros((batch, c["num_frames"]), np.float32)
            if c.get("text_cross_attention"):
                tokens = int(c.get("text_max_tokens", 16))
                feed["text_tokens"] = rng.standard_normal((batch, tokens, c["cond_dim"]), dtype=np.float32)
                feed["text_mask"] = np.ones((batch, tokens), np.float32)
            self._np[batch] = feed
        return self._np[batch]

    def extras(self, batch: int) -> dict:
        """The inputs beyond ``x``, ``t`` and ``cond`` (numpy), by role."""
        return {k: v for k, v in self.numpy(batch).items() if k in self.EXTRA_ROLES}

    def torch(self, batch: int, device):
        import torch

        return {k: torch.from_numpy(v).to(device) for k, v in self.numpy(batch).items()}
