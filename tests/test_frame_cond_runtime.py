"""Trained masked frame conditioning, export and runtime half: the graphs take ``frames``/``mask`` by role, the
runtime feeds them (zeros for generation), ``conditioning="trained"`` is picked where the model has it, the serving
batcher mixes conditioned and plain rows, and runtime and torch agree from the same noise."""

from __future__ import annotations

import json

import numpy as np
import pytest

from export_fixtures import TINY_EXPORT_CONFIG, single_thread_torch, tiny_unet, write_vdeploy_checkpoint

FRAMED_CONFIG = {**TINY_EXPORT_CONFIG, "frame_conditioning": True}


@pytest.fixture(scope="module")
def framed(tmp_path_factory):
    """A tiny text-conditioned, frame-conditioned model exported with the fused --cfg graph."""
    from vdeploy.export import export_onnx

    single_thread_torch()
    root = tmp_path_factory.mktemp("framed")
    unet, config = tiny_unet(FRAMED_CONFIG)
    ckpt = write_vdeploy_checkpoint(root / "model-7.pt", unet, config)
    export_onnx(ckpt, root / "model", cfg=True, optimize="none")
    return root / "model", ckpt, unet


@pytest.fixture(scope="module")
def pipe(framed):
    from vdeploy.runtime import Pipeline

    return Pipeline.from_dir(framed[0], backend="cpu")


def _frames(pipe, k=2, rows=2, seed=0):
    c, f, h, w = pipe.shape
    return np.random.default_rng(seed).uniform(0, 1, (rows, c, k, h, w)).astype(np.float32)


def test_every_graph_takes_frames_and_mask_by_role(framed):
    from vdeploy.runtime import manifest

    m = manifest.load(framed[0])
    f = FRAMED_CONFIG["num_frames"]
    for name in ("denoiser", "denoiser_cfg"):
        graph = m.graphs[name]
        assert graph.input("frames").shape == ("batch", 3, f, "height", "width")
        assert graph.input("mask").shape == ("batch", f)
        assert max(m.parity[name]["max_abs_err"].values()) <= 1e-4, m.parity[name]


def test_a_config_without_frame_conditioning_refuses_graphs_with_the_inputs(framed, tmp_path):
    import shutil

    from vdeploy.runtime import manifest

    copy = tmp_path / "m"
    shutil.copytree(framed[0], copy)
    data = json.loads((copy / "vdeploy.json").read_text())
    data["config"]["frame_conditioning"] = False
    (copy / "vdeploy.json").write_text(json.dumps(data))
    with pytest.raises(manifest.ManifestError, match="frame_conditioning is not true"):
        manifest.load(copy, verify=False)
    data["config"]["frame_conditioning"] = True
    for graph in data["graphs"].values():
        graph["inputs"] = [i for i in graph["inputs"] if i["role"] != "mask"]
    (copy / "vdeploy.json").write_text(json.dumps(data))
    with pytest.raises(manifest.ManifestError, match="lack the role"):
        manifest.load(copy, verify=False)


