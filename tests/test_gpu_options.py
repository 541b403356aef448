"""The CUDA path's settings as plain data, and its CUDA-graph buffers on a fake onnxruntime (no GPU here).

What a user relies on: ``precision="fp32"`` on onnxruntime CUDA is IEEE fp32 (the EP's TF32 default is off),
``tf32`` is a separate, explicit precision with its own parity tolerance, and with CUDA graphs every input
shape gets fixed device buffers and its own graph id, bound once and reused by every later call. The real
CUDA EP is not exercised here (benchmarks/gpu.sh runs it on a GPU).
"""

from types import SimpleNamespace

import numpy as np
import pytest

from vdeploy.export.parity import default_atol
from vdeploy.runtime import ort as vort
from vdeploy.runtime.backends import BACKENDS, BackendOptions
from vdeploy.runtime.platform import cuda_provider_options, fp32_environment

from test_runtime_backends import tiny_graph


def test_fp32_turns_tf32_off_and_tf32_is_explicit():
    assert cuda_provider_options(0, "fp32")["use_tf32"] == 0
    assert cuda_provider_options(0, "fp16")["use_tf32"] == 0
    assert cuda_provider_options(1, "tf32")["use_tf32"] == 1
    assert cuda_provider_options(1, "tf32")["device_id"] == 1
    assert "enable_cuda_graph" not in cuda_provider_options(0, "fp32")
    assert cuda_provider_options(0, "fp32", cuda_graph=True)["enable_cuda_graph"] == 1
    assert fp32_environment() == {"NVIDIA_TF32_OVERRIDE": "0"}
    with pytest.raises(ValueError, match="tf32"):
        cuda_provider_options(0, "int8")
    assert "tf32" in BACKENDS["cuda"].precisions and BACKENDS["cuda"].device == "cuda"
    assert BackendOptions(precision="tf32").precision == "tf32"
    # tf32's tolerance is its own, looser than fp32's
    assert default_atol("tf32") > default_atol("fp32")


class _FakeValue:
    """An OrtValue in host memory standing in for a device buffer (its address is the numpy buffer's)."""

    made = 0

    def __init__(self, array):
        self.array = array
        _FakeValue.made += 1

    @classmethod
    def ortvalue_from_shape_and_type(cls, shape, dtype, device, device_id):
        assert device == "cuda"  # the fake stands in for a CUDA session
        return cls(np.zeros(shape, dtype))

    def update_inplace(self, value):
        np.copyto(self.array, value)

    def numpy(self):
        return self.array.copy()

    def data_ptr(self):
        return self.array.ctypes.data


class _FakeBinding:
    def __init__(self):
        self.inputs, self.outputs = {}, {}

    def bind_ortvalue_input(self, name, value):
        self.inputs[name] = value

    def bind_ortvalue_output(self, name, value):
        self.outputs[name] = value


class _FakeRunOptions:
    def __init__(self):
        self.entries = {}

    def add_run_config_entry(self, key, value):
        self.entries[key] = value


def _fake_ort(real, calls: list, providers_seen: list):
    class Session:
        def __init__(self, path, sess_options=None, providers=None):
            providers_seen.append(providers)
            self.real = real.InferenceSession(path, providers=["CPUExecutionProvider"])

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

        def get_inputs(self):
            return self.real.get_inputs()

        def get_outputs(self):
            return self.real.get_outputs()

        def io_binding(self):
            return _FakeBinding()

        def run_with_iobinding(self, binding, run_options=None):
            feeds = {name: value.array for name, value in binding.inputs.items()}
            outs = self.real.run(list(binding.outputs), feeds)
            for value, out in zip(binding.outputs.values(), outs):
                np.copyto(value.array, out)  # into the fixed buffer, as a replayed graph writes
            calls.append((run_options.entries.get("gpu_graph_id"), {n: v.data_ptr() for n, v in binding.inputs.items()}))

    return SimpleNamespace(
        __version__=real.__version__, SessionOptions=real.SessionOptions,
        GraphOptimizationLevel=real.GraphOptimizationLevel, ExecutionMode=real.ExecutionMode,
        get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
        InferenceSession=Session, OrtValue=_FakeValue, RunOptions=_FakeRunOptions,
    )


