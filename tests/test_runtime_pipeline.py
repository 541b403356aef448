"""runtime.Pipeline end to end (onnxruntime CPU).

Parity, guidance, fp16 and threads run on the export stage's session fixture: a tiny conditioned
``vdeploy.model.Unet3D`` exported by ``vdeploy.export.export_onnx`` with ``--cfg`` and ``--fp16``; the
reference is the seed's own sampler, upstream ``GaussianDiffusion.p_sample_loop`` around an upstream
``Unet3D`` holding the same weights. Validation, text and torch-free runs use small directories built
in ``runtime_fixtures`` (tampered copies are cheap there).
"""

import importlib.util
import json
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from vdeploy.runtime import BackendUnavailable, ManifestError, Pipeline

from export_fixtures import exported_model  # noqa: F401  (session fixture)
from runtime_fixtures import COND_DIM, TIMESTEPS, VOCAB, model_dir, torch_threads, upstream
from test_runtime_samplers import run_upstream_loop

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def uncond():
    return model_dir("uncond")


@pytest.fixture(scope="module")
def cond():
    return model_dir("cond")


@pytest.fixture(scope="module")
def reference(exported_model):  # noqa: F811
    """The seed's GaussianDiffusion around an upstream Unet3D with the exported weights."""
    vdp = upstream()
    config = exported_model.config
    with torch_threads(1):
        unet = vdp.Unet3D(
            dim=config["dim"], dim_mults=tuple(config["dim_mults"]), cond_dim=config["cond_dim"],
            attn_heads=config["attn_heads"], attn_dim_head=config["attn_dim_head"],
        ).eval()
        unet.load_state_dict(exported_model.unet.state_dict(), strict=True)
        diffusion = vdp.GaussianDiffusion(
            unet, image_size=config["image_size"], num_frames=config["num_frames"], timesteps=config["timesteps"]
        )
    shape = (2, config["channels"], config["num_frames"], config["image_size"], config["image_size"])
    return diffusion, shape


def edit_manifest(folder: Path, edit) -> None:
    path = folder / "vdeploy.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# ------------------------------------------------------------------ sampling --


@pytest.mark.parametrize("cond_scale, fused", [(1.0, False), (3.0, True), (3.0, False)])
def test_pipeline_ddpm_equals_the_seed_sampler(exported_model, reference, cond_scale, fused, monkeypatch):  # noqa: F811
    diffusion, shape = reference
    with torch_threads(1):
        c = torch.randn(shape[0], COND_DIM)
        video, start, drawn, _ = run_upstream_loop(diffusion, shape, monkeypatch, cond=c, cond_scale=cond_scale)
    pipe = Pipeline.from_dir(exported_model.dir, backend="cpu")
    assert pipe.cfg_backend is not None  # exported with --cfg
    if not fused:
        pipe.cfg_backend = None  # two calls a step: cond and null embedding
    steps = []
    ours = pipe(
        cond=c.numpy(), cond_scale=cond_scale, sampler="ddpm", noise=start.numpy(),
        step_noise=[z.numpy() for z in drawn], callback=lambda info: steps.append(info["x"]),
    )
    assert len(steps) == diffusion.num_timesteps
    assert ours.shape == shape and ours.dtype == np.float32
    err = np.abs(ours - video.numpy()).max()
    assert err <= 1e-3, f"final max abs err {err:.2e}"


def test_fused_cfg_graph_equals_two_calls(exported_model):  # noqa: F811
    fused = Pipeline.from_dir(exported_model.dir)
    two_calls = Pipeline.from_dir(exported_model.dir)
    two_calls.cfg_backend = None
    c = np.random.default_rng(0).standard_normal((2, COND_DIM)).astype(np.float32)
    a = fused(cond=c, cond_scale=4.0, steps=8, seed=3)
    b = two_calls(cond=c, cond_scale=4.0, steps=8, seed=3)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


def test_fp16_graph_samples_close_to_fp32(exported_model):  # noqa: F811
    fp32 = Pipeline.from_dir(exported_model.dir, backend="cpu")
    fp16 = Pipeline.from_dir(exported_model.dir, backend="cpu", precision="fp16")
    assert fp16.backend.path.name == "denoiser_fp16.onnx"
    c = np.ones((1, COND_DIM), np.float32)
    a = fp32(cond=c, steps=10, seed=0)
    b = fp16(cond=c, steps=10, seed=0)
    # fp16 eps differ by ~2e-3 per call; the first step's x0 = (x - sigma eps) / alpha at t = T - 1
    # multiplies that by 1 / alpha ~ 6e4 before clipping, so a pixel whose x0 sits near 0 there may flip
    # (measured: 1 of 3072 pixels off by 0.22). Judge the video, not that pixel.
    err = np.abs(a - b)
    assert err.mean() < 2e-3 and (err > 5e-2).mean() < 5e-3, (err.mean(), (err > 5e-2).mean())


