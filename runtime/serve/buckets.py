"""Fixed batch shapes for the batcher: bucket sizes, the cheapest cover of a step's rows, padding, and the
warm-up that measures each bucket and decides ``--batching auto``.

Why buckets: a batcher that sends whatever rows a step has (1, 3, 2, 5, ...) makes the backend meet a new
input shape on most calls. onnxruntime CPU plans its memory per shape and grows its arena to the largest
one; onnxruntime CUDA rebuilds every Conv node's cuDNN descriptors when the shape differs from the node's
previous call and searches algorithms the first time it meets a shape; a CUDA graph is captured for one
shape. With buckets the backend sees a few shapes only, each met first during warm-up; a step's rows are
padded up to bucket sizes (padding rows are copies of a real row, their outputs dropped).

Which buckets a step uses is decided by measured cost: warm-up times one call of each bucket, and
:func:`cover` picks the set of bucket calls of least total measured seconds that holds the rows (on a GPU,
where 8 rows cost about what 1 costs, 5 rows go as one call of 8; on a CPU, where the cost per row is flat,
as 4 + 1). ``auto`` turns batching on only where the cost per row falls with the batch (see
:func:`warm_up`). Numpy only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("vdeploy.runtime.serve")

BATCHING_MODES = ("auto", "on", "off")
# auto: batching on where a call of the second bucket costs at most this share of its rows run one by one
# (per row, against the smallest bucket). A flat per-row cost (onnxruntime on a CPU) measures about 1, give
# or take the noise of a shared machine (README "Serving"); a GPU that a small batch leaves idle about 0.5
AUTO_GAIN = 0.75
MEET_CALLS = 2  # untimed calls per bucket first (the first meets the shape: memory planning, arena growth)
WARM_ROUNDS = 5  # then timed calls per bucket, interleaved, the fastest kept...
WARM_BUDGET_S = 3.0  # ...while a phase's timed calls took less than this (at least one round)


def batching_mode(value) -> str:
    """``"auto"``, ``"on"`` or ``"off"`` (True/False: on/off)."""
    if value is True or value is False:
        return "on" if value else "off"
    if value not in BATCHING_MODES:
        raise ValueError(f"batching must be one of {', '.join(BATCHING_MODES)} (or a bool), got {value!r}")
    return value


def bucket_sizes(buckets: str | Iterable[int] | None, max_batch: int) -> tuple[int, ...]:
    """The bucket sizes, ascending: None gives 1, 2, 4, 8, ... up to ``max_batch`` (and ``max_batch`` itself);
    else the given sizes (ints, or text ``"1,2,4,8"``), each from 1 to ``max_batch``.

    Raises:
        ValueError: a size that is not an integer, or outside 1..max_batch.
    """
    if buckets is None:
        sizes, s = {max_batch}, 1
        while s < max_batch:
            sizes.add(s)
            s *= 2
        return tuple(sorted(sizes))
    if isinstance(buckets, str):
        parts = [p.strip() for p in buckets.split(",") if p.strip()]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"buckets must be integers separated by commas (like 1,2,4,8), got {buckets!r}") from None
    else:
        values = list(buckets)
    if not values:
        raise ValueError("buckets is empty: give at least one batch size (like 1,2,4,8)")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= max_batch:
            raise ValueError(f"bucket {v!r} is not a batch size from 1 to max batch {max_batch}")
    return tuple(sorted({int(v) for v in values}))


def cover(rows: int, seconds: dict[int, float]) -> list[int]:
    """The bucket calls, largest first, of least total ``seconds`` (per bucket) whose sizes add up to at
    least ``rows``; among equal costs the fewest calls."""
    sizes = sorted(seconds)
    best: list[tuple[float, int, tuple[int, ...]]] = [(0.0, 0, ())]  # best[n]: (seconds, calls, sizes) for n rows
    for n in range(1, rows + 1):
        best.append(min((seconds[s] + best[max(0, n - s)][0], best[max(0, n - s)][1] + 1,
                         (s, *best[max(0, n - s)][2])) for s in sizes))
    return sorted(best[rows][2], reverse=True)


def pad(array: np.ndarray, size: int) -> np.ndarray:
    """``array``'s rows, then copies of its last row up to ``size`` rows (valid inputs; their outputs are dropped)."""
    extra = size - array.shape[0]
    if extra <= 0:
        return array
    return np.concatenate([array, np.repeat(array[-1:], extra, axis=0)])


