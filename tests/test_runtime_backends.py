"""runtime.backends: onnxruntime session set-up, dtype casting, backend choice, engine-cache keys.

The CUDA, TensorRT EP and native TensorRT paths need a GPU: their tests skip unless the modules import
and a device is present (``-m tensorrt`` / ``-m gpu``).
"""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from vdeploy.runtime import backends
from vdeploy.runtime import platform as vplatform
from vdeploy.runtime.backends import BACKENDS, BackendOptions, BackendUnavailable
from vdeploy.runtime.manifest import Engine, sha256_file
from vdeploy.runtime.ort import OrtBackend
from vdeploy.runtime.tensorrt import TensorRTBackend


def tiny_graph(path, x_type=TensorProto.FLOAT):
    """eps = x * float(t) (x: (batch, 2), t: int64 (batch,))."""
    nodes = [
        helper.make_node("Cast", ["t"], ["tf"], to=x_type),
        helper.make_node("Unsqueeze", ["tf", "axis"], ["t2"]),
        helper.make_node("Mul", ["x", "t2"], ["eps"]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", x_type, ["batch", 2]),
         helper.make_tensor_value_info("t", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("eps", x_type, ["batch", 2])],
        initializer=[onnx.numpy_helper.from_array(np.array([1], np.int64), "axis")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_cpu_session_is_set_up_for_speed_and_casts_inputs(tmp_path):
    import onnxruntime as ort

    backend = OrtBackend(tiny_graph(tmp_path / "g.onnx"), "cpu")
    assert backend.name == "onnxruntime-cpu"
    assert [(s.name, s.dtype, s.shape) for s in backend.inputs] == [
        ("x", "float32", ("batch", 2)), ("t", "int64", ("batch",))
    ]
    options = backend.session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.intra_op_num_threads == vplatform.physical_cores()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    # float64 x and int32 t are cast to what the graph declares
    (out,) = backend.run({"x": np.ones((3, 2), np.float64), "t": np.array([1, 2, 3], np.int32)})
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[1, 1], [2, 2], [3, 3]])


def test_fp16_graph_gets_fp16_inputs(tmp_path):
    backend = OrtBackend(tiny_graph(tmp_path / "g16.onnx", TensorProto.FLOAT16), "cpu", threads=1)
    (out,) = backend.run({"x": np.full((1, 2), 0.5, np.float32), "t": np.array([3])})
    assert out.dtype == np.float16 and out.tolist() == [[1.5, 1.5]]


def test_gpu_kinds_are_unavailable_here_with_the_extra_named(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed")
    with pytest.raises(BackendUnavailable, match=r"no CUDAExecutionProvider .* install vdeploy\[gpu\]"):
        OrtBackend(tiny_graph(tmp_path / "g.onnx"), "cuda")
    with pytest.raises(BackendUnavailable, match="no TensorrtExecutionProvider"):
        OrtBackend(tiny_graph(tmp_path / "g.onnx"), "tensorrt-ep")
    assert "install vdeploy[gpu]" in BACKENDS["cuda"].unavailable(None, BackendOptions())
    assert BACKENDS["cpu"].unavailable(None, BackendOptions()) is None


def test_missing_tensorrt_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailable, match=r"tensorrt is not installed: pip install 'vdeploy\[tensorrt\]'"):
        vplatform.import_tensorrt()
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    with pytest.raises(BackendUnavailable, match=r"cuda-python is not installed: pip install 'vdeploy\[tensorrt\]'"):
        vplatform._import_cudart()


def test_matching_engine_needs_this_gpu_and_tensorrt_version(monkeypatch):
    engines = [
        Engine("a.plan", "denoiser", "NVIDIA A100-SXM4-40GB", "10.3.0", "fp16"),
        Engine("b.plan", "denoiser", "NVIDIA H100 80GB HBM3", "10.3.0", "fp32"),
        Engine("c.plan", "denoiser", "nvidia-h100-80gb-hbm3", "10.3.0", "fp16"),
    ]
    monkeypatch.setattr(backends, "tensorrt_version", lambda: "10.3.0")
    monkeypatch.setattr(backends, "gpu_name", lambda device_id=0: "NVIDIA H100 80GB HBM3")
    assert backends.matching_engine(engines, "denoiser", precision="fp16").file == "c.plan"
    assert backends.matching_engine(engines, "denoiser", precision="fp32").file == "b.plan"
    assert backends.matching_engine(engines, "denoiser_cfg") is None
    monkeypatch.setattr(backends, "tensorrt_version", lambda: "10.7.0")
    assert backends.matching_engine(engines, "denoiser") is None
    monkeypatch.setattr(backends, "tensorrt_version", lambda: None)
    assert backends.matching_engine(engines, "denoiser") is None


def test_engine_cache_key_changes_with_everything_that_changes_the_engine(monkeypatch, tmp_path):
    monkeypatch.setenv("VDEPLOY_CACHE", str(tmp_path))
    base = dict(onnx_sha256="a" * 64, fp16=True, profile={"x": {"min": (1, 3), "opt": (1, 3), "max": (4, 3)}}, gpu="H100",
                versions={"onnxruntime": "1.20", "tensorrt": "10.3"})
    first = vplatform.engine_cache_dir("denoiser", **base)
    assert first.parent == tmp_path / "ort-trt"
    assert vplatform.engine_cache_dir("denoiser", **base) == first
    changes = [
        {"onnx_sha256": "b" * 64}, {"fp16": False}, {"profile": {"x": {"min": (1, 3), "opt": (2, 3), "max": (8, 3)}}},
        {"gpu": "A100"}, {"versions": {"onnxruntime": "1.20", "tensorrt": "10.7"}},
    ]
    for change in changes:
        assert vplatform.engine_cache_dir("denoiser", **{**base, **change}) != first, change


def test_physical_cores_is_a_sane_count():
    import os

    assert 1 <= vplatform.physical_cores() <= (os.cpu_count() or 1)


def _cuda_device() -> bool:
    try:
        cudart = vplatform._import_cudart()
        err, count = cudart.cudaGetDeviceCount()
        return err == cudart.cudaError_t.cudaSuccess and count > 0
    except BackendUnavailable:
        return False


@pytest.mark.tensorrt
def test_native_tensorrt_engine_matches_onnxruntime(tmp_path):
    trt = pytest.importorskip("tensorrt")
    if not _cuda_device():
        pytest.skip("no CUDA device")
    onnx_path = tiny_graph(tmp_path / "g.onnx")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_path.read_bytes())
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, 2), (2, 2), (4, 2))
    profile.set_shape("t", (1,), (2,), (4,))
    config.add_optimization_profile(profile)
    plan = tmp_path / "g.plan"
    plan.write_bytes(bytes(builder.build_serialized_network(network, config)))
    engine = TensorRTBackend(plan)
    reference = OrtBackend(onnx_path, "cpu")
    for b in (1, 3, 4):
        feeds = {"x": np.random.default_rng(b).standard_normal((b, 2)), "t": np.arange(b)}
        np.testing.assert_allclose(engine.run(feeds)[0], reference.run(feeds)[0], rtol=1e-6)
    with pytest.raises(ValueError, match="outside the engine's profile"):
        engine.run({"x": np.zeros((5, 2)), "t": np.zeros(5)})
    engine.close()