def test_generation_feeds_zeros_and_matches_torch(pipe, framed):
    import torch

    unet = framed[2]
    c, f, h, w = pipe.shape
    x = np.random.default_rng(1).standard_normal((2, c, f, h, w), dtype=np.float32)
    t = np.array([3, 17])
    cond = np.random.default_rng(2).standard_normal((2, 6), dtype=np.float32)
    eps = pipe.denoiser()(x, t, cond)
    with torch.no_grad():
        want = unet(torch.from_numpy(x), torch.from_numpy(t), cond=torch.from_numpy(cond)).numpy()
    np.testing.assert_allclose(eps, want, atol=1e-4)
    known = np.random.default_rng(3).uniform(-1, 1, x.shape).astype(np.float32)
    mask = np.array([[1, 1, 0, 0], [1, 0, 0, 1]], np.float32)
    framed_eps = pipe.denoiser()(x, t, cond, frames=known, mask=mask)
    with torch.no_grad():
        want = unet(torch.from_numpy(x), torch.from_numpy(t), cond=torch.from_numpy(cond),
                    frames=torch.from_numpy(known), mask=torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(framed_eps, want, atol=1e-4)
    assert np.abs(framed_eps - eps).max() > 1e-3, "the known frames did not reach the graph"


def test_frames_use_the_trained_method_by_default(pipe):
    frames = _frames(pipe)
    run = pipe.prepare(frames=frames, sampler="ddim", steps=4, seed=0)
    assert run.conditioning == "trained"
    assert pipe.prepare(frames=frames, sampler="ddim", steps=4, seed=0, conditioning="replacement").conditioning == \
        "replacement"
    trained = pipe(frames=frames, sampler="ddim", steps=4, seed=0, cond_scale=2.0)
    replaced = pipe(frames=frames, sampler="ddim", steps=4, seed=0, cond_scale=2.0, conditioning="replacement")
    np.testing.assert_allclose(trained[:, :, :2], frames, atol=1e-6)
    np.testing.assert_allclose(replaced[:, :, :2], frames, atol=1e-6)
    assert np.abs(trained[:, :, 2:] - replaced[:, :, 2:]).max() > 1e-3
    assert np.array_equal(trained, pipe(frames=frames, sampler="ddim", steps=4, seed=0, cond_scale=2.0))


def test_trained_requests_carry_the_inputs(pipe):
    frames = _frames(pipe, k=3)
    run = pipe.prepare(frames=frames, sampler="dpmpp", steps=3, seed=0)
    request = next(run.machine)
    assert set(request.inputs) == {"frames", "mask"}
    np.testing.assert_array_equal(request.inputs["mask"], [[1, 1, 1, 0]] * 2)
    np.testing.assert_allclose(request.inputs["frames"][:, :, :3], frames * 2 - 1, atol=1e-6)
    assert not request.inputs["frames"][:, :, 3:].any()
    plain = next(pipe.prepare(sampler="dpmpp", steps=3, seed=0).machine)
    assert plain.inputs is None


def test_interpolation_with_a_known_mask(pipe):
    c, f, h, w = pipe.shape
    video = np.random.default_rng(4).uniform(0, 1, (1, c, f, h, w)).astype(np.float32)
    mask = np.array([True, False, False, True])
    out = pipe(frames=video, known_mask=mask, sampler="ddim", steps=3, seed=0)
    np.testing.assert_allclose(out[:, :, [0, 3]], video[:, :, [0, 3]], atol=1e-6)


def test_errors_name_the_problem(pipe):
    from vdeploy.runtime import Pipeline
    from runtime_fixtures import model_dir

    with pytest.raises(ValueError, match="conditioning must be one of auto, trained, replacement"):
        pipe(frames=_frames(pipe), steps=2, conditioning="magic")
    with pytest.raises(ValueError, match="need `frames`"):
        pipe(steps=2, conditioning="trained")
    plain = Pipeline.from_dir(model_dir("uncond"), backend="cpu")
    c, f, h, w = plain.shape
    frames = np.zeros((c, 1, h, w), np.float32)
    with pytest.raises(ValueError, match="not trained with frame conditioning"):
        plain(frames=frames, steps=2, conditioning="trained")
    with pytest.raises(ValueError, match="not trained with frame conditioning"):
        plain.denoiser()(np.zeros((1, c, f, h, w), np.float32), np.array([1]), None,
                         frames=np.zeros((1, c, f, h, w), np.float32), mask=np.zeros((1, f), np.float32))


def test_extend_on_a_trained_model(pipe):
    c, f, h, w = pipe.shape
    start = pipe(sampler="ddim", steps=3, seed=0, text=None)
    long = pipe.extend(start, frames=7, overlap=2, sampler="ddim", steps=3, seed=0)
    assert long.shape == (1, c, 7, h, w) and np.array_equal(long[:, :, :f], start)


def test_batcher_mixes_trained_and_plain_rows(pipe):
    from test_serve_batcher import run_staggered

    frames = _frames(pipe, rows=1)
    cond = np.random.default_rng(5).standard_normal((1, 6), dtype=np.float32)
    jobs = [(0, dict(frames=frames, sampler="ddim", steps=6, seed=0, cond=cond)),
            (1, dict(sampler="ddim", steps=4, seed=1, cond=cond)),
            (2, dict(frames=frames, sampler="dpmpp", steps=4, seed=2, cond=cond, cond_scale=2.0)),
            (2, dict(sampler="dpmpp", steps=4, seed=3, cond=cond, cond_scale=2.0))]
    videos, calls = run_staggered(pipe, jobs, max_batch=8, batching=True)
    # rows per call: 1 per plain request, 2 per guided one (fused graph); the plain and the guided ones batch
    assert max(calls) >= 2 and len(calls) < 6 + 4 + 4 + 4, f"the requests never shared a denoiser call: {calls}"
    for got, (_, kwargs) in zip(videos, jobs):
        np.testing.assert_allclose(got, pipe(**kwargs), atol=1e-4)


@pytest.mark.parametrize("sampler,steps,cond_scale", [("ddpm", None, 1.0), ("dpmpp", 4, 2.0)])
def test_trained_parity_with_torch_from_the_same_noise(framed, sampler, steps, cond_scale):
    from vdeploy.export.parity import run_conditioned_parity

    single_thread_torch()
    report = run_conditioned_parity(framed[0], framed[1], sampler=sampler, steps=steps, cond_scale=cond_scale,
                                    batch_size=2)
    assert report["conditioning"] == "trained"
    assert report["calls"] == report["torch_calls"] == report["steps"]
    assert report["max_per_call_abs_err"] <= 1e-3 and report["final_max_abs_err"] <= 1e-3, report
    assert report["known_frames_max_abs_err"] <= 1e-6 and report["passed"]


def test_cli_sample_init_picks_the_trained_path(framed, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from vdeploy.cli import main

    png = tmp_path / "first.png"
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(png)
    out = tmp_path / "next.gif"
    result = CliRunner().invoke(main, ["sample", "--model", str(framed[0]), "--out", str(out), "--init", str(png),
                                       "--steps", "2", "--quiet", "--seed", "0"])
    assert result.exit_code == 0, result.output
    assert "1 known frame(s) by trained conditioning" in result.output and out.is_file()
    result = CliRunner().invoke(main, ["sample", "--model", str(framed[0]), "--out", str(out), "--steps", "2",
                                       "--conditioning", "trained"])
    assert result.exit_code == 2 and "--conditioning needs --init" in result.output


def test_cli_parity_known_frames(framed, tmp_path):
    from click.testing import CliRunner

    from vdeploy.cli import main

    out = tmp_path / "p.json"
    args = ["parity", "--model", str(framed[0]), "--ckpt", str(framed[1]), "--sampler", "dpmpp", "--steps", "3"]
    result = CliRunner().invoke(main, [*args, "--known", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "2 known frame(s) by trained conditioning" in result.output
    report = json.loads(out.read_text())
    assert report["passed"] and report["conditioning"] == "trained" and report["max_per_call_abs_err"] <= 1e-3
    result = CliRunner().invoke(main, [*args, "--resample", "1"])
    assert result.exit_code == 2 and "--resample needs --known" in result.output