@dataclass
class Warmup:
    """What warm-up measured and decided.

    Attributes:
        batching: the decision (``auto``) or the mode asked for.
        seconds: one call's seconds per measured bucket (the fastest timed call).
        why: the decision in words (logged).
        wall: seconds the warm-up took.
    """

    batching: bool
    seconds: dict[int, float] = field(default_factory=dict)
    why: str = ""
    wall: float = 0.0

    def per_row(self) -> dict[int, float]:
        return {s: v / s for s, v in self.seconds.items()}


def _time_buckets(call: Callable[[int], None], sizes: Sequence[int], seconds: dict[int, float], clock) -> None:
    """Meet each size once (untimed), then time rounds of one call per size, interleaved, so that load from
    other processes that drifts during the warm-up hits every size alike; keeps the fastest call."""
    for s in sizes:
        for _ in range(MEET_CALLS):
            call(s)
    spent, rounds = 0.0, 0
    while rounds < WARM_ROUNDS and (rounds == 0 or spent < WARM_BUDGET_S):
        for s in (sizes if rounds % 2 == 0 else sizes[::-1]):
            start = clock()
            call(s)
            took = clock() - start
            spent += took
            seconds[s] = min(seconds.get(s, took), took)
        rounds += 1


def warm_up(call: Callable[[int], None], sizes: Sequence[int], mode: str, *,
            clock: Callable[[], float] = time.perf_counter) -> Warmup:
    """Warm and time the bucket shapes; decide batching.

    Args:
        call: ``call(rows)`` runs one denoiser call of ``rows`` rows.
        sizes: the bucket sizes, ascending.
        mode: ``"on"``: every bucket is warmed and timed (the times choose each step's buckets); ``"off"``:
            one call of the smallest bucket; ``"auto"``: the two smallest are timed first, and batching is
            on when the second's cost per row is at most ``AUTO_GAIN`` of the first's; only then are the
            larger buckets run (a backend whose cost per row is flat never runs the largest shape, so an
            onnxruntime CPU arena is not grown to hold it).
        clock: seconds (tests give a fake one).
    """
    start = clock()
    seconds: dict[int, float] = {}
    if mode == "off":  # the solo runs' shape
        call(1)
        result = Warmup(False, why="batching off")
    elif mode == "auto" and len(sizes) < 2:
        call(1)
        result = Warmup(False, why=f"auto: one bucket ({sizes[0]} rows), nothing to compare: batching off")
    else:
        first = list(sizes[:2]) if mode == "auto" else list(sizes)
        _time_buckets(call, first, seconds, clock)
        on = True
        why = "batching on"
        if mode == "auto":
            a, b = first
            ratio = (seconds[b] / b) / (seconds[a] / a)
            on = ratio <= AUTO_GAIN
            why = (f"auto: a call of {b} rows costs {ratio:.2f}x per row of {a} "
                   f"({'at most' if on else 'more than'} {AUTO_GAIN}): batching {'on' if on else 'off'}")
            if on and len(sizes) > 2:
                _time_buckets(call, list(sizes[2:]), seconds, clock)
        result = Warmup(on, seconds, why)
    result.wall = clock() - start
    per_row = ", ".join(f"{s} rows {v * 1e3:.1f} ms/row" for s, v in sorted(result.per_row().items()))
    log.info("warm-up in %.1f s%s; %s", result.wall, f" ({per_row})" if per_row else "", result.why)
    return result