def test_pipeline_output_contract(uncond):
    pipe = Pipeline.from_dir(uncond)
    auto = "onnxruntime-cpu"  # auto on a CPU-only machine (OpenVINO only where onnxruntime is missing)
    assert pipe.backend_name == auto
    for sampler, steps in (("dpmpp", 5), ("ddim", 5), ("ddpm", None)):
        video = pipe(batch_size=3, sampler=sampler, steps=steps, seed=1)
        assert video.shape == (3, 3, 4, 8, 8) and video.dtype == np.float32
        assert video.min() >= 0.0 and video.max() <= 1.0
    a = pipe(seed=7, steps=4)
    assert np.array_equal(a, pipe(seed=7, steps=4))
    assert not np.array_equal(a, pipe(seed=8, steps=4))
    noise = np.random.default_rng(0).standard_normal((1, 3, 4, 8, 8), dtype=np.float32)
    assert np.array_equal(pipe(noise=noise, steps=4, seed=1), pipe(noise=noise, steps=4, seed=2))
    seen = []
    pipe(steps=6, callback=seen.append, progress=True)
    assert [info["i"] for info in seen] == list(range(6))


def test_pipeline_applies_the_configs_dynamic_thresholding():
    from vdeploy.runtime import samplers

    folder = model_dir("uncond")
    edit_manifest(folder, lambda m: m["config"].update(use_dynamic_thres=True, dynamic_thres_percentile=0.8))
    pipe = Pipeline.from_dir(folder)
    noise = np.random.default_rng(0).standard_normal((1, 3, 4, 8, 8), dtype=np.float32)
    for sampler in ("dpmpp", "ddim"):
        expected = samplers.SAMPLERS[sampler].fn(pipe.denoiser(), noise, pipe.betas, steps=5,
                                              dynamic_thres_percentile=0.8)
        got = pipe(noise=noise, sampler=sampler, steps=5, spacing="trailing")  # the function's own default
        np.testing.assert_array_equal(got, np.clip((expected + 1) / 2, 0, 1))
        static = samplers.SAMPLERS[sampler].fn(pipe.denoiser(), noise, pipe.betas, steps=5)
        assert not np.array_equal(expected, static)


def test_cond_batching_and_null_conditioning(cond):
    pipe = Pipeline.from_dir(cond)
    one = np.ones(COND_DIM, np.float32)
    assert pipe(cond=one, batch_size=3, steps=3, seed=0).shape[0] == 3
    assert pipe(cond=np.ones((2, COND_DIM), np.float32), steps=3, seed=0).shape[0] == 2
    # no cond on a conditional model: the learned null embedding, i.e. unconditional sampling
    null = np.load(cond / "null_cond_emb.npy").reshape(-1)
    np.testing.assert_array_equal(pipe(steps=3, seed=0), pipe(cond=null, steps=3, seed=0))


def test_text_prompts_go_through_the_onnx_text_encoder(cond):
    pipe = Pipeline.from_dir(cond)
    prompts = ["a red ball moving left", "blue cube"]
    emb = pipe.encode_text(prompts)
    table = np.random.default_rng(0).standard_normal((len(VOCAB), COND_DIM)).astype(np.float32)
    expected = np.stack([table[[VOCAB.index(w) for w in p.split()]].mean(0) for p in prompts])
    np.testing.assert_allclose(emb, expected, rtol=1e-6, atol=1e-6)
    video = pipe(text=prompts, cond_scale=2.0, steps=3, seed=0)
    np.testing.assert_array_equal(video, pipe(cond=emb, cond_scale=2.0, steps=3, seed=0))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sampler": "euler"}, "sampler must be one of"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"cond": np.ones((1, COND_DIM + 1), np.float32)}, r"cond must be \(b, 6\)"),
        ({"cond": np.ones((2, COND_DIM), np.float32), "batch_size": 3}, "does not match the 2 rows"),
        ({"cond": np.ones(COND_DIM, np.float32), "text": "a"}, "either `cond` or `text`"),
        ({"noise": np.zeros((1, 3, 4, 8, 9), np.float32)}, "noise has shape"),
        ({"steps": 0}, "steps must be an integer"),
        ({"steps": TIMESTEPS + 1}, "steps must be an integer"),
    ],
)
def test_bad_arguments_are_clear_value_errors(cond, kwargs, message):
    pipe = Pipeline.from_dir(cond)
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)


def test_unconditional_model_refuses_cond(uncond):
    with pytest.raises(ValueError, match="unconditional"):
        Pipeline.from_dir(uncond)(cond=np.ones(4, np.float32))
    with pytest.raises(ValueError, match="unconditional model .no cond_dim.: it samples without prompts"):
        Pipeline.from_dir(uncond).encode_text("a")


# ---------------------------------------------------------------- validation --


