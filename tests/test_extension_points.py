"""The extension points are one table entry each: a new sampler, backend or exported graph variant works
from the Pipeline, the CLI and the exporter with no other edit (README, "Architecture")."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from runtime_fixtures import model_dir
from vdeploy.runtime import Pipeline, samplers
from vdeploy.runtime.backends import BACKENDS, BackendSpec
from vdeploy.runtime.samplers import SamplerSpec, StepRequest, drive

# A one-step sampler: the x0 prediction from pure noise at the last training timestep.
ONE_STEP = textwrap.dedent('''
    import numpy as np
    from vdeploy.runtime.samplers import SamplerOption, SamplerSpec, StepRequest, drive, clip_x0

    def once_steps(x, betas, *, cond=None, steps=1, clip_denoised=True, dynamic_thres_percentile=None,
                   prediction_type="eps", callback=None, scale=1.0):
        abar = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))[-1]
        t = np.full((x.shape[0],), len(betas) - 1, dtype=np.int64)
        eps = yield StepRequest(x, t, cond, 0)
        x0 = (np.float32(1 / np.sqrt(abar)) * x - np.float32(np.sqrt(1 / abar - 1)) * eps) * np.float32(scale)
        return clip_x0(x0, dynamic_thres_percentile) if clip_denoised else x0

    def once(denoise, x, betas, **kwargs):
        return drive(once_steps(np.asarray(x, np.float32), betas, **kwargs), denoise)

    SPEC = SamplerSpec(once, once_steps, 1, False, (SamplerOption("scale", float, "x0 times this (test)"),),
                       "one x0 prediction (test)")
''')


def _one_step_spec() -> SamplerSpec:
    namespace: dict = {}
    exec(ONE_STEP, namespace)  # noqa: S102 - the same source the CLI subprocess registers
    return namespace["SPEC"]


def test_a_new_sampler_entry_works_from_the_pipeline(monkeypatch):
    monkeypatch.setitem(samplers.SAMPLERS, "once", _one_step_spec())
    pipe = Pipeline.from_dir(model_dir("uncond"), backend="cpu")
    noise = np.random.default_rng(0).standard_normal((2, *pipe.shape), dtype=np.float32)
    video = pipe(noise=noise, sampler="once", scale=0.5)
    abar = np.cumprod(1 - pipe.betas)[-1]
    t = np.full((2,), len(pipe.betas) - 1, dtype=np.int64)
    x0 = (noise / np.sqrt(abar) - np.sqrt(1 / abar - 1) * pipe.denoiser()(noise, t, None)) * 0.5
    np.testing.assert_allclose(video, np.clip((np.clip(x0, -1, 1) + 1) / 2, 0, 1), atol=1e-4)  # f32 vs f64 coefs
    with pytest.raises(ValueError, match=r"sampler 'once' takes no option eta \(its options: scale\)"):
        pipe(noise=noise, sampler="once", eta=0.5)


def test_a_new_sampler_entry_works_from_vdeploy_sample(tmp_path):
    folder = model_dir("uncond")
    out = tmp_path / "once.gif"
    script = ONE_STEP + textwrap.dedent(f'''
        from vdeploy.runtime import samplers
        samplers.SAMPLERS["once"] = SPEC
        from vdeploy.cli import main
        main(["sample", "--model", {str(folder)!r}, "--out", {str(out)!r}, "--sampler", "once", "--seed", "0",
              "--quiet"])
    ''')
    env = {**os.environ, "VDEPLOY_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert "with once on " in result.stdout and out.stat().st_size > 0


def test_a_new_backend_entry_is_picked_by_auto_and_named_by_the_cli(monkeypatch, tmp_path):
    """A backend that wraps onnxruntime CPU and counts its calls: one entry in BACKENDS."""
    cpu = BACKENDS["cpu"]
    calls = []

    def open_counting(model_dir, manifest, graph, options):
        inner = cpu.open(model_dir, manifest, graph, options)

        class Counting:
            name, kind, path, inputs, outputs = "counting", "counting", inner.path, inner.inputs, inner.outputs

            def run(self, feeds):
                calls.append(sorted(feeds))
                return inner.run(feeds)

        return Counting()

    monkeypatch.setitem(BACKENDS, "counting", BackendSpec(lambda m, o: None, open_counting, 5, True, "test"))
    folder = model_dir("uncond")
    pipe = Pipeline.from_dir(folder)  # auto: rank 5 comes before onnxruntime CPU (9)
    assert pipe.backend_name == "counting"
    reference = Pipeline.from_dir(folder, backend="cpu")(steps=2, seed=3)
    np.testing.assert_array_equal(pipe(steps=2, seed=3), reference)
    assert calls == [["t", "x"]] * 2
    monkeypatch.setitem(BACKENDS, "counting", BackendSpec(lambda m, o: "needs a counter", open_counting, 5, True, "t"))
    assert Pipeline.from_dir(folder).backend_name == "onnxruntime-cpu"  # unavailable: auto skips it
    from vdeploy.runtime.platform import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="counting: needs a counter"):
        Pipeline.from_dir(folder, backend="counting")


def test_a_new_graph_variant_entry_is_exported_checked_and_loaded(monkeypatch, tmp_path):
    """A derived variant (here: a byte copy of the fp32 graph, as fp16 would be a conversion) is built,
    checked against PyTorch, hashed and recorded by the one export loop."""
    import shutil

    from export_fixtures import TINY_UNCOND_CONFIG, tiny_unet
    from vdeploy.export import exporter, variants
    from vdeploy.runtime import manifest as vmanifest

    def copy(src: Path, dst: Path) -> dict:
        shutil.copyfile(src, dst)
        return {"copied_from": src.name}

    entry = variants.GraphVariant("denoiser_copy.onnx", "copy", False, "fp32", None, ("denoiser", copy),
                                  "forward", "atol", False, "a byte copy (test)")
    monkeypatch.setitem(variants.VARIANTS, "denoiser_copy", entry)
    monkeypatch.setattr(exporter, "selected", lambda options: ["denoiser", "denoiser_copy"])
    unet, config = tiny_unet(TINY_UNCOND_CONFIG, seed=2)
    written = exporter.export_unet(unet, config, tmp_path / "m", optimize="none")
    loaded = vmanifest.load(tmp_path / "m")
    assert loaded == written
    assert loaded.graphs["denoiser_copy"].optimization == {"copied_from": "denoiser.onnx"}
    assert loaded.files["denoiser_copy.onnx"] == loaded.files["denoiser.onnx"]
    assert max(loaded.parity["denoiser_copy"]["max_abs_err"].values()) <= 1e-4