# ---------------------------------------------------------------- fake TensorRT --
# A stand-in for the ``tensorrt`` and ``cuda-python`` modules that drives TensorRTBackend through the
# TensorRT 10 name-based API: "device memory" is host memory and the "engine" computes eps = x * t /
# (t + 1) with x (batch, 2) within a batch profile 1..4. It checks the call sequence (shapes set per
# call, addresses bound, per-thread contexts, buffer reuse) and the backend choice, not TensorRT itself.


class _FakeCudart:
    class cudaError_t:  # noqa: N801 (the binding's name)
        cudaSuccess = 0

    class cudaMemcpyKind:  # noqa: N801
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    class _Stream:
        def __init__(self, n):
            self.n = n

        def __int__(self):
            return 1000 + self.n

    def __init__(self):
        self.memory, self.streams, self.mallocs = {}, 0, 0

    def cudaSetDevice(self, device):  # noqa: N802
        return (0,)

    def cudaStreamCreate(self):  # noqa: N802
        self.streams += 1
        return 0, self._Stream(self.streams)

    def cudaStreamDestroy(self, stream):  # noqa: N802
        return (0,)

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        return (0,)

    def cudaMalloc(self, nbytes):  # noqa: N802
        block = np.zeros(nbytes, np.uint8)
        self.memory[block.ctypes.data] = block
        self.mallocs += 1
        return 0, block.ctypes.data

    def cudaFree(self, ptr):  # noqa: N802
        self.memory.pop(ptr)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):  # noqa: N802
        import ctypes

        ctypes.memmove(dst, src, nbytes)
        return (0,)

    def cudaGetDeviceProperties(self, device):  # noqa: N802
        return 0, type("Props", (), {"name": b"NVIDIA Fake GPU"})()