def test_cuda_graph_binds_fixed_buffers_per_shape(tmp_path, monkeypatch):
    import onnxruntime

    calls, providers = [], []
    monkeypatch.setattr(vort, "import_onnxruntime", lambda: _fake_ort(onnxruntime, calls, providers))
    backend = vort.OrtBackend(tiny_graph(tmp_path / "g.onnx"), "cuda", precision="fp32", cuda_graph=True)
    cuda = dict(p for p in providers[0] if isinstance(p, tuple))["CUDAExecutionProvider"]
    assert cuda["use_tf32"] == 0 and cuda["enable_cuda_graph"] == 1

    rng = np.random.default_rng(0)
    made = _FakeValue.made
    outs = {}
    for batch in (1, 3, 1, 3, 1):
        x = rng.standard_normal((batch, 2))
        t = np.arange(1, batch + 1)
        (eps,) = backend.run({"x": x, "t": t})
        np.testing.assert_array_equal(eps, (x * t[:, None]).astype(np.float32))  # eps = x * t
        outs.setdefault(batch, []).append(eps)
    # one graph id per shape, in first-use order, and the same device buffers on every call of a shape
    assert [gid for gid, _ in calls] == ["0", "1", "0", "1", "0"]
    assert calls[0][1] == calls[2][1] == calls[4][1] and calls[1][1] == calls[3][1]
    assert _FakeValue.made - made == 2 * 3  # x, t, eps per shape, made once
    # outputs are copies: a later call does not change what an earlier one returned
    assert not np.shares_memory(outs[1][0], outs[1][1])


def test_cuda_graph_output_shape_from_inputs():
    from vdeploy.runtime.manifest import TensorSpec

    spec = TensorSpec("eps", "float32", ("unk0", 4, "h"))
    sizes = vort.symbolic_sizes([TensorSpec("x", "float32", ("batch", 4, "h"))], {"x": (2, 4, 8)})
    assert sizes == {"batch": 2, "h": 8}
    assert vort.resolve_shape(spec, sizes, like=(2, 4, 8)) == [2, 4, 8]
    with pytest.raises(ValueError, match="cuda_graph=False"):
        vort.resolve_shape(spec, sizes)


# ------------------------------------------------------- half precisions judged by the video ----
from export_fixtures import exported_model  # noqa: E402,F401  (session fixture)


def test_half_precisions_are_judged_by_the_video_psnr_and_report_per_call(exported_model):  # noqa: F811
    """fp16 parity on onnxruntime CPU (the fp16 graph): by default it passes or fails on the final video's PSNR
    (>= 35 dB, issue 20's bar), not on fp32's 1e-3 per-call atol that half precision cannot meet; the per-call
    errors are still reported, and an explicit atol still judges them."""
    from vdeploy.export.parity import HALF_MIN_PSNR_DB, default_criterion, run_parity

    assert default_criterion("fp16") == default_criterion("bf16") == {"min_psnr": HALF_MIN_PSNR_DB} == {"min_psnr": 35}
    assert default_criterion("fp32") == {"atol": 1e-3} and default_criterion("tf32") == {"atol": 2e-2}
    kw = dict(sampler="dpmpp", steps=3, backend="cpu", precision="fp16", raise_on_failure=False)
    # (the fixture's export is shared with other test files; the two runs here take ~1 s each)
    r = run_parity(exported_model.dir, exported_model.ckpt, **kw)
    assert r["criterion"] == "psnr" and r["atol"] is None and r["min_psnr_db"] == 35.0
    assert len(r["per_call_max_abs_err"]) == 3 and r["max_per_call_abs_err"] > 1e-4  # fp16 really ran, reported
    assert r["passed"] == (r["psnr_db"] is None or r["psnr_db"] >= 35.0)
    assert r["passed"]  # the tiny model's fp16 video is far above 35 dB (README "GPU": fp16 choice)
    strict = run_parity(exported_model.dir, exported_model.ckpt, atol=1e-6, **kw)
    assert strict["criterion"] == "atol" and not strict["passed"]  # an explicit atol judges per call
