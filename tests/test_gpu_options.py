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

    def bind_cpu_input(self, name, value):  # the per-call binding (no fixed buffers)
        self.inputs[name] = _FakeValue(np.array(value))

    def bind_output(self, name, device, device_id):
        self.outputs[name] = None  # allocated by the run

    def copy_outputs_to_cpu(self):
        return [value.array.copy() for value in self.outputs.values()]


class _FakeRunOptions:
    def __init__(self):
        self.entries = {}

    def add_run_config_entry(self, key, value):
        self.entries[key] = value


class _CaptureRefused(Exception):
    """What onnxruntime raises when a CUDA graph cannot be captured (its errors come from its pybind module)."""


_CaptureRefused.__module__ = "onnxruntime.capi.onnxruntime_pybind11_state"


def _fake_ort(real, calls: list, providers_seen: list, refuse_graphs: bool = False):
    class Session:
        def __init__(self, path, sess_options=None, providers=None):
            providers_seen.append(providers)
            cuda = dict(p for p in providers if isinstance(p, tuple)).get("CUDAExecutionProvider", {})
            if refuse_graphs and cuda.get("enable_cuda_graph"):
                raise _CaptureRefused("This session cannot use the CUDA Graph feature as requested by the user "
                                      "as all compute graph nodes have not been partitioned to the CUDA EP.")
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
            for (name, value), out in zip(list(binding.outputs.items()), outs):
                if value is None:  # bind_output: the run allocates
                    binding.outputs[name] = _FakeValue(out)
                else:
                    np.copyto(value.array, out)  # into the fixed buffer, as a replayed graph writes
            gid = run_options.entries.get("gpu_graph_id") if run_options is not None else None
            calls.append((gid, {n: v.data_ptr() for n, v in binding.inputs.items()}))

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
    from vdeploy.export.parity import MIN_PSNR_DB, default_criterion, run_parity

    # each half precision has its own bar: fp16 issue 20's 35 dB, bf16 issue 23's 30 dB
    assert default_criterion("fp16") == {"min_psnr": MIN_PSNR_DB["fp16"]} == {"min_psnr": 35}
    assert default_criterion("bf16") == {"min_psnr": MIN_PSNR_DB["bf16"]} == {"min_psnr": 30}
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


# ------------------------------------------------------- CUDA graphs on by default (auto) ----


def _cuda_options(providers: list) -> dict:
    return dict(p for p in providers if isinstance(p, tuple))["CUDAExecutionProvider"]


def test_cuda_graphs_are_on_by_default_for_a_few_shapes_then_off(tmp_path, monkeypatch):
    """The default (``cuda_graph=None``): the provider options ask for CUDA graphs; the first AUTO_GRAPH_SHAPES
    shapes each get a graph id and fixed buffers; a shape past them runs without a graph (gpu_graph_id -1, a
    per-call binding, no new buffers), so shapes that keep changing do not pile up graphs."""
    import onnxruntime

    from vdeploy.runtime.backends import BackendOptions

    assert BackendOptions().cuda_graph is None  # auto is the default
    calls, providers = [], []
    monkeypatch.setattr(vort, "import_onnxruntime", lambda: _fake_ort(onnxruntime, calls, providers))
    backend = vort.OrtBackend(tiny_graph(tmp_path / "g.onnx"), "cuda")
    assert backend.cuda_graph and _cuda_options(providers[0])["enable_cuda_graph"] == 1
    rng = np.random.default_rng(0)
    limit = vort.AUTO_GRAPH_SHAPES
    batches = [*range(1, limit + 2), 1, limit + 1]
    for batch in batches:
        x, t = rng.standard_normal((batch, 2)), np.arange(1, batch + 1)
        (eps,) = backend.run({"x": x, "t": t})
        np.testing.assert_array_equal(eps, (x * t[:, None]).astype(np.float32))
    ids = [gid for gid, _ in calls]
    assert ids == [str(i) for i in range(limit)] + ["-1", "0", "-1"]
    assert len(backend._slots) == limit  # no fixed buffers for the shape past the limit
    # explicit choices: True graphs every shape, False asks for none
    calls.clear()
    every = vort.OrtBackend(tiny_graph(tmp_path / "g.onnx"), "cuda", cuda_graph=True)
    for batch in range(1, limit + 2):
        every.run({"x": np.ones((batch, 2)), "t": np.ones(batch)})
    assert [gid for gid, _ in calls] == [str(i) for i in range(limit + 1)]
    vort.OrtBackend(tiny_graph(tmp_path / "g.onnx"), "cuda", cuda_graph=False)
    assert "enable_cuda_graph" not in _cuda_options(providers[-1])


def test_auto_cuda_graph_falls_back_where_onnxruntime_cannot_capture(tmp_path, monkeypatch):
    """A graph with nodes onnxruntime placed off CUDA cannot be captured: by default the session is opened again
    without CUDA graphs (and runs); asked for explicitly, it is an error naming the cause."""
    import onnxruntime

    from vdeploy.runtime.platform import BackendUnavailable

    calls, providers = [], []
    monkeypatch.setattr(vort, "import_onnxruntime",
                        lambda: _fake_ort(onnxruntime, calls, providers, refuse_graphs=True))
    backend = vort.OrtBackend(tiny_graph(tmp_path / "g.onnx"), "cuda")
    assert not backend.cuda_graph and len(providers) == 2
    assert "enable_cuda_graph" not in _cuda_options(providers[1]) and _cuda_options(providers[1])["use_tf32"] == 0
    (eps,) = backend.run({"x": np.ones((2, 2)), "t": np.array([1, 2])})
    np.testing.assert_array_equal(eps, [[1, 1], [2, 2]])
    assert calls[-1][0] is None  # a plain IO-bound run
    with pytest.raises(BackendUnavailable, match="CUDA Graph"):
        vort.OrtBackend(tiny_graph(tmp_path / "g.onnx"), "cuda", cuda_graph=True)


def test_nhwc_asks_the_cuda_provider_for_channels_last_through_every_layer(tmp_path, monkeypatch):
    """``BackendOptions(nhwc=True)`` reaches the CUDA execution provider as ``prefer_nhwc=1`` through
    ``open_graph`` (the benchmark's ``*-nhwc`` rows open it so); off by default."""
    from types import SimpleNamespace

    import onnxruntime

    from vdeploy.runtime.backends import open_graph
    from vdeploy.runtime.manifest_types import Graph, TensorSpec

    assert "prefer_nhwc" not in cuda_provider_options(0, "fp16")
    assert cuda_provider_options(0, "fp16", nhwc=True)["prefer_nhwc"] == 1
    assert BackendOptions().nhwc is False
    calls, providers = [], []
    monkeypatch.setattr(vort, "import_onnxruntime", lambda: _fake_ort(onnxruntime, calls, providers))
    graph = tiny_graph(tmp_path / "denoiser.onnx")
    spec = Graph(graph.name, (TensorSpec("x", "float32", ("batch", 2), role="x"),
                              TensorSpec("t", "int64", ("batch",), role="t")), (TensorSpec("eps", "float32", ("batch", 2)),))
    manifest = SimpleNamespace(graphs={"denoiser": spec}, files={})
    open_graph("cuda", tmp_path, manifest, "denoiser", BackendOptions(nhwc=True))
    assert _cuda_options(providers[-1])["prefer_nhwc"] == 1
    open_graph("cuda", tmp_path, manifest, "denoiser", BackendOptions())
    assert "prefer_nhwc" not in _cuda_options(providers[-1])