class _FakeTensorRT:
    __version__ = "10.99.0"

    class TensorIOMode:
        INPUT, OUTPUT = "in", "out"

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    @staticmethod
    def nptype(dtype):
        return dtype

    def __init__(self, x_shape=(2,)):
        self.contexts = []
        fake = self

        class Context:
            def __init__(self):
                self.shapes, self.addresses, self.thread = {}, {}, None
                fake.contexts.append(self)

            def set_input_shape(self, name, shape):
                if name == "x" and not (1 <= shape[0] <= 4 and tuple(shape[1:]) == tuple(x_shape)):
                    return False
                self.shapes[name] = tuple(shape)
                return True

            def get_tensor_shape(self, name):
                return self.shapes["x"]

            def set_tensor_address(self, name, ptr):
                self.addresses[name] = ptr

            def execute_async_v3(self, stream_handle):
                import ctypes
                import threading

                assert isinstance(stream_handle, int)
                self.thread = self.thread or threading.get_ident()
                assert self.thread == threading.get_ident(), "a context used from two threads"
                x = np.empty(self.shapes["x"], np.float32)
                t = np.empty(self.shapes["x"][:1], np.int64)
                ctypes.memmove(x.ctypes.data, self.addresses["x"], x.nbytes)
                ctypes.memmove(t.ctypes.data, self.addresses["t"], t.nbytes)
                eps = x * (t / (t + 1)).astype(np.float32).reshape(-1, *(1,) * (x.ndim - 1))
                ctypes.memmove(self.addresses["eps"], eps.ctypes.data, eps.nbytes)
                return True

        class Engine:
            num_io_tensors = 3
            names = ["x", "t", "eps"]
            dtypes = {"x": np.dtype(np.float32), "t": np.dtype(np.int64), "eps": np.dtype(np.float32)}
            shapes = {"x": (-1, *x_shape), "t": (-1,), "eps": (-1, *x_shape)}

            def get_tensor_name(self, i):
                return self.names[i]

            def get_tensor_mode(self, name):
                return "out" if name == "eps" else "in"

            def get_tensor_dtype(self, name):
                return self.dtypes[name]

            def get_tensor_shape(self, name):
                return self.shapes[name]

            def get_tensor_profile_shape(self, name, profile):
                return [(1, *x_shape), (2, *x_shape), (4, *x_shape)]

            def create_execution_context(self):
                return Context()

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                return Engine() if data == b"fake plan" else None

        self.Runtime = Runtime


