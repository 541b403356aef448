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


# ---------------------------------------------------------------- the samplers on a strict namespace ----
# Every sampler, with guidance, dynamic thresholding, v-prediction and frame conditioning, run through
# array-api-strict (which allows only the standard's functions, so any numpy-only call in the step code
# fails) and through numpy from the same start and noise. array-api-strict computes with numpy underneath
# and the step code does the same float32 operations in the same order in both namespaces (coefficients
# enter as Python floats, equal to the float32 table values), so the results are equal bit for bit: the
# tolerance is 0 ulp. (On CuPy each elementwise op is its own correctly rounded kernel: the same holds.)

from vdeploy.runtime import samplers as vs  # noqa: E402
from vdeploy.runtime.frame_conditioning import conditioned_steps  # noqa: E402
from vdeploy.runtime.steps import array_namespace, drive, guided  # noqa: E402

_SHAPE, _T = (2, 3, 4, 6, 6), 40


def _betas():
    return np.linspace(1e-4, 0.05, _T)


def _toy_denoiser(x, t, cond=None, **inputs):
    """A smooth deterministic eps written with standard functions only, the same in both namespaces."""
    xp = array_namespace(x)
    tt = xp.reshape(xp.astype(t, xp.float32), (-1, 1, 1, 1, 1)) / float(_T)
    out = xp.sin(x * 1.3) * 0.8 + tt * 0.5 - x * tt * 0.2
    if cond is not None:
        out = out + xp.reshape(xp.mean(cond, axis=1), (-1, 1, 1, 1, 1))
    if inputs:
        out = out + inputs["frames"] * 0.1 + xp.reshape(xp.mean(inputs["mask"], axis=1), (-1, 1, 1, 1, 1))
    return out * 1.5  # |x0| > 1 somewhere: clipping and thresholding act


def _to_strict(value):
    return xps.asarray(value) if isinstance(value, np.ndarray) else value


def _both(run):
    """``run(xp, to_xp)`` in numpy and in array-api-strict; the strict result must be a strict array."""
    want = run(np, lambda v: v)
    got = run(xps, _to_strict)
    assert array_namespace(got) is xps
    return np.asarray(got), want


