"""The cross-request batcher: results equal solo ``Pipeline.__call__`` runs; cancel, timeout, queue, close.

Models: the runtime fixtures' tiny conditioned model (text encoder, no fused graph: guidance as two rows a
request) and the same with a fused ``--cfg`` graph, and the unconditioned one. Batched results are checked
with ``serve_fixtures.assert_close`` (float32 round-off; its docstring has the measured tolerance);
unbatched mode runs a solo call's exact denoiser calls and must be bit-equal.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from runtime_fixtures import COND_DIM, model_dir
from serve_fixtures import assert_close, fused_model_dir, wait_for  # noqa: F401 (fixture)
from vdeploy.runtime import Pipeline
from vdeploy.runtime.samplers import drive
from vdeploy.runtime.serve import Batcher, Closed, QueueFull, RequestTimeout


@pytest.fixture(scope="module")
def pipes(fused_model_dir):
    out = {
        "two-calls": Pipeline.from_dir(model_dir("cond"), backend="cpu", threads=1),
        "fused": Pipeline.from_dir(fused_model_dir, backend="cpu", threads=1),
        "uncond": Pipeline.from_dir(model_dir("uncond"), backend="cpu", threads=1),
    }
    assert out["fused"].cfg_backend is not None and out["two-calls"].cfg_backend is None
    return out


COND_JOBS = [  # (joins after the first job's step k, request)
    (0, dict(seed=0, sampler="dpmpp", steps=8, text="a red ball", cond_scale=3.0)),
    (0, dict(seed=1, sampler="ddpm", steps=6, text=["a red ball", "blue cube"])),
    (2, dict(seed=2, sampler="ddim", steps=5, eta=0.5, text="blue cube moving left", cond_scale=2.0)),
    (2, dict(seed=3, sampler="unipc", steps=4, cond_scale=3.0, text="a ball")),
    (4, dict(seed=4, sampler="dpmpp3m", steps=5, spacing="leading")),  # null cond: unconditional sample
    (4, dict(seed=5, sampler="ddim", steps=3, text="red cube", cond_scale=2.0)),
]
UNCOND_JOBS = [
    (0, dict(seed=0, sampler="dpmpp", steps=7)),
    (1, dict(seed=1, sampler="ddpm", steps=5, batch_size=2)),
    (3, dict(seed=2, sampler="ddim", steps=4, eta=1.0, spacing="linspace")),
]


def run_staggered(pipe, jobs, traces=None, **batcher_kwargs):
    """Submit ``jobs`` (each after the first job's step ``after``); returns the videos and the real rows of
    every denoiser call (``traces``: a list to collect the calls' ``CallTrace``). Batching on and no warm-up
    unless given: with every bucket taken to cost its rows, a step's rows go in the fewest calls, so requests
    share calls whatever a busy machine would make a warm-up measure."""
    calls = []

    def on_call(trace):
        calls.append(trace.rows)
        if traces is not None:
            traces.append(trace)

    batcher = Batcher(pipe, on_call=on_call, **{"batching": "on", "warm": False, **batcher_kwargs})
    try:
        submitted = []
        for after, kwargs in jobs:
            if submitted:
                first = submitted[0]
                wait_for(lambda: first.step >= after or first.done(), what=f"step {after}")
            submitted.append(batcher.submit(**kwargs))
        return [job.result(timeout=60) for job in submitted], calls
    finally:
        batcher.close()


@pytest.mark.parametrize("kind", ["fused", "two-calls", "uncond"])
def test_batched_requests_equal_solo_runs(pipes, kind):
    pipe = pipes[kind]
    jobs = UNCOND_JOBS if kind == "uncond" else COND_JOBS
    # a bucket for every size: each step is one call of the active rows, the batch compositions that
    # serve_fixtures' tolerance was measured on (padding to fewer buckets: test_serve_buckets)
    results, calls = run_staggered(pipe, jobs, max_batch=16, buckets=tuple(range(1, 17)))
    for (_, kwargs), video in zip(jobs, results):
        assert_close(video, pipe(**kwargs), str(kwargs))
    assert max(calls) > 2, f"no call batched several requests: rows per call {calls}"


def test_unbatched_mode_is_bit_equal_to_solo_runs(pipes):
    pipe = pipes["two-calls"]
    results, calls = run_staggered(pipe, COND_JOBS[:4], batching=False)
    for (_, kwargs), video in zip(COND_JOBS, results):
        assert np.array_equal(video, pipe(**kwargs))


@pytest.mark.parametrize("kind", ["fused", "two-calls"])
def test_prepare_then_drive_is_call_bit_for_bit(pipes, kind):
    pipe = pipes[kind]
    for kwargs in (dict(seed=3, steps=4, text="a red ball", cond_scale=2.0), dict(seed=1, sampler="ddpm", steps=5),
                   dict(seed=2, sampler="ddim", steps=3, eta=0.3, cond=np.ones(COND_DIM, np.float32))):
        run = pipe.prepare(**kwargs)
        assert run.guidance == (kind if kwargs.get("cond_scale", 1) != 1 else "none")
        video = run.finish(drive(run.machine, pipe.timed_denoiser(run.cond_scale)[0]))
        assert np.array_equal(video, pipe(**kwargs))


def test_max_batch_bounds_every_call_and_a_big_request_runs_alone(pipes):
    pipe = pipes["two-calls"]
    jobs = [(0, dict(seed=i, steps=3, text="a ball", cond_scale=2.0)) for i in range(4)]  # 2 rows each
    jobs.append((0, dict(seed=9, steps=2, text=["a", "b", "c"], cond_scale=2.0)))  # 6 rows > max_batch
    traces = []
    results, calls = run_staggered(pipe, jobs, traces, max_batch=4, warm=False)  # flat costs: 4 rows one call
    # every call one of the buckets 1, 2, 4; at most 4 requests' rows active, so pairs of 2-row requests share
    # calls; the 6-row request runs alone, over two calls (4 + 2) a step
    assert {t.batch for t in traces} <= {1, 2, 4} and 4 in calls, [(t.rows, t.padded) for t in traces]
    assert calls[-2:] == [4, 2], calls
    for (_, kwargs), video in zip(jobs, results):
        assert_close(video, pipe(**kwargs), str(kwargs))


def test_cancel_frees_the_slot_at_the_next_boundary(pipes):
    pipe = pipes["uncond"]
    gate = threading.Event()
    batcher = Batcher(pipe, max_batch=1, on_step=lambda s, n: gate.wait(10))
    try:
        long = batcher.submit(seed=0, sampler="ddpm", steps=40)
        short = batcher.submit(seed=1, steps=3)
        wait_for(lambda: long.status == "running", what="the long request to start")
        assert short.status == "queued" and batcher.queue_depth == 1  # max_batch 1: it waits
        assert long.cancel() and long.cancelled()
        gate.set()
        video = short.result(timeout=30)
        assert long.step < long.steps, "the cancelled request ran to its end"
        assert_close(video, pipe(seed=1, steps=3))
        assert batcher.active == 0 and batcher.queue_depth == 0
    finally:
        gate.set()
        batcher.close()


def test_timeout_queue_full_and_close(pipes):
    pipe = pipes["uncond"]
    gate = threading.Event()
    batcher = Batcher(pipe, max_batch=1, max_queue=1, on_step=lambda s, n: gate.wait(10))
    try:
        slow = batcher.submit(seed=0, sampler="ddpm", steps=30, timeout=0.05)
        wait_for(lambda: slow.status == "running", what="start")
        queued = batcher.submit(seed=1, steps=2)
        with pytest.raises(QueueFull, match=r"queue is full \(1 requests waiting\)"):
            batcher.submit(seed=2, steps=2)
        time.sleep(0.1)
        gate.set()
        with pytest.raises(RequestTimeout, match="timed out after"):
            slow.result(timeout=30)
        assert queued.result(timeout=30).shape == (1, *pipe.shape)
        with pytest.raises(ValueError, match="sampler must be one of"):
            batcher.submit(sampler="euler")  # checked by Pipeline.prepare at submit: nothing queued
        assert batcher.queue_depth == 0
    finally:
        gate.set()
        batcher.close()
    with pytest.raises(Closed):
        batcher.submit(seed=0, steps=2)


def test_close_without_drain_ends_queued_and_running_work_with_closed(pipes):
    pipe = pipes["uncond"]
    gate = threading.Event()
    batcher = Batcher(pipe, max_batch=1, on_step=lambda s, n: gate.wait(10))
    running = batcher.submit(seed=0, sampler="ddpm", steps=30)
    wait_for(lambda: running.status == "running", what="start")
    queued = batcher.submit(seed=1, steps=2)
    closer = threading.Thread(target=batcher.close, kwargs={"drain": False})
    closer.start()
    gate.set()
    closer.join(30)
    for job in (running, queued):
        with pytest.raises(Closed, match="shut down before this request finished"):
            job.result(timeout=1)


def test_close_with_drain_finishes_the_work(pipes):
    pipe = pipes["uncond"]
    batcher = Batcher(pipe, max_batch=2)
    jobs = [batcher.submit(seed=i, steps=3) for i in range(3)]
    batcher.close(drain=True)
    assert all(job.done() and job.exception() is None for job in jobs)