def install_fake_tensorrt(monkeypatch, x_shape=(2,)):
    import sys
    import types

    trt, cudart = _FakeTensorRT(x_shape), _FakeCudart()
    cuda = types.ModuleType("cuda")
    cuda.bindings = types.ModuleType("cuda.bindings")
    cuda.bindings.runtime = cudart
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", cuda.bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    return trt, cudart


@pytest.fixture
def fake_tensorrt(monkeypatch):
    return install_fake_tensorrt(monkeypatch)


def test_tensorrt_backend_drives_the_tensorrt10_api(fake_tensorrt, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    trt, cudart = fake_tensorrt
    (tmp_path / "g.plan").write_bytes(b"fake plan")
    engine = TensorRTBackend(tmp_path / "g.plan", cuda_graph=False)  # the plain path (graphs: test_gpu_tensorrt_graph.py)
    assert [(s.name, s.dtype, s.shape) for s in engine.inputs] == [
        ("x", "float32", (None, 2)), ("t", "int64", (None,))
    ]

    def run(b):
        x = np.arange(2 * b, dtype=np.float64).reshape(b, 2)  # float64 and int32: cast to the engine's dtypes
        (out,) = engine.run({"x": x, "t": np.arange(b, dtype=np.int32)})
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, x * (np.arange(b) / (np.arange(b) + 1))[:, None], rtol=1e-6)

    for b in (1, 3, 3, 2, 4):
        run(b)
    # x, t, eps allocated at b=1, grown at b=3 and b=4, reused for the second 3 and for 2
    assert len(trt.contexts) == 1 and cudart.mallocs == 9
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(run, [1, 2, 3, 4, 2, 1]))
    assert len(trt.contexts) >= 2  # one context per thread (the fake asserts a context stays on its thread)
    with pytest.raises(ValueError, match="outside the engine's profile"):
        engine.run({"x": np.zeros((5, 2)), "t": np.zeros(5)})
    engine.close()
    assert cudart.memory == {}
    (tmp_path / "bad.plan").write_bytes(b"another GPU's plan")
    with pytest.raises(BackendUnavailable, match="built for another GPU or TensorRT version"):
        TensorRTBackend(tmp_path / "bad.plan")
    assert vplatform.gpu_name() == "NVIDIA Fake GPU"


def test_auto_picks_a_matching_native_plan_and_samples_through_it(monkeypatch):
    from dataclasses import replace

    from runtime_fixtures import model_dir

    from vdeploy.runtime import Pipeline, manifest, samplers

    install_fake_tensorrt(monkeypatch, x_shape=(3, 4, 8, 8))
    folder = model_dir("uncond")
    plan = "denoiser.nvidia-fake-gpu.trt10.99.0.fp16.plan"
    (folder / plan).write_bytes(b"fake plan")
    engine = manifest.Engine(plan, "denoiser", "NVIDIA Fake GPU", "10.99.0", "fp16")
    replace(manifest.load(folder), engines=(engine,)).write(folder)
    pipe = Pipeline.from_dir(folder)  # auto: the plan matches this (fake) GPU and TensorRT version
    assert pipe.backend_name == "tensorrt"
    noise = np.random.default_rng(0).standard_normal((2, 3, 4, 8, 8), dtype=np.float32)

    def dummy(x, t, cond):
        return x * (t / (t + 1)).astype(np.float32).reshape(-1, 1, 1, 1, 1)

    expected = samplers.dpmpp(dummy, noise, pipe.betas, steps=5)
    np.testing.assert_allclose(pipe(noise=noise, steps=5, spacing="trailing"), np.clip((expected + 1) / 2, 0, 1), rtol=0, atol=1e-6)
    pipe.close()
    # a plan for another TensorRT: not picked
    replace(manifest.load(folder), engines=(replace(engine, tensorrt_version="10.0.0"),)).write(folder)
    auto = "onnxruntime-cpu"  # auto on a CPU-only machine (OpenVINO only where onnxruntime is missing)
    assert Pipeline.from_dir(folder).backend_name == auto
    with pytest.raises(BackendUnavailable, match="tensorrt: no TensorRT plan of this model for this GPU and TensorRT version"):
        Pipeline.from_dir(folder, backend="tensorrt")


