"""The fp16 conversion (export/fp16.py) gives a valid graph on every onnxruntime ``[cpu]`` admits.

Runs in the main venv (the newest onnxruntime) and, without torch or vdeploy's conftest, in the oldest
one: ``make test-ort-oldest`` (``.venv-ort-oldest``, onnxruntime 1.17.3). It loads export/fp16.py by path,
so only numpy, onnx and onnxruntime are needed. onnxruntime 1.30's converter wrote one Cast per blocked
consumer under one name (onnx.checker: "used as output names multiple times", issue 20); the duplicate test
below builds that graph by hand, so it is caught on every version.
"""

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

_SPEC = importlib.util.spec_from_file_location("vdeploy_fp16", Path(__file__).parents[1] / "export" / "fp16.py")
fp16 = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(fp16)


def unet_like(path: Path) -> Path:
    """The U-Net's fragile parts in miniature: a sinusoidal time embedding under ``time_mlp`` (t * freq ~ 1e3
    rad), a matmul, normalization statistics (ReduceMean, Sqrt, Div), softmax, and a value read by both a
    blocked op (Sin, Cos) and fp16 ones."""
    rng = np.random.default_rng(0)
    init = {
        "freq": np.exp(-np.log(1e4) * np.arange(4) / 4).astype(np.float32).reshape(1, 4),
        "w_t": rng.standard_normal((8, 8)).astype(np.float32) * 0.3,
        "w_x": rng.standard_normal((8, 8)).astype(np.float32) * 0.3,
        "eps_c": np.array(1e-5, np.float32),
        "half": np.array(0.5, np.float32),
        "axis1": np.array([1], np.int64),
    }
    n = helper.make_node
    nodes = [
        n("Unsqueeze", ["t", "axis1"], ["t1"], name="/unet/time_mlp.0/Unsqueeze"),
        n("Mul", ["t1", "freq"], ["tf"], name="/unet/time_mlp.0/Mul"),
        n("Sin", ["tf"], ["ts"], name="/unet/time_mlp.0/Sin"),
        n("Cos", ["tf"], ["tc"], name="/unet/time_mlp.0/Cos"),
        n("Concat", ["ts", "tc"], ["temb0"], axis=1, name="/unet/time_mlp.0/Concat"),
        n("MatMul", ["temb0", "w_t"], ["temb"], name="/unet/time_mlp.1/MatMul"),
        n("MatMul", ["x", "w_x"], ["h0"], name="/unet/block/MatMul"),
        n("Add", ["h0", "temb"], ["h"], name="/unet/block/Add"),
        # one fp16 value read by two blocked consumers (Sin and Cos): one Cast each in some converters
        n("Mul", ["h", "half"], ["hh"], name="/unet/block/Mul"),
        n("Sin", ["hh"], ["hs"], name="/unet/block/Sin"),
        n("Cos", ["hh"], ["hc"], name="/unet/block/Cos"),
        n("Add", ["hs", "hc"], ["g"], name="/unet/block/Add_1"),
        n("ReduceMean", ["g"], ["mu"], axes=[1], keepdims=1, name="/unet/norm/ReduceMean"),
        n("Sub", ["g", "mu"], ["gc"], name="/unet/norm/Sub"),
        n("Mul", ["gc", "gc"], ["g2"], name="/unet/norm/Mul"),
        n("ReduceMean", ["g2"], ["var"], axes=[1], keepdims=1, name="/unet/norm/ReduceMean_1"),
        n("Add", ["var", "eps_c"], ["var_e"], name="/unet/norm/Add"),
        n("Sqrt", ["var_e"], ["sd"], name="/unet/norm/Sqrt"),
        n("Div", ["gc", "sd"], ["gn"], name="/unet/norm/Div"),
        n("Softmax", ["gn"], ["att"], axis=1, name="/unet/attn/Softmax"),
        n("Add", ["gn", "att"], ["eps"], name="/unet/out/Add"),
    ]
    graph = helper.make_graph(
        nodes, "unet_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]),
         helper.make_tensor_value_info("t", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["batch", 8])],
        initializer=[numpy_helper.from_array(v, k) for k, v in init.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnxruntime 1.17 reads IR <= 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _run(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_fp16_graph_is_valid_runs_and_keeps_fragile_parts_fp32(tmp_path):
    src = unet_like(tmp_path / "fp32.onnx")
    info = fp16.convert_fp16(src, tmp_path / "fp16.onnx")
    model16 = onnx.load(str(tmp_path / "fp16.onnx"))
    onnx.checker.check_model(model16, full_check=True)
    names = [o for node in model16.graph.node for o in node.output]
    assert len(names) == len(set(names)), "every value has one producer"
    assert info["io_dtype"] == "float32"
    types = {vi.name: vi.type.tensor_type.elem_type for vi in model16.graph.input}
    assert types == {"x": TensorProto.FLOAT, "t": TensorProto.FLOAT}  # the runtime's contract is unchanged
    # the time embedding's weights and the normalization stay fp32; the block's matmul weight is fp16
    weights = {i.name: i.data_type for i in model16.graph.initializer}
    assert weights["freq"] == TensorProto.FLOAT and weights["w_x"] == TensorProto.FLOAT16

    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((3, 8)).astype(np.float32),
             "t": np.array([1.0, 500.0, 999.0], np.float32)}  # t * freq up to ~1e3 rad
    ref, out = _run(src, feeds), _run(tmp_path / "fp16.onnx", feeds)
    assert out.dtype == np.float32
    # fp16 rounds each stored value to 2^-11 relative; ~20 roundings through these ops: 1e-2 of the scale
    assert np.abs(out - ref).max() <= 1e-2 * np.abs(ref).max()


def test_duplicate_cast_nodes_are_dropped_and_conflicts_refused():
    n = helper.make_node
    nodes = [
        n("Cast", ["a"], ["a_cast_to_fp32"], to=TensorProto.FLOAT, name="c0"),
        n("Sin", ["a_cast_to_fp32"], ["s"], name="sin"),
        n("Cast", ["a"], ["a_cast_to_fp32"], to=TensorProto.FLOAT, name="c1"),  # what onnxruntime 1.30 wrote
        n("Cos", ["a_cast_to_fp32"], ["c"], name="cos"),
        n("Add", ["s", "c"], ["y"], name="add"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT16, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    assert fp16._drop_duplicate_producers(graph) == 1
    assert [node.name for node in graph.node] == ["c0", "sin", "cos", "add"]
    onnx.checker.check_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))

    graph.node.append(n("Cast", ["a"], ["s"], to=TensorProto.FLOAT, name="other"))  # a different writer of s
    try:
        fp16._drop_duplicate_producers(graph)
    except ValueError as e:
        assert "both write 's'" in str(e)
    else:
        raise AssertionError("a conflicting producer was accepted")
