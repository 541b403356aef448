"""TensorRT: shape profiles and names run everywhere; the engine build needs tensorrt + a CUDA GPU (skipped here)."""

from __future__ import annotations

import importlib.util

import pytest

from export_fixtures import exported_model  # noqa: F401  (pytest fixture)
from vdeploy.export.spec import ExportError, denoiser_spec
from vdeploy.export.tensorrt import TensorRTOptions, parse_shapes, profile_shapes
from vdeploy.runtime.platform import engine_file_name

CONFIG = {"channels": 3, "num_frames": 8, "image_size": 32, "out_dim": None, "dim_mults": [1, 2, 4, 8]}


def test_parse_shapes_trtexec_syntax():
    assert parse_shapes("x:1x3x8x32x32,t:1, cond:1x384") == {"x": (1, 3, 8, 32, 32), "t": (1,), "cond": (1, 384)}
    assert parse_shapes(None) == {} and parse_shapes("") == {}
    for bad in ("x=1x3", "x:1x", ":1x2", "x:ax2"):
        with pytest.raises(ExportError, match="trtexec syntax"):
            parse_shapes(bad)


def test_default_profile_covers_every_dynamic_input():
    spec = denoiser_spec(CONFIG, 384)
    profile = profile_shapes(spec, CONFIG, TensorRTOptions(max_batch=4))
    assert profile == {
        "x": {"min": [1, 3, 8, 32, 32], "opt": [1, 3, 8, 32, 32], "max": [4, 3, 8, 32, 32]},
        "t": {"min": [1], "opt": [1], "max": [4]},
        "cond": {"min": [1, 384], "opt": [1, 384], "max": [4, 384]},
    }
    cfg = profile_shapes(denoiser_spec(CONFIG, 384, guidance=True), CONFIG, TensorRTOptions())
    assert "cond_scale" not in cfg  # static (1,): no profile needed


def test_given_shapes_override_and_are_validated():
    spec = denoiser_spec(CONFIG, None)
    opts = TensorRTOptions(
        min_shapes=parse_shapes("x:1x3x8x16x16"), opt_shapes=parse_shapes("x:2x3x8x32x32,t:2"),
        max_shapes=parse_shapes("x:8x3x8x64x64,t:8"),
    )
    profile = profile_shapes(spec, CONFIG, opts)
    assert profile["x"] == {"min": [1, 3, 8, 16, 16], "opt": [2, 3, 8, 32, 32], "max": [8, 3, 8, 64, 64]}
    assert profile["t"] == {"min": [1], "opt": [2], "max": [8]}
    with pytest.raises(ExportError, match="static shape"):
        profile_shapes(spec, CONFIG, TensorRTOptions(max_shapes=parse_shapes("x:4x3x16x32x32")))
    with pytest.raises(ExportError, match="unknown input"):
        profile_shapes(spec, CONFIG, TensorRTOptions(max_shapes=parse_shapes("cond:4x384")))
    with pytest.raises(ExportError, match="min <= opt <= max"):
        profile_shapes(spec, CONFIG, TensorRTOptions(min_shapes=parse_shapes("t:4"), max_shapes=parse_shapes("t:2")))
    with pytest.raises(ExportError, match="rank"):
        profile_shapes(spec, CONFIG, TensorRTOptions(max_shapes=parse_shapes("t:4x1")))


def test_engine_name_says_what_it_was_built_for():
    name = engine_file_name("denoiser", "NVIDIA H100 80GB HBM3", "10.3.0", "fp16")
    assert name == "denoiser.nvidia-h100-80gb-hbm3.trt10.3.0.fp16.plan"


def test_import_fails_with_one_line_when_tensorrt_is_missing():
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    from vdeploy.export.tensorrt import TensorRTUnavailable, import_tensorrt

    with pytest.raises(TensorRTUnavailable) as e:
        import_tensorrt()
    assert "\n" not in str(e.value) and "vdeploy[tensorrt]" in str(e.value)


