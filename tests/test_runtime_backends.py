"""runtime.backends: onnxruntime session set-up, dtype casting, backend choice, engine-cache keys.

The CUDA, TensorRT EP and native TensorRT paths need a GPU: their tests skip unless the modules import
and a device is present (``-m tensorrt`` / ``-m gpu``).
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from vdeploy.runtime import backends
from vdeploy.runtime.backends import BackendUnavailable, OrtBackend


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
        ("x", np.float32, ("batch", 2)), ("t", np.int64, ("batch",))
    ]
    options = backend.session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.intra_op_num_threads == backends.physical_cores()
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
    assert backends.auto_kinds([], "denoiser") == ["cpu"]


def test_missing_tensorrt_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailable, match=r"tensorrt is not installed: pip install 'vdeploy\[tensorrt\]'"):
        backends.import_tensorrt()
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    with pytest.raises(BackendUnavailable, match=r"cuda-python is not installed: pip install 'vdeploy\[tensorrt\]'"):
        backends._import_cudart()


def test_matching_engine_needs_this_gpu_and_tensorrt_version(monkeypatch):
    engines = [
        {"file": "a.plan", "graph": "denoiser", "gpu": "NVIDIA A100-SXM4-40GB", "tensorrt_version": "10.3.0",
         "precision": "fp16"},
        {"file": "b.plan", "graph": "denoiser", "gpu": "NVIDIA H100 80GB HBM3", "tensorrt_version": "10.3.0",
         "precision": "fp32"},
        {"file": "c.plan", "graph": "denoiser", "gpu": "nvidia-h100-80gb-hbm3", "tensorrt_version": "10.3.0",
         "precision": "fp16"},
    ]
    monkeypatch.setattr(backends, "_tensorrt_version", lambda: "10.3.0")
    monkeypatch.setattr(backends, "gpu_name", lambda device_id=0: "NVIDIA H100 80GB HBM3")
    assert backends.matching_engine(engines, "denoiser", precision="fp16")["file"] == "c.plan"
    assert backends.matching_engine(engines, "denoiser", precision="fp32")["file"] == "b.plan"
    assert backends.matching_engine(engines, "denoiser_cfg") is None
    monkeypatch.setattr(backends, "_tensorrt_version", lambda: "10.7.0")
    assert backends.matching_engine(engines, "denoiser") is None
    monkeypatch.setattr(backends, "_tensorrt_version", lambda: None)
    assert backends.matching_engine(engines, "denoiser") is None


def test_engine_cache_key_changes_with_everything_that_changes_the_engine(monkeypatch, tmp_path):
    monkeypatch.setenv("VDEPLOY_CACHE", str(tmp_path))
    base = dict(onnx_sha256="a" * 64, fp16=True, profile={"x": ((1, 3), (1, 3), (4, 3))}, gpu="H100",
                versions={"onnxruntime": "1.20", "tensorrt": "10.3"})
    first = backends.engine_cache_dir("denoiser", **base)
    assert first.parent == tmp_path / "ort-trt"
    assert backends.engine_cache_dir("denoiser", **base) == first
    changes = [
        {"onnx_sha256": "b" * 64}, {"fp16": False}, {"profile": {"x": ((1, 3), (2, 3), (8, 3))}},
        {"gpu": "A100"}, {"versions": {"onnxruntime": "1.20", "tensorrt": "10.7"}},
    ]
    for change in changes:
        assert backends.engine_cache_dir("denoiser", **{**base, **change}) != first, change


def test_physical_cores_is_a_sane_count():
    import os

    assert 1 <= backends.physical_cores() <= (os.cpu_count() or 1)


def _cuda_device() -> bool:
    try:
        cudart = backends._import_cudart()
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
    engine = backends.TensorRTBackend(plan)
    reference = OrtBackend(onnx_path, "cpu")
    for b in (1, 3, 4):
        feeds = {"x": np.random.default_rng(b).standard_normal((b, 2)), "t": np.arange(b)}
        np.testing.assert_allclose(engine.run(feeds)[0], reference.run(feeds)[0], rtol=1e-6)
    with pytest.raises(ValueError, match="outside the engine's profile"):
        engine.run({"x": np.zeros((5, 2)), "t": np.zeros(5)})
    engine.close()
