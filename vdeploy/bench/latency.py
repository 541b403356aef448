"""Per-call denoiser latency: every row warmed up, then timed in rounds in which each row runs once
(order rotated), so machine noise hits all; and each row's max abs error against torch fp32."""

from __future__ import annotations

import time

import numpy as np

from .common import first_line, load_average, progress
from .rows import Row


def _numpy(out) -> np.ndarray:
    if isinstance(out, (list, tuple)):
        out = out[0]
    if hasattr(out, "detach"):  # a torch tensor
        out = out.detach().float().cpu().numpy()
    return np.asarray(out, dtype=np.float64)


MIN_ROUNDS = 5  # a per-call budget never cuts a batch size below this many timed rounds


def measure_per_call(rows: list[Row], batches: list[int], warmup: int, repeats: int,
                     budget_s: float | None = None) -> dict[int, int]:
    """Fill ``first_call_s``, ``times_ms`` (median, min, p90, n per batch) and, at the first batch size,
    ``output`` of every live row; a row whose call raises is marked failed.

    ``budget_s``: seconds of timed rounds for all batch sizes together (an equal share each). A round's cost
    is estimated from the warm-up calls (each row's fastest call after its first; its first call where there
    is no other); a batch size gets ``repeats`` rounds, or as many as its share holds (at least ``MIN_ROUNDS``).
    Returns the rounds each batch size got."""
    rounds_by_batch: dict[int, int] = {}
    for i, batch in enumerate(batches):
        live = []
        est: dict[str, float] = {}
        for row in rows:
            if row.status != "ok" or (row.max_batches is not None and i >= row.max_batches):
                continue
            try:
                fn = row.make(batch)
                _reset_gpu_peak(row)
                t0 = time.perf_counter()
                out = fn()
                row.first_call_s[str(batch)] = round(time.perf_counter() - t0, 4)
                est[row.name] = time.perf_counter() - t0
                if batch == batches[0]:
                    row.output = _numpy(out)
                warm = []
                for _ in range(max(warmup - 1, 0)):
                    t0 = time.perf_counter()
                    fn()
                    warm.append(time.perf_counter() - t0)
                if warm:
                    est[row.name] = min(warm)
                _record_gpu_memory(row, batch)
            except Exception as e:  # noqa: BLE001 (e.g. torch.compile without a working compiler)
                row.status, row.error = "failed", first_line(e)
                progress(f"{row.name} failed at batch {batch}: {row.error}")
                continue
            row.calls[batch] = fn
            live.append(row)
        per_round = sum(est[row.name] for row in live)
        rounds = repeats
        if budget_s is not None and per_round > 0:
            rounds = max(min(MIN_ROUNDS, repeats), min(repeats, int(budget_s / len(batches) / per_round)))
        rounds_by_batch[batch] = rounds
        cut = f", {repeats} asked: over the budget's {budget_s / len(batches):.0f} s share" if rounds < repeats else ""
        progress(f"batch {batch}: timing {len(live)} rows x {rounds} rounds (about {rounds * per_round:.0f} s"
                 f"{cut}; load {load_average()})")
        times: dict[str, list[float]] = {row.name: [] for row in live}
        for r in range(rounds):
            order = live[r % len(live):] + live[: r % len(live)] if live else []
            for row in order:
                fn = row.calls[batch]
                t0 = time.perf_counter()
                fn()
                times[row.name].append((time.perf_counter() - t0) * 1e3)
        for row in live:
            v = np.asarray(times[row.name])
            row.times_ms[str(batch)] = {
                "median": round(float(np.median(v)), 3),
                "min": round(float(v.min()), 3),
                "p90": round(float(np.percentile(v, 90)), 3),
                "n": int(v.size),
            }
            row.calls.pop(batch, None)  # free the compiled/batched state of this size
    return rounds_by_batch


def _reset_gpu_peak(row: Row) -> None:
    if row.device == "cuda" and row.family == "torch":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _record_gpu_memory(row: Row, batch: int) -> None:
    """On CUDA, after a row's warm-up: torch rows, torch's peak allocated memory during it
    (``extra["gpu_peak_mib"]``); every row, the device's memory in use by all processes then
    (``extra["gpu_used_mib"]``, includes every row opened before it and torch's cache)."""
    if row.device != "cuda":
        return
    import torch

    if row.family == "torch":
        row.extra.setdefault("gpu_peak_mib", {})[str(batch)] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    free, total = torch.cuda.mem_get_info()
    row.extra.setdefault("gpu_used_mib", {})[str(batch)] = round((total - free) / 2**20, 1)


def record_errors(rows: list[Row], refs: dict, batch: int) -> dict:
    """Each row's max abs error against torch fp32 (``extra["max_abs_err_vs_torch"]``, at ``batch``), and
    the derived and reduced-precision CPU graphs against the plain one (``{row: error}``)."""
    plain = next((r for r in rows if r.backend == "cpu" and r.flavour is None and r.precision == "fp32"
                  and r.output is not None), None)
    vs_plain = {}
    for row in rows:
        if row.output is None:
            continue
        ref = refs.get("guided" if row.guided else "eps")
        if ref is not None and ref.shape == row.output.shape:
            row.extra["max_abs_err_vs_torch"] = float(f"{np.abs(row.output - ref).max():.3g}")
            row.extra["error_batch"] = batch
        if (plain is not None and row is not plain and row.backend == "cpu" and not row.guided
                and row.flavour in (None, "slim", "offline")):
            vs_plain[row.name] = round(float(np.abs(row.output - plain.output).max()), 8)
    for row in rows:
        row.output = None
    return vs_plain