@pytest.mark.tensorrt
def test_engine_build_and_parity(tmp_path):
    """Builds an fp32 engine of a tiny model and compares it with torch CUDA (runs only with TensorRT + GPU)."""
    pytest.importorskip("tensorrt")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import tensorrt_check

    report = tensorrt_check.run("tiny", tmp_path, fp16=False, repeats=3)
    assert report["parity"]["max_abs_err"] <= 1e-3, report


class _FakeTensorRT:
    """A stand-in for the ``tensorrt`` module with the API surface build_engine uses. It checks that our
    code drives that API in the documented order; it says nothing about TensorRT itself."""

    __version__ = "10.99.0"

    def __init__(self):
        self.calls = []
        fake = self

        class Logger:
            WARNING = "WARNING"

            def __init__(self, severity):
                pass

        class MemoryPoolType:
            WORKSPACE = "WORKSPACE"

        class BuilderFlag:
            FP16 = "FP16"

        class Profile:
            def set_shape(self, name, min, opt, max):
                fake.calls.append(("set_shape", name, tuple(min), tuple(opt), tuple(max)))

        class Cache:
            def __init__(self, data):
                self.data = data

            def serialize(self):
                return b"cache:" + self.data

        class Config:
            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("pool", pool, size))

            def set_flag(self, flag):
                fake.calls.append(("flag", flag))

            def add_optimization_profile(self, profile):
                fake.calls.append(("add_profile",))

            def create_timing_cache(self, data):
                return Cache(data)

            def set_timing_cache(self, cache, ignore_mismatch):
                self.cache = cache

            def get_timing_cache(self):
                return self.cache

        class Parser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                fake.calls.append(("parse", path))
                return True

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return object()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build",))
                return b"PLAN"

        self.Logger, self.MemoryPoolType, self.BuilderFlag = Logger, MemoryPoolType, BuilderFlag
        self.Builder, self.OnnxParser = Builder, Parser


def test_build_engine_drives_the_documented_api(exported_model, tmp_path, monkeypatch):
    """With a fake ``tensorrt`` module: profile per dynamic input, fp16 flag, workspace, timing cache, plan file,
    manifest entry (ONNX sha256, GPU, version). Not a TensorRT run."""
    import sys

    from vdeploy.export import export_onnx
    from vdeploy.runtime import manifest as vmanifest

    fake = _FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr("vdeploy.export.tensorrt.gpu_name", lambda: "NVIDIA Fake GPU")
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    options = TensorRTOptions(fp16=True, max_batch=3, workspace_mb=256, timing_cache=str(cache))
    manifest = export_onnx(exported_model.ckpt, tmp_path / "m", tensorrt=options, optimize="none", cfg=True)
    engine, cfg_engine = manifest.engines
    assert cfg_engine.graph == "denoiser_cfg" and cfg_engine.file.startswith("denoiser_cfg.nvidia-fake-gpu.")
    assert cfg_engine.onnx_sha256 == manifest.files["denoiser_cfg.onnx"]
    assert engine.file == "denoiser.nvidia-fake-gpu.trt10.99.0.fp16.plan"
    assert engine.graph == "denoiser" and engine.precision == "fp16" and engine.gpu == "NVIDIA Fake GPU"
    assert engine.onnx_sha256 == manifest.files["denoiser.onnx"]
    assert (tmp_path / "m" / engine.file).read_bytes() == b"PLAN"
    assert cache.read_bytes() == b"cache:cache:old"  # read and written back by each of the two builds
    assert ("flag", "FP16") in fake.calls and ("pool", "WORKSPACE", 256 << 20) in fake.calls
    shapes = {c[1]: c[2:] for c in fake.calls if c[0] == "set_shape"}  # both engines: the same profile
    assert shapes == {
        "x": ((1, 3, 4, 16, 16), (1, 3, 4, 16, 16), (3, 3, 4, 16, 16)),
        "t": ((1,), (1,), (3,)),
        "cond": ((1, 6), (1, 6), (3, 6)),
    }
    assert [c[0] for c in fake.calls].index("parse") < [c[0] for c in fake.calls].index("build")
    vmanifest.load(tmp_path / "m")  # the plan is hashed and listed
