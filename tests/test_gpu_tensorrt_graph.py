"""Native TensorRT with CUDA graphs, on the stand-in tensorrt/cuda-python modules (no GPU, no TensorRT here).

What a user relies on: with ``cuda_graph=True`` every input shape is captured once (after a warm-up enqueue,
TensorRT's recipe) on buffers of its own, later calls of that shape replay its graph and return the same
numbers as the plain path, and ``close`` frees graphs and buffers. The real TensorRT is not exercised.
"""

import numpy as np

from test_runtime_backends import install_fake_tensorrt
from vdeploy.runtime.tensorrt import TensorRTBackend


def _add_graph_capture(trt, cudart):
    """cuda-python's stream capture and graph calls on the fake: enqueues during a capture are recorded with
    the addresses and shapes of that moment (as a CUDA graph bakes them in) and replayed by cudaGraphLaunch."""
    cudart.capturing, cudart.recorded, cudart.launches, cudart.captures = None, [], 0, 0
    cudart.cudaStreamCaptureMode = type("Mode", (), {"cudaStreamCaptureModeGlobal": 0})

    def begin(stream, mode):
        cudart.capturing, cudart.recorded = stream, []
        return (0,)

    def end(stream):
        cudart.capturing = None
        cudart.captures += 1
        return 0, list(cudart.recorded)

    def launch(graph_exec, stream):
        cudart.launches += 1
        for replay in graph_exec:
            replay()
        return (0,)

    cudart.cudaStreamBeginCapture, cudart.cudaStreamEndCapture = begin, end
    cudart.cudaGraphInstantiate = lambda graph, flags: (0, tuple(graph))
    cudart.cudaGraphLaunch = launch
    cudart.cudaGraphExecDestroy = cudart.cudaGraphDestroy = lambda g: (0,)

    engine_class = type(trt.Runtime(None).deserialize_cuda_engine(b"fake plan"))
    make_context = engine_class.create_execution_context

    def create_execution_context(self):
        context = make_context(self)
        run = context.execute_async_v3

        def execute_async_v3(stream):
            if cudart.capturing is None:
                return run(stream)
            addresses, shapes = dict(context.addresses), dict(context.shapes)

            def replay():
                saved = context.addresses, context.shapes
                context.addresses, context.shapes = addresses, shapes
                try:
                    assert run(stream)
                finally:
                    context.addresses, context.shapes = saved

            cudart.recorded.append(replay)
            return True

        context.execute_async_v3 = execute_async_v3
        return context

    engine_class.create_execution_context = create_execution_context
    return lambda: setattr(engine_class, "create_execution_context", make_context)


def test_tensorrt_cuda_graph_per_shape_replays_the_plain_results(tmp_path, monkeypatch):
    trt, cudart = install_fake_tensorrt(monkeypatch)
    undo = _add_graph_capture(trt, cudart)
    try:
        plan = tmp_path / "denoiser.plan"
        plan.write_bytes(b"fake plan")
        plain = TensorRTBackend(plan, cuda_graph=False)
        graphed = TensorRTBackend(plan, cuda_graph=True)
        rng = np.random.default_rng(0)
        for batch in (1, 3, 1, 3, 3):
            feeds = {"x": rng.standard_normal((batch, 2)).astype(np.float32), "t": np.arange(batch) + 1}
            (want,) = plain.run(feeds)
            (got,) = graphed.run(feeds)
            np.testing.assert_array_equal(got, want)
            t = feeds["t"][:, None]
            np.testing.assert_allclose(got, feeds["x"] * (t / (t + 1)), rtol=1e-6)
        assert cudart.captures == 2  # one graph per shape
        assert cudart.launches == 5  # every call replays
        slots = graphed._all_states[0]["graphs"]
        pointers = [set(slot["buffers"].values()) for slot in slots.values()]
        assert not pointers[0] & pointers[1]  # each shape's graph has buffers of its own
        plain.close()
        graphed.close()
        assert cudart.memory == {}  # graphs' buffers and the plain path's freed
    finally:
        undo()


def test_tensorrt_graphs_by_default_for_a_few_shapes_then_plain(tmp_path, monkeypatch):
    """The default (auto): the first AUTO_GRAPH_SHAPES shapes are captured, later ones run plainly, all with the
    same numbers (the fake engine's profile allows 4 batch sizes: the limit is lowered to 2 here)."""
    from vdeploy.runtime import tensorrt as vtrt

    AUTO_GRAPH_SHAPES = 2
    monkeypatch.setattr(vtrt, "AUTO_GRAPH_SHAPES", AUTO_GRAPH_SHAPES)
    trt, cudart = install_fake_tensorrt(monkeypatch)
    undo = _add_graph_capture(trt, cudart)
    try:
        plan = tmp_path / "denoiser.plan"
        plan.write_bytes(b"fake plan")
        backend = TensorRTBackend(plan)
        assert backend.cuda_graph
        for batch in [1, 2, 3, 4, 1]:
            x, t = np.full((batch, 2), 0.5, np.float32), np.arange(batch) + 1
            (got,) = backend.run({"x": x, "t": t})
            np.testing.assert_allclose(got, x * (t[:, None] / (t[:, None] + 1)), rtol=1e-6)
        assert cudart.captures == AUTO_GRAPH_SHAPES and cudart.launches == AUTO_GRAPH_SHAPES + 1
        backend.close()
        assert cudart.memory == {}
    finally:
        undo()


def test_tensorrt_auto_runs_plainly_where_capture_fails(tmp_path, monkeypatch):
    """A CUDA that cannot capture (here: cuda-python without the graph calls): the default runs plainly with the
    same numbers and frees what the attempt allocated; cuda_graph=True is an error naming the cause."""
    import pytest

    trt, cudart = install_fake_tensorrt(monkeypatch)  # (no capture calls on this fake)
    plan = tmp_path / "denoiser.plan"
    plan.write_bytes(b"fake plan")
    backend = TensorRTBackend(plan)
    x, t = np.full((2, 2), 0.5, np.float32), np.array([1, 3])
    for _ in range(2):
        (got,) = backend.run({"x": x, "t": t})
        np.testing.assert_allclose(got, x * (t[:, None] / (t[:, None] + 1)), rtol=1e-6)
    backend.close()
    assert cudart.memory == {}
    with pytest.raises(RuntimeError, match="cannot capture a CUDA graph"):
        TensorRTBackend(plan, cuda_graph=True).run({"x": x, "t": t})