# ------------------------------------------------------- fake onnxruntime GPU EPs --
# onnxruntime-gpu cannot be installed beside the CPU wheel here: these tests fake the provider list and
# wrap a real CPU session, to check what the runtime asks of the CUDA / TensorRT execution providers
# (provider options, engine cache, shape profile, IO binding) and the fall-through of ``auto``.


def install_fake_gpu_onnxruntime(monkeypatch, working=("TensorrtExecutionProvider", "CUDAExecutionProvider")):
    import onnxruntime as ort

    real_session = ort.InferenceSession
    sessions = []

    class Binding:
        def __init__(self, session):
            self.session, self.inputs, self.outputs = session, {}, []

        def bind_cpu_input(self, name, value):
            self.inputs[name] = value

        def bind_output(self, name, device_type="cpu", device_id=0):
            assert device_type == "cuda"
            self.outputs.append(name)

        def copy_outputs_to_cpu(self):
            return self.result

    class Session:
        def __init__(self, path, sess_options=None, providers=None):
            self.providers = providers
            self.real = real_session(path, sess_options=sess_options, providers=["CPUExecutionProvider"])
            self.bindings = 0
            sessions.append(self)

        def get_providers(self):
            names = [p[0] if isinstance(p, tuple) else p for p in self.providers]
            return [n for n in names if n in working or n == "CPUExecutionProvider"]

        def get_inputs(self):
            return self.real.get_inputs()

        def get_outputs(self):
            return self.real.get_outputs()

        def io_binding(self):
            self.bindings += 1
            return Binding(self)

        def run_with_iobinding(self, binding):
            binding.result = self.real.run(binding.outputs, binding.inputs)

    monkeypatch.setattr(ort, "InferenceSession", Session)
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    return sessions


