"""The device path's helpers (runtime/device_loop.py) on the CPU: a strict array-API namespace stands in for
CuPy, host buffers and a fake onnxruntime for device buffers. What a user relies on: noise drawn for the
device is the host path's noise, number for number, and the generator ends in the same state; a denoiser
fed device arrays through the bound buffers returns what the host path returns, reusing one set of buffers
per shape. The CuPy/CUDA side itself runs only on a GPU (benchmarks/gpu.sh)."""

import array_api_strict as xps
import numpy as np
import pytest

from test_gpu_options import _fake_ort, _FakeValue
from test_runtime_backends import tiny_graph
from vdeploy.runtime import device_loop
from vdeploy.runtime import ort as vort


def test_namespace_of_strict_and_numpy_arrays():
    assert device_loop.namespace(xps.asarray([1.0])) is xps
    assert device_loop.namespace(np.ones(2)).__name__.endswith("numpy")


def test_prefetched_noise_is_the_host_noise_and_leaves_the_generator_alike():
    shape, steps = (2, 3, 4), 5
    host = np.random.default_rng(7)
    expected = [host.standard_normal(shape, dtype=np.float32) for _ in range(steps)]
    rng = np.random.default_rng(7)
    draw = device_loop.NoisePrefetch(rng, shape, xps.asarray, steps=steps)
    got = [draw(i) for i in range(steps)]
    draw.close()
    for z, want in zip(got, expected):
        assert device_loop.namespace(z) is xps
        np.testing.assert_array_equal(np.asarray(z), want)  # bit for bit
    assert rng.standard_normal() == host.standard_normal()  # same state after the run
    with pytest.raises(ValueError, match="step order"):
        draw(steps)


def test_device_denoiser_matches_the_host_path_through_fixed_buffers(tmp_path, monkeypatch):
    import onnxruntime

    _FakeValue.shape = lambda self: list(self.array.shape)  # OrtValue.shape() is a method
    calls, providers = [], []
    monkeypatch.setattr(vort, "import_onnxruntime", lambda: _fake_ort(onnxruntime, calls, providers))
    backend = vort.OrtBackend(tiny_graph(tmp_path / "g.onnx"), "cuda", cuda_graph=True)
    denoise = device_loop.DeviceDenoiser(backend, {"x": "x", "t": "t", "out": "eps"}, library="numpy")
    rng = np.random.default_rng(0)
    outs = []
    for batch in (2, 2, 3):
        x = rng.standard_normal((batch, 2)).astype(np.float32)
        t = np.arange(batch, dtype=np.int64) + 1
        eps = denoise(x, t)
        np.testing.assert_array_equal(eps, backend.run({"x": x, "t": t})[0])  # the host path's numbers
        outs.append(eps)
    assert not np.shares_memory(outs[0], outs[1])  # a copy, not the buffer the next call overwrites
    # every call of one shape ran on the same bound buffers (the host runs above included)
    assert len({tuple(sorted(ptrs.items())) for gid, ptrs in calls if gid == "0"}) == 1


def test_device_denoiser_on_real_onnxruntime_io_binding(tmp_path):
    """The same path on onnxruntime's own IO binding and OrtValues (host buffers on the CPU kind)."""
    backend = vort.OrtBackend(tiny_graph(tmp_path / "g.onnx"), "cpu", cache=False)
    denoise = device_loop.DeviceDenoiser(backend, {"x": "x", "t": "t", "out": "eps"}, library="numpy")
    rng = np.random.default_rng(1)
    for batch in (1, 4, 1):
        x = rng.standard_normal((batch, 2)).astype(np.float32)
        t = np.arange(batch, dtype=np.int64) + 2
        np.testing.assert_array_equal(denoise(x, t), x * t[:, None].astype(np.float32))
    assert len(backend._slots) == 2  # one set of bound buffers per shape
