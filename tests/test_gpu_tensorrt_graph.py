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
        plain = TensorRTBackend(plan)
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
