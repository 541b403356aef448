"""Fixed batch buckets: sizes, the cheapest cover of a step's rows, padding that leaves real rows alone,
the warm-up's ``auto`` decision (on a fake clock: no timing here), padded batched requests equal to solo
runs, and the per-call trace through the service's metrics.

Models: the runtime fixtures' tiny conditioned model with a fused ``--cfg`` graph (guided requests still go
as two rows each through the plain graph while batching) and the unconditioned one.
"""

from __future__ import annotations

import numpy as np
import pytest

from runtime_fixtures import model_dir
from serve_fixtures import assert_close, fused_model_dir  # noqa: F401 (fixture)
from test_serve_batcher import run_staggered
from vdeploy.runtime import Pipeline
from vdeploy.runtime.serve import Batcher
from vdeploy.runtime.serve.buckets import AUTO_GAIN, batching_mode, bucket_sizes, cover, pad, warm_up


@pytest.fixture(scope="module")
def fused(fused_model_dir):
    pipe = Pipeline.from_dir(fused_model_dir, backend="cpu", threads=1)
    assert pipe.cfg_backend is not None
    yield pipe
    pipe.close()


def test_bucket_sizes_default_to_powers_of_two_up_to_max_batch():
    assert bucket_sizes(None, 8) == (1, 2, 4, 8)
    assert bucket_sizes(None, 6) == (1, 2, 4, 6)
    assert bucket_sizes(None, 1) == (1,)
    assert bucket_sizes("8, 2,2", 8) == (2, 8) and bucket_sizes((4, 1), 4) == (1, 4)
    for bad, message in (("0", "bucket 0 is not a batch size from 1 to max batch 8"),
                         ("16", "bucket 16 is not"), ("1,x", "integers separated by commas"), (" ", "empty"),
                         ((2.5,), "bucket 2.5 is not")):
        with pytest.raises(ValueError, match=message):
            bucket_sizes(bad, 8)
    assert batching_mode(True) == "on" and batching_mode(False) == "off" and batching_mode("auto") == "auto"
    with pytest.raises(ValueError, match="batching must be one of auto, on, off"):
        batching_mode("yes")


def test_cover_picks_the_calls_of_least_measured_cost():
    gpu = {1: 1.0, 2: 1.05, 4: 1.1, 8: 1.2}  # a call costs about the same at any batch: pad up
    assert cover(1, gpu) == [1] and cover(3, gpu) == [4] and cover(5, gpu) == [8] and cover(12, gpu) == [8, 4]
    flat = {1: 1.0, 2: 2.0, 4: 4.0, 8: 8.0}  # a CPU: cost per row flat, so no padding; ties: fewest calls
    assert cover(5, flat) == [4, 1] and cover(7, flat) == [4, 2, 1] and cover(8, flat) == [8]
    assert cover(20, flat) == [8, 8, 4] and cover(0, flat) == []
    assert cover(3, {4: 1.0}) == [4] and cover(9, {4: 1.0}) == [4, 4, 4]


def test_padding_rows_leave_the_real_rows_to_float32_round_off():
    # a different batch may change the kernels' blocking, hence the order of each sum: float32 round-off. With
    # |eps| up to ~3 (ulp 2.4e-7) the bound 2e-5 is ~80 ulp; measured at most 1.8e-6 on these models
    pad_check = np.arange(6).reshape(3, 2)
    assert np.array_equal(pad(pad_check, 5), [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]]) and pad(pad_check, 3) is pad_check
    for kind in ("cond", "uncond"):
        pipe = Pipeline.from_dir(model_dir(kind), backend="cpu", threads=1)
        denoise, rng = pipe.denoiser(), np.random.default_rng(0)
        for rows, size in ((1, 2), (1, 8), (3, 4), (5, 8)):
            x = rng.standard_normal((rows, *pipe.shape), dtype=np.float32)
            t = rng.integers(0, len(pipe.betas), rows)
            cond = None if pipe.cond_dim is None else rng.standard_normal((rows, pipe.cond_dim), dtype=np.float32)
            padded = denoise(pad(x, size), pad(t, size), None if cond is None else pad(cond, size))
            assert padded.shape[0] == size
            np.testing.assert_allclose(padded[:rows], denoise(x, t, cond), rtol=0, atol=2e-5)
        pipe.close()


class FakeBackend:
    """``call(rows)`` for ``warm_up`` that advances a fake clock by ``seconds(rows)`` and records the shapes."""

    def __init__(self, seconds):
        self.now, self.seconds, self.shapes = 0.0, seconds, []

    def call(self, rows):
        self.shapes.append(rows)
        self.now += self.seconds(rows)

    def clock(self):
        return self.now