_CASES = {
    "ddpm all steps": ("ddpm", {"steps": None}),
    "ddpm respaced, dynamic thresholding": ("ddpm", {"steps": 7, "dynamic_thres_percentile": 0.9}),
    "ddim eta 0": ("ddim", {"steps": 6}),
    "ddim eta 0.6, v": ("ddim", {"steps": 6, "eta": 0.6, "prediction_type": "v"}),
    "dpmpp 2M logsnr": ("dpmpp", {"steps": 8, "spacing": "logsnr"}),
    "dpmpp unclipped": ("dpmpp", {"steps": 5, "clip_denoised": False}),
    "dpmpp3m, v, thresholding": ("dpmpp3m", {"steps": 9, "prediction_type": "v", "dynamic_thres_percentile": 0.7}),
    "unipc bh2": ("unipc", {"steps": 7}),
    "unipc bh1 order 3": ("unipc", {"steps": 8, "order": 3, "variant": "bh1"}),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_every_sampler_gives_the_numpy_numbers_on_a_strict_namespace(case):
    name, kwargs = _CASES[case]
    rng = np.random.default_rng(3)
    x_T = rng.standard_normal(_SHAPE, dtype=np.float32)
    cond = rng.standard_normal((_SHAPE[0], 5), dtype=np.float32)
    null = rng.standard_normal(5, dtype=np.float32)
    spec = vs.SAMPLERS[name]
    seen = []

    def run(xp, to_xp):
        noise_rng = np.random.default_rng(11)  # per-step noise from one numpy generator, uploaded per draw
        extra = {"rng": noise_rng} if spec.draws_noise else {}
        denoise = guided(_toy_denoiser, null, 2.5)  # two calls, combined in the namespace
        callback = (lambda info: seen.append(array_namespace(info["x"], info["x0"], info["eps"]))) if xp is xps \
            else None
        machine = spec.stepper(to_xp(x_T), _betas(), cond=to_xp(cond), callback=callback, **kwargs, **extra)
        return drive(machine, denoise)

    got, want = _both(run)
    np.testing.assert_array_equal(got, want)  # 0 ulp (see above)
    assert seen and set(seen) == {xps}  # the latent, x0 and eps stayed in the strict namespace every step


@pytest.mark.parametrize("sampler, resample, trained", [("ddpm", 1, False), ("ddim", 1, False), ("dpmpp", 0, True)])
def test_frame_conditioning_gives_the_numpy_numbers_on_a_strict_namespace(sampler, resample, trained):
    rng = np.random.default_rng(5)
    x_T = rng.standard_normal(_SHAPE, dtype=np.float32)
    mask = np.zeros((_SHAPE[0], 1, _SHAPE[2], 1, 1), bool)
    mask[:, :, :2] = True
    known = np.where(mask, rng.uniform(-1, 1, _SHAPE).astype(np.float32), 0).astype(np.float32)
    extra = {"eta": 0.5} if sampler == "ddim" else {}

    def run(xp, to_xp):
        return drive(conditioned_steps(sampler, to_xp(x_T), _betas(), known=known, mask=mask, resample=resample,
                                       trained=trained, rng=np.random.default_rng(2), steps=5, **extra),
                     _toy_denoiser)

    got, want = _both(run)
    np.testing.assert_array_equal(got, want)  # 0 ulp
    np.testing.assert_array_equal(got[:, :, :2], known[:, :, :2])  # the known frames are the given ones


def test_noise_prefetch_feeds_a_sampler_as_its_noise_iterable():
    """A device run's noise (prefetched from the host generator) gives the host run's ddpm sample."""
    x_T = np.random.default_rng(0).standard_normal(_SHAPE, dtype=np.float32)
    want = vs.ddpm(_toy_denoiser, x_T, _betas(), steps=6, rng=np.random.default_rng(9))
    draw = device_loop.NoisePrefetch(np.random.default_rng(9), _SHAPE, xps.asarray, steps=6)
    got = vs.ddpm(_toy_denoiser, xps.asarray(x_T), _betas(), steps=6, noise=draw)
    draw.close()
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("sampler, cond_scale", [("ddpm", 1.0), ("dpmpp", 3.0)])
def test_device_sample_through_onnxruntime_io_binding_equals_the_pipeline(sampler, cond_scale):
    """``device_loop.sample``: the Pipeline's run with the loop in the strict namespace and the denoiser fed and read
    through onnxruntime CPU IO binding (fixed buffers per shape, ``run_bound``), against ``pipe(...)``. Same
    graph, same inputs, same float32 step arithmetic: equal bit for bit."""
    from runtime_fixtures import model_dir
    from vdeploy.runtime import Pipeline

    pipe = Pipeline.from_dir(model_dir("cond"), backend="cpu")
    c = np.random.default_rng(4).standard_normal((2, pipe.cond_dim), dtype=np.float32)
    kwargs = dict(cond=c, cond_scale=cond_scale, sampler=sampler, steps=4, seed=7)
    want = pipe(**kwargs)
    bound = device_loop.DeviceDenoiser(pipe.backend, device_loop.graph_names(pipe.graph), library="numpy")
    got = device_loop.sample(pipe, xp=xps, denoise=lambda *a, **k: xps.asarray(bound(*a, **k)), **kwargs)
    np.testing.assert_array_equal(got, want)
    assert pipe.backend._slots  # the calls went through the bound buffers


def test_device_sample_takes_noise_drawn_on_the_device():
    """Per-step noise drawn on the device (here: strict arrays) is used as given: the run equals the host run fed
    the same numbers."""
    from runtime_fixtures import model_dir
    from vdeploy.runtime import Pipeline

    pipe = Pipeline.from_dir(model_dir("cond"), backend="cpu")
    shape = (1, *pipe.shape)
    z = [np.random.default_rng(i).standard_normal(shape, dtype=np.float32) for i in range(3)]
    c = np.zeros((1, pipe.cond_dim), np.float32)
    want = pipe(cond=c, sampler="ddpm", steps=3, seed=1, step_noise=iter(z))
    bound = device_loop.DeviceDenoiser(pipe.backend, device_loop.graph_names(pipe.graph), library="numpy")
    got = device_loop.sample(pipe, xp=xps, denoise=lambda *a, **k: xps.asarray(bound(*a, **k)), cond=c,
                             sampler="ddpm", steps=3, seed=1, step_noise=iter([xps.asarray(v) for v in z]))
    np.testing.assert_array_equal(got, want)


def test_clipping_on_a_device_namespace_is_numpy_clip_without_the_namespace_clip():
    """Clipping x0 (fixed and dynamic thresholds) in a device namespace gives numpy's ``clip`` bit for bit (NaN and
    -0.0 included) without calling the namespace's ``clip``: array-api-compat's CuPy ``clip`` assigns through
    boolean masks, two device waits a step (an H200 run spent 12.6% of each dpmpp step outside the denoiser)."""
    import types

    from vdeploy.runtime.steps import _clip_x0_array_api, clip_x0

    def refuse(*a, **k):
        raise AssertionError("the namespace's clip was called")

    no_clip = types.SimpleNamespace(**{name: getattr(xps, name) for name in dir(xps) if not name.startswith("__")})
    no_clip.clip = refuse
    x0 = np.random.default_rng(3).standard_normal((2, 3, 4, 5), dtype=np.float32) * 2
    x0[0, 0, 0, 1:3] = [-0.0, 1.0]
    for q, nan in ((None, True), (0.9, False)):  # (a NaN makes numpy's quantile, so a dynamic row, all NaN)
        x0[0, 0, 0, 0] = np.nan if nan else 0.5
        want = clip_x0(x0.copy(), dynamic_thres_percentile=q)
        got = np.asarray(_clip_x0_array_api(no_clip, xps.asarray(x0), q))
        np.testing.assert_array_equal(got, want)
        assert np.signbit(got[0, 0, 0, 1]) == np.signbit(want[0, 0, 0, 1])