def test_tensorrt_ep_and_cuda_options_engine_cache_and_io_binding(monkeypatch, tmp_path):
    from runtime_fixtures import model_dir

    from vdeploy.runtime import Pipeline

    monkeypatch.setenv("VDEPLOY_CACHE", str(tmp_path / "cache"))
    folder = model_dir("uncond")
    reference = Pipeline.from_dir(folder, backend="cpu")(steps=3, seed=0, batch_size=2)
    sessions = install_fake_gpu_onnxruntime(monkeypatch)
    pipe = Pipeline.from_dir(folder, precision="fp16")  # auto: TensorRT EP (no native plan here)
    assert pipe.backend_name == "onnxruntime-tensorrt-ep"
    (trt_name, trt), (cuda_name, cuda), cpu = sessions[-1].providers
    assert (trt_name, cuda_name, cpu) == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert trt["trt_fp16_enable"] is True and trt["trt_engine_cache_enable"] is True
    cache = Path(trt["trt_engine_cache_path"])
    assert cache.parent == tmp_path / "cache" / "ort-trt" and cache.is_dir()
    assert trt["trt_timing_cache_path"] == str(cache)
    assert trt["trt_profile_min_shapes"] == "x:1x3x4x8x8,t:1"
    assert trt["trt_profile_opt_shapes"] == "x:1x3x4x8x8,t:1"
    assert trt["trt_profile_max_shapes"] == "x:16x3x4x8x8,t:16"
    assert cuda["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    np.testing.assert_array_equal(pipe(steps=3, seed=0, batch_size=2), reference)
    assert sessions[-1].bindings == 3  # IO binding, one per call
    # fp32 asks for another engine: another cache folder
    Pipeline.from_dir(folder, backend="tensorrt-ep")
    assert sessions[-1].providers[0][1]["trt_engine_cache_path"] != str(cache)


def test_auto_falls_through_when_an_ep_cannot_start(monkeypatch):
    from runtime_fixtures import model_dir

    from vdeploy.runtime import Pipeline

    install_fake_gpu_onnxruntime(monkeypatch, working=("CUDAExecutionProvider",))  # TensorRT libs missing
    folder = model_dir("uncond")
    assert Pipeline.from_dir(folder).backend_name == "onnxruntime-cuda"
    with pytest.raises(BackendUnavailable, match="could not start TensorrtExecutionProvider"):
        Pipeline.from_dir(folder, backend="tensorrt-ep")


def test_cpu_optimized_graph_is_cached_keyed_and_rebuilt_when_broken(tmp_path, monkeypatch):
    import onnxruntime as ort

    monkeypatch.setenv("VDEPLOY_CACHE", str(tmp_path / "cache"))
    graph = tiny_graph(tmp_path / "g.onnx")
    sha = sha256_file(graph)
    feeds = {"x": np.arange(6, dtype=np.float32).reshape(3, 2), "t": np.array([1, 2, 3])}
    (expected,) = OrtBackend(graph, "cpu", threads=1, cache=False).run(feeds)

    first = OrtBackend(graph, "cpu", threads=1, onnx_sha256=sha)  # miss: optimizes and caches
    entry = vplatform.optimized_graph_dir(graph, sha, ort.__version__)
    assert (entry / "model.onnx").is_file() and (entry / "meta.json").is_file()
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temporary left
    second = OrtBackend(graph, "cpu", threads=1, onnx_sha256=sha)  # hit: opens the copy unoptimized
    level = second.session.get_session_options().graph_optimization_level
    assert level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for backend in (first, second):
        np.testing.assert_array_equal(backend.run(feeds)[0], expected)

    # another source sha256 (an edited graph) is another cache entry, never the stale one
    assert vplatform.optimized_graph_dir(graph, "0" * 64, ort.__version__) != entry
    # a damaged copy is rebuilt, not trusted: one that no longer parses, and one that does but differs
    cached = entry / "model.onnx"
    pristine = cached.read_bytes()
    cached.write_bytes(b"\0" * len(pristine))
    np.testing.assert_array_equal(OrtBackend(graph, "cpu", threads=1, onnx_sha256=sha).run(feeds)[0], expected)
    assert cached.read_bytes() == pristine  # rebuilt
    model = onnx.load(str(cached))
    for init in model.graph.initializer:
        init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) + 1, init.name))
    onnx.save(model, str(cached))
    rebuilt = OrtBackend(graph, "cpu", threads=1, onnx_sha256=sha)
    assert rebuilt.session.get_session_options().graph_optimization_level != level  # built anew
    np.testing.assert_array_equal(rebuilt.run(feeds)[0], expected)
    assert cached.read_bytes() == pristine


def test_cpu_optimized_graph_cache_keeps_large_weights_beside_the_graph(tmp_path, monkeypatch):
    import onnxruntime as ort

    from runtime_fixtures import model_dir

    monkeypatch.setenv("VDEPLOY_CACHE", str(tmp_path / "cache"))
    folder = model_dir("uncond")
    graph = folder / "denoiser.onnx"
    sha = sha256_file(graph)
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 4, 8, 8), dtype=np.float32), "t": np.array([5])}
    (expected,) = OrtBackend(graph, "cpu", threads=1, cache=False).run(feeds)
    OrtBackend(graph, "cpu", threads=1, onnx_sha256=sha)
    entry = vplatform.optimized_graph_dir(graph, sha, ort.__version__)
    assert (entry / "model.data").stat().st_size > (entry / "model.onnx").stat().st_size
    (got,) = OrtBackend(graph, "cpu", threads=1, onnx_sha256=sha).run(feeds)
    np.testing.assert_allclose(got, expected, atol=1e-5)