def test_auto_turns_batching_on_only_where_the_cost_per_row_falls():
    sizes = (1, 2, 4, 8)
    cpu = FakeBackend(lambda rows: 0.1 * rows)  # flat per row
    result = warm_up(cpu.call, sizes, "auto", clock=cpu.clock)
    assert not result.batching and "batching off" in result.why and "1.00x" in result.why
    assert set(cpu.shapes) == {1, 2}, "auto-off ran the larger shapes (an onnxruntime arena would grow to hold them)"
    assert result.seconds == pytest.approx({1: 0.1, 2: 0.2})

    gpu = FakeBackend(lambda rows: 0.01 + 0.001 * rows)  # per row falls: 2 rows cost 0.55x per row of 1
    result = warm_up(gpu.call, sizes, "auto", clock=gpu.clock)
    assert result.batching and set(gpu.shapes) == set(sizes) and sorted(result.seconds) == list(sizes)
    assert result.per_row()[8] == pytest.approx(0.018 / 8)

    for ratio, on in ((AUTO_GAIN + 0.01, False), (AUTO_GAIN - 0.01, True)):  # 2 rows' cost per row / 1 row's
        edge = FakeBackend(lambda rows: 0.1 * (1 if rows == 1 else rows * ratio))
        assert warm_up(edge.call, sizes, "auto", clock=edge.clock).batching is on

    forced = FakeBackend(lambda rows: 0.1 * rows)
    result = warm_up(forced.call, sizes, "on", clock=forced.clock)
    assert result.batching and sorted(result.seconds) == list(sizes)  # on: every bucket warmed and timed
    off = FakeBackend(lambda rows: 0.1 * rows)
    assert not warm_up(off.call, sizes, "off", clock=off.clock).batching and off.shapes == [1]
    single = FakeBackend(lambda rows: 0.1 * rows)
    assert not warm_up(single.call, (4,), "auto", clock=single.clock).batching


GUIDED_AND_PLAIN = [  # (joins after the first job's step k, request): 2 + 1 + 2 + 2 rows, guided ones 2 a video
    (0, dict(seed=0, sampler="dpmpp", steps=5, text="a red ball", cond_scale=3.0)),
    (1, dict(seed=1, sampler="ddim", steps=4, text="blue cube")),
    (1, dict(seed=2, sampler="unipc", steps=4, cond_scale=2.0, text="a ball moving left")),
    (2, dict(seed=3, sampler="ddpm", steps=3, text=["a red ball", "blue cube"])),
]


def test_padded_batched_requests_equal_solo_runs_and_the_trace_says_so(fused):
    # one bucket of 4 rows: every call padded to 4 (1 real row: 3 padding); guided requests (the model has a
    # fused graph) go as cond and null rows beside the plain ones. Tolerance: serve_fixtures.assert_close
    traces = []
    results, calls = run_staggered(fused, GUIDED_AND_PLAIN, traces, max_batch=8, buckets=(4,), warm=False)
    for (_, kwargs), video in zip(GUIDED_AND_PLAIN, results):
        assert_close(video, fused(**kwargs), str(kwargs))
    assert {t.batch for t in traces} == {4} and sum(t.padded for t in traces) > 0
    assert max(calls) == 4 and any(t.rows == 4 and t.padded == 0 for t in traces), calls  # shared calls
    assert traces[0].shape_changed and not any(t.shape_changed for t in traces[1:])
    assert all(t.denoise_s > 0 and t.batcher_s >= 0 for t in traces)


def test_batcher_warms_its_buckets_and_reports_the_decision(fused):
    batcher = Batcher(fused, max_batch=4, batching="on")
    try:
        assert batcher.batching and batcher.buckets == (1, 2, 4) and sorted(batcher.warmup.seconds) == [1, 2, 4]
        video = batcher.submit(seed=0, steps=2, text="a ball", cond_scale=2.0).result(timeout=60)
        assert_close(video, fused(seed=0, steps=2, text="a ball", cond_scale=2.0))
    finally:
        batcher.close()
    auto = Batcher(fused, max_batch=4)
    try:
        assert auto.mode == "auto" and auto.batching == (auto.warmup.per_row()[2] <= AUTO_GAIN * auto.warmup.per_row()[1])
    finally:
        auto.close()


def test_service_is_ready_after_warm_up_and_exports_the_call_trace(fused):
    pytest.importorskip("starlette", reason="the serving extra is not installed: pip install 'vdeploy[serve]'")
    from vdeploy.runtime.serve.app import Service

    service = Service(pipe=fused, max_batch=4, batching="on", buckets="2,4")
    assert service.ready() == (False, "loading the model")
    service.load()
    try:
        assert service.ready() == (True, "ready") and service.batching is True
        video = service.batcher.submit(seed=1, steps=2, text="blue cube").result(timeout=60)
        assert video.shape == (1, *fused.shape)
        text = service.metrics.render()[0].decode()
        for line in ('vdeploy_batching 1.0', 'vdeploy_warmup_row_seconds{batch="2"}',
                     'vdeploy_denoiser_call_seconds_count{batch="2"} 2.0', "vdeploy_batch_padded_rows_sum 2.0",
                     "vdeploy_batch_rows_sum 2.0", "vdeploy_batcher_seconds_count 2.0",
                     "vdeploy_shape_changes_total 1.0"):
            assert line in text, line
    finally:
        service.close()


def test_cli_refuses_bad_buckets_in_one_line(tmp_path):
    pytest.importorskip("starlette", reason="the serving extra is not installed: pip install 'vdeploy[serve]'")
    from click.testing import CliRunner

    from vdeploy.cli import main

    for args, message in ((["--buckets", "1,16"], "Error: --buckets: bucket 16 is not a batch size from 1 to max batch 8"),
                          (["--buckets", "2", "--max-batch", "1"], "bucket 2 is not a batch size from 1 to max batch 1"),
                          (["--batching", "maybe"], "'maybe' is not one of 'auto', 'on', 'off'")):
        result = CliRunner().invoke(main, ["serve", "--model", str(tmp_path), *args])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