def flip_byte(path: Path, offset: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda d: flip_byte(d / "denoiser.onnx"), "denoiser.onnx does not match the sha256"),
        (lambda d: flip_byte(d / "null_cond_emb.npy"), "null_cond_emb.npy does not match the sha256"),
        (lambda d: flip_byte(d / "text_encoder" / "tokenizer.json", 5), "tokenizer.json does not match"),
        (lambda d: (d / "denoiser.onnx").unlink(), "listed in vdeploy.json but missing"),
        (lambda d: (d / "vdeploy.json").write_text("{not json"), "cannot read"),
        (lambda d: (d / "vdeploy.json").unlink(), "has no vdeploy.json"),
        (lambda d: edit_manifest(d, lambda m: m.update(format_version=3)), "format version 3.*upgrade vdeploy"),
        (lambda d: edit_manifest(d, lambda m: m["files"].update({"denoiser.onnx": "0" * 64})), "does not match"),
        (lambda d: edit_manifest(d, lambda m: m["files"].pop("null_cond_emb.npy")), "without a sha256"),
        (lambda d: edit_manifest(d, lambda m: m.pop("schedule")), "lacks the key .schedule."),
        (lambda d: edit_manifest(d, lambda m: m["config"].update(image_size=16)),
         r"is \['batch', 3, 4, 8, 8\], but the config says \(batch, 3, 4, 16, 16\)"),
        (lambda d: edit_manifest(d, lambda m: m["config"].update(timesteps=40)), "schedule.timesteps is 50 but config.timesteps is 40"),
        (lambda d: edit_manifest(d, lambda m: m["schedule"].update(betas=[0.5] * 49)), "schedule.betas has 49 values"),
        (lambda d: edit_manifest(d, lambda m: m["conditioning"].update(cond_dim=7)), r"inputs\[cond\].shape is"),
        (lambda d: edit_manifest(d, lambda m: m["graphs"]["denoiser"]["inputs"][2].update(name="c")),
         "but the manifest lists"),
    ],
)
def test_tampered_or_inconsistent_model_dirs_are_refused(tamper, message):
    folder = model_dir("cond")
    Pipeline.from_dir(folder, backend="cpu")  # loads before the tampering
    tamper(folder)
    with pytest.raises(ManifestError, match=message):
        Pipeline.from_dir(folder, backend="cpu")


def test_missing_directory_and_unavailable_backends(tmp_path, uncond):
    with pytest.raises(ManifestError, match="does not exist"):
        Pipeline.from_dir(tmp_path / "nope")
    with pytest.raises(BackendUnavailable, match=r"vdeploy\[gpu\]"):
        Pipeline.from_dir(uncond, backend="cuda")
    tensorrt_missing = True
    try:
        import tensorrt  # noqa: F401

        tensorrt_missing = False
    except ImportError:
        pass
    if tensorrt_missing:
        with pytest.raises(BackendUnavailable, match=r"pip install 'vdeploy\[tensorrt\]'"):
            Pipeline.from_dir(uncond, backend="tensorrt")
    with pytest.raises(ManifestError, match="no fp16 denoiser graph"):
        Pipeline.from_dir(uncond, backend="cpu", precision="fp16")
    with pytest.raises(ValueError, match="backend must be"):
        Pipeline.from_dir(uncond, backend="gpu")


# ------------------------------------------------------------------- threads --


def test_concurrent_calls_equal_sequential_calls(exported_model):  # noqa: F811
    pipe = Pipeline.from_dir(exported_model.dir)
    conds = np.random.default_rng(0).standard_normal((4, COND_DIM)).astype(np.float32)
    jobs = [  # every sampler; the fused cfg graph (scale != 1) and the plain one (scale 1)
        dict(seed=0, cond=conds[0], cond_scale=1.0, sampler="dpmpp", steps=6),
        dict(seed=1, cond=conds[1], cond_scale=2.0, sampler="ddim", steps=6, eta=0.5),
        dict(seed=2, cond=conds[2], cond_scale=3.0, sampler="ddpm", steps=10),
        dict(seed=3, cond=conds[3], cond_scale=4.0, sampler="dpmpp", steps=6),
    ]
    sequential = [pipe(**job) for job in jobs]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(lambda job: pipe(**job), jobs))
    for a, b in zip(sequential, concurrent):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------- torch-free --


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_runtime_imports_and_samples_with_torch_blocked(cond):
    expected = Pipeline.from_dir(cond)(text="a red ball", cond_scale=2.0, steps=4, seed=11)
    np.save(cond.parent / "expected.npy", expected)
    result = run_python(f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        import numpy as np
        import vdeploy.runtime
        from vdeploy.runtime import Pipeline, save_gif
        video = Pipeline.from_dir({str(cond)!r})(text="a red ball", cond_scale=2.0, steps=4, seed=11)
        assert np.array_equal(video, np.load({str(cond.parent / "expected.npy")!r}))
        save_gif(video, {str(cond.parent / "torchfree.gif")!r})
        loaded = sorted(m for m in sys.modules if m == "vdeploy" or m.startswith("vdeploy."))
        assert all(m == "vdeploy" or m.startswith("vdeploy.runtime") for m in loaded), loaded
        print("ok", loaded)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_missing_onnxruntime_names_the_extra_to_install(uncond):
    result = run_python(f"""
        import sys
        sys.modules["onnxruntime"] = None
        sys.modules["openvino"] = None  # OpenVINO, where installed, runs without onnxruntime
        from vdeploy.runtime import Pipeline
        Pipeline.from_dir({str(uncond)!r})
    """)
    assert result.returncode != 0
    assert "onnxruntime is not installed: pip install 'vdeploy[cpu]' (or 'vdeploy[gpu]'" in result.stderr
