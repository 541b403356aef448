"""Load: one ``Pipeline`` called from 8 threads (40 calls in CI, 200 with --reliability-full) on the tiny
conditioned model, 2 steps, a mix of seeds, samplers, prompts and guidance. No call fails, every video
equals bit for bit the one a sequential call with the same arguments gives (same batch shapes, so the
same onnxruntime kernels), and the process's resident memory after a warm-up round grows by less than
``RSS_BOUND_MIB`` over the whole run. The same calls from 8 threads through one batching ``Batcher``:
every video equals its sequential call to float32 round-off (``serve_fixtures.assert_close``), the
backend sees no batch size but the buckets, and the memory bound holds."""

from __future__ import annotations

import gc
import itertools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from reliability_support import count
from runtime_fixtures import model_dir
from serve_fixtures import assert_close

from vdeploy.runtime import Pipeline
from vdeploy.runtime.serve import Batcher

THREADS = 8
# The bound: a leak of one 8 px video (3*4*8*8 float32 = 3 KiB) per call would stay under it, but a leaked
# session, optimized graph or per-call onnxruntime arena (each several MiB) would not; measured growth
# on this machine: 0-2 MiB for 40 calls, 0-4 MiB for 200 (glibc arenas of 8 threads settle in warm-up).
RSS_BOUND_MIB = 32

PROMPTS = ["a red ball moving left", "blue cube", "a ball moving right"]
SAMPLERS = ["ddim", "dpmpp", "ddpm", "unipc"]


def rss_mib() -> float:
    """This process's resident set (``VmRSS`` in /proc/self/status), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def calls(n: int) -> list[dict]:
    """``n`` call arguments cycling through seeds, samplers, prompts and guidance (all batch 1)."""
    kinds = itertools.cycle([{}, {"text": None}, {"text": None, "cond_scale": 2.0}, {"cond_scale": 3.0}])
    out = []
    for i, kind in zip(range(n), kinds):
        kwargs = {"seed": (i * 7919) % 97, "steps": 2, "sampler": SAMPLERS[i % len(SAMPLERS)], **kind}
        if "text" in kwargs:
            kwargs["text"] = PROMPTS[i % len(PROMPTS)]
        out.append(kwargs)
    return out


@pytest.fixture(scope="module")
def pipe():
    pipe = Pipeline.from_dir(model_dir("cond"), backend="cpu", threads=1)
    yield pipe
    pipe.close()


def test_one_pipeline_from_8_threads_matches_sequential_calls(pipe, request):
    n = count("load_calls", bool(request.config.getoption("--reliability-full")))
    jobs = calls(n)
    distinct = {repr(sorted(k.items())): k for k in jobs}
    expected = {key: pipe(**kwargs) for key, kwargs in distinct.items()}  # sequential; also warms up

    with ThreadPoolExecutor(THREADS) as pool:  # warm-up round: every thread's first calls and arenas
        list(pool.map(lambda kwargs: pipe(**kwargs), jobs[:THREADS]))
    gc.collect()
    before = rss_mib()
    with ThreadPoolExecutor(THREADS) as pool:
        futures = [(repr(sorted(kwargs.items())), pool.submit(pipe, **kwargs)) for kwargs in jobs]
        results = [(key, future.result()) for key, future in futures]  # re-raises any call's error
    gc.collect()
    growth = rss_mib() - before

    assert len(results) == n
    for key, video in results:
        assert video.shape == expected[key].shape, key
        assert np.array_equal(video, expected[key]), f"a concurrent call differs from the sequential one: {key}"
    print(f"\n{n} calls on {THREADS} threads: RSS {before:.1f} MiB after warm-up, growth {growth:+.1f} MiB "
          f"(bound {RSS_BOUND_MIB} MiB)")
    assert growth < RSS_BOUND_MIB, f"RSS grew {growth:.1f} MiB over {n} calls (bound {RSS_BOUND_MIB} MiB)"


def test_a_batcher_under_8_client_threads_matches_sequential_calls(pipe, request):
    n = count("load_calls", bool(request.config.getoption("--reliability-full")))
    jobs = calls(n)
    expected = {repr(sorted(k.items())): pipe(**k) for k in jobs}
    batches = []
    batcher = Batcher(pipe, max_batch=8, batching="on", warm=False,  # flat costs: any 2+ rows share a call
                      on_call=lambda trace: batches.append(trace.batch))
    try:
        with ThreadPoolExecutor(THREADS) as pool:  # warm-up round (the batcher's shapes are warm already)
            list(pool.map(lambda kwargs: batcher.submit(**kwargs).result(timeout=120), jobs[:THREADS]))
        gc.collect()
        before = rss_mib()
        with ThreadPoolExecutor(THREADS) as pool:
            futures = [(repr(sorted(kwargs.items())), pool.submit(lambda k: batcher.submit(**k).result(timeout=120),
                                                                  kwargs)) for kwargs in jobs]
            results = [(key, future.result()) for key, future in futures]
        gc.collect()
        growth = rss_mib() - before
    finally:
        batcher.close()
    for key, video in results:
        assert_close(video, expected[key], key)
    assert set(batches) <= set(batcher.buckets) and max(batches) > 1, sorted(set(batches))
    assert growth < RSS_BOUND_MIB, f"RSS grew {growth:.1f} MiB over {n} batched requests (bound {RSS_BOUND_MIB} MiB)"
