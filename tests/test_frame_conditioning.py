"""Training-free frame conditioning (runtime/frame_conditioning.py): replacement and RePaint resampling over the step
machines, Pipeline(frames=...), Pipeline.extend."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from vdeploy.runtime.frame_conditioning import conditioned_steps, known_frames, resamplers
from vdeploy.runtime.samplers import SAMPLERS, drive
from vdeploy.runtime.schedule import cosine_beta_schedule

from export_fixtures import exported_model  # noqa: F401  (session fixture)
from runtime_fixtures import model_dir

T = 50
BETAS = cosine_beta_schedule(T)
ABAR = np.cumprod(1 - BETAS)
SHAPE = (2, 3, 4, 8, 8)


def toy_denoise(x, t, cond):
    """A smooth stand-in for a model that mixes frames: eps = tanh(x + mean over frames) * t / (t + 1)."""
    return (np.tanh(x + x.mean(axis=2, keepdims=True)) * (t / (t + 1.0)).reshape(-1, 1, 1, 1, 1)).astype(np.float32)


def _known(k=2, seed=0):
    frames = np.random.default_rng(seed).uniform(0, 1, (1, 3, k, 8, 8)).astype(np.float32)
    return frames, known_frames(frames, None, SHAPE)


def _x(seed=0):
    return np.random.default_rng(seed).standard_normal(SHAPE, dtype=np.float32)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_keeps_the_known_frames_and_replaces_before_each_call(sampler):
    frames, (known, mask) = _known()
    draws = [np.random.default_rng(100 + i).standard_normal(SHAPE, dtype=np.float32) for i in range(40)]
    seen = []

    def denoise(x, t, cond):
        seen.append((x.copy(), int(t[0])))
        return toy_denoise(x, t, cond)

    x_T = _x()
    x_T_before = x_T.copy()
    kwargs = {"rng": np.random.default_rng(1)} if SAMPLERS[sampler].draws_noise else {}
    machine = conditioned_steps(sampler, x_T, BETAS, known=known, mask=mask, known_noise=iter(draws), steps=8, **kwargs)
    x0 = drive(machine, denoise)
    assert np.array_equal(x_T, x_T_before), "the caller's starting noise was written into"
    assert len(seen) == 8
    video = np.clip((x0 + 1) / 2, 0, 1)
    np.testing.assert_allclose(video[:, :, :2], np.broadcast_to(frames, (2, 3, 2, 8, 8)), atol=1e-6)
    # before call i the known frames are q(x_t | x0) with the i-th conditioning draw
    for i, (x, t) in enumerate(seen):
        want = np.sqrt(ABAR[t]) * known + np.sqrt(1 - ABAR[t]) * draws[i]
        np.testing.assert_allclose(x[:, :, :2], want[:, :, :2], atol=1e-5, err_msg=f"{sampler} call {i}")
    # the unknown frames differ from an unconditioned run from the same noise (the known frames reach them)
    plain = drive(SAMPLERS[sampler].stepper(x_T, BETAS, steps=8, **({"rng": np.random.default_rng(1)}
                                                                     if SAMPLERS[sampler].draws_noise else {})),
                  toy_denoise)
    assert not np.allclose(plain[:, :, 2:], x0[:, :, 2:], atol=1e-4)


@pytest.mark.parametrize("sampler,eta", [("ddpm", None), ("ddim", 0.0), ("ddim", 0.5)])
def test_resampling_redoes_each_step_but_the_last(sampler, eta):
    _, (known, mask) = _known()
    calls = []

    def denoise(x, t, cond):
        calls.append(int(t[0]))
        return toy_denoise(x, t, cond)

    opts = {"eta": eta} if eta is not None else {}
    run = lambda seed: drive(conditioned_steps(sampler, _x(), BETAS, known=known, mask=mask, resample=2,  # noqa: E731
                                               rng=np.random.default_rng(seed), steps=6, **opts), denoise)
    a = run(0)
    assert len(calls) == 6 + 2 * 5
    steps = [t for i, t in enumerate(calls) if i == 0 or t != calls[i - 1]]
    assert len(steps) == 6 and all(calls.count(t) == 3 for t in steps[:-1]) and calls.count(steps[-1]) == 1
    assert np.array_equal(a, run(0)) and not np.array_equal(a, run(1))
    np.testing.assert_allclose(a[:, :, :2], known[:, :, :2], atol=1e-6)


@pytest.mark.parametrize("sampler", sorted(set(SAMPLERS) - set(resamplers())))
def test_resampling_is_refused_for_multistep_samplers(sampler):
    _, (known, mask) = _known()
    with pytest.raises(ValueError, match="single-step sampler .*resample=0"):
        conditioned_steps(sampler, _x(), BETAS, known=known, mask=mask, resample=1)
    with pytest.raises(ValueError, match="resample must be an integer"):
        conditioned_steps("ddpm", _x(), BETAS, known=known, mask=mask, resample=-1)


def test_the_redo_steps_are_the_samplers_own_steps():
    """ddpm's and ddim's redo from level t_i to t_{i+1} reproduce the machine's own step (float32 round-off)."""
    z = np.random.default_rng(5).standard_normal(SHAPE, dtype=np.float32)
    for name, opts in [("ddpm", {"noise": iter([z] * 6)}), ("ddim", {"eta": 0.0}),
                       ("ddim", {"eta": 0.7, "noise": iter([z] * 6)})]:
        redo = SAMPLERS[name].level_step
        machine = SAMPLERS[name].stepper(_x(), BETAS, steps=6, **opts)
        r0 = next(machine)
        x0 = r0.x.copy()
        eps = toy_denoise(r0.x, r0.t, None)
        r1 = machine.send(eps)
        a_t, a_s = ABAR[r0.t[0]], ABAR[r1.t[0]]
        got = redo(x0, eps, a_t, a_s, lambda: z, eta=opts.get("eta", 0.0), clip_denoised=True)
        np.testing.assert_allclose(got, r1.x, atol=5e-5, err_msg=name)


def test_known_frames_validation():
    frames = np.zeros((3, 2, 8, 8), np.float32)
    x0, mask = known_frames(frames, None, SHAPE)
    assert x0.shape == SHAPE and mask.shape == (2, 1, 4, 1, 1) and mask[:, 0, :, 0, 0].tolist() == [[1, 1, 0, 0]] * 2
    u8 = known_frames(np.full((3, 1, 8, 8), 255, np.uint8), None, SHAPE)[0]
    assert np.all(u8[:, :, 0] == 1) and np.all(u8[:, :, 1:] == 0)
    full = np.zeros((3, 4, 8, 8), np.float32)
    _, m = known_frames(full, np.array([True, False, False, True]), SHAPE)
    assert m[0, 0, :, 0, 0].tolist() == [True, False, False, True]
    bad = [
        (np.zeros((1, 2, 8, 8)), None, "1 channels of 8x8; this model samples 3 channels of 8x8"),
        (np.zeros((3, 2, 16, 16)), None, "3 channels of 16x16"),
        (np.zeros((3, 4, 8, 8)), None, "give 1 to 3 first frames"),
        (np.zeros((3, 2, 8)), None, "must be \\(c, k, h, w\\)"),
        (np.zeros((3, 3, 2, 8, 8)), None, "3 rows for 2 videos"),
        (np.full((3, 2, 8, 8), 2.0), None, "must be in \\[0, 1\\]"),
        (np.full((3, 2, 8, 8), np.nan), None, "NaN"),
        (full, np.array([1, 0, 0, 0]), "known_mask must be booleans"),
        (full, np.array([True, False]), "known_mask must be \\(4,\\)"),
        (full, np.ones(4, bool), "at least one frame known and one unknown"),
        (frames, np.array([True, False, False, False]), "full 4-frame video"),
    ]
    for f, m, msg in bad:
        with pytest.raises(ValueError, match=msg):
            known_frames(f, m, SHAPE)


@pytest.fixture(scope="module")
def pipe():
    from vdeploy.runtime import Pipeline

    return Pipeline.from_dir(model_dir("uncond"), backend="cpu")


@pytest.mark.parametrize("sampler,resample", [("ddpm", 0), ("ddim", 1), ("dpmpp", 0)])
def test_pipeline_frames_seeded_and_kept(pipe, sampler, resample):
    c, f, h, w = pipe.shape
    frames = np.random.default_rng(0).uniform(0, 1, (2, c, 2, h, w)).astype(np.float32)
    run = lambda seed: pipe(frames=frames, sampler=sampler, steps=5, seed=seed, resample=resample)  # noqa: E731
    a = run(0)
    assert a.shape == (2, c, f, h, w)
    np.testing.assert_allclose(a[:, :, :2], frames, atol=1e-6)
    assert np.array_equal(a, run(0)) and not np.array_equal(a[:, :, 2:], run(1)[:, :, 2:])


def test_pipeline_errors(pipe):
    c, f, h, w = pipe.shape
    with pytest.raises(ValueError, match="this model samples 3 channels of 8x8"):
        pipe(frames=np.zeros((c, 1, 2 * h, 2 * w)), steps=2)
    with pytest.raises(ValueError, match="need `frames`"):
        pipe(resample=1, sampler="ddpm", steps=2)
    with pytest.raises(ValueError, match="'dpmpp' is multistep"):
        pipe(frames=np.zeros((c, 1, h, w)), resample=1, steps=2)
    with pytest.raises(ValueError, match="Pipeline.extend"):
        pipe(frames=np.zeros((c, f + 2, h, w)), steps=2)


def test_extend_makes_a_longer_video_keeping_the_start(pipe):
    c, f, h, w = pipe.shape
    start = pipe(sampler="ddim", steps=3, seed=0)
    long = pipe.extend(start, frames=11, overlap=2, sampler="ddim", steps=3, seed=0)
    assert long.shape == (1, c, 11, h, w)
    assert np.array_equal(long[:, :, :f], start)
    assert np.array_equal(long, pipe.extend(start, frames=11, overlap=2, sampler="ddim", steps=3, seed=0))
    fresh = pipe.extend(None, frames=6, overlap=3, sampler="ddim", steps=3, seed=1, batch_size=2)
    assert fresh.shape == (2, c, 6, h, w)
    with pytest.raises(ValueError, match="overlap must be 1 to 3"):
        pipe.extend(start, frames=8, overlap=f)
    with pytest.raises(ValueError, match=">= the video's 4 frames"):
        pipe.extend(start, frames=3, overlap=1)
    with pytest.raises(ValueError, match="sets each window's known_mask"):
        pipe.extend(start, 8, 1, known_mask=None)


def test_conditioning_is_torch_free():
    code = "import sys; sys.modules['torch'] = None; import vdeploy.runtime.frame_conditioning, vdeploy.runtime"
    subprocess.run([sys.executable, "-c", code], check=True)


def _flat_gif(path, frames=3, size=16):
    """A GIF of flat colours (few colours: resizing and GIF round trips keep it exact)."""
    from vdeploy.data import write_gif

    clip = np.zeros((frames, size, size, 3), np.uint8)
    for i in range(frames):
        clip[i, :, :] = (40 * i, 200, 60)
    return write_gif(clip, path)


def test_cli_sample_init_gif_png_length_and_errors(tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from vdeploy.cli import main
    from vdeploy.data import read_gif

    folder = str(model_dir("uncond"))
    gif = _flat_gif(tmp_path / "in.gif")
    run = lambda *args: CliRunner().invoke(main, ["sample", "--model", folder, "--quiet", "--seed", "0",  # noqa: E731
                                                   "--steps", "3", *args])
    out = tmp_path / "out.gif"
    result = run("--out", str(out), "--init", str(gif), "--init-frames", "2", "--sampler", "ddim", "--resample", "1")
    assert result.exit_code == 0, result.output
    video = read_gif(out).astype(int)  # one video: written at the model's size
    assert video.shape == (4, 8, 8, 3)
    # the GIF's last two frames, resized 16 -> 8 (x * 255 truncates: within 1)
    assert np.abs(video[:2] - read_gif(gif)[1:, :8, :8]).max() <= 1
    png = tmp_path / "first.png"
    Image.fromarray(read_gif(gif)[0]).save(png)
    result = run("--out", str(out), "--init", str(png), "--length", "7")
    assert result.exit_code == 0, result.output
    video = read_gif(out).astype(int)
    assert video.shape[0] == 7 and np.abs(video[0] - read_gif(gif)[0, :8, :8]).max() <= 1
    for args, msg in [
        (["--init", str(gif), "--init-frames", "4"], "at most 3 can be known"),
        (["--init", str(png), "--init-frames", "2"], "has 1 frame"),
        (["--resample", "2"], "--resample needs --init"),
        (["--init", str(tmp_path / "x.jpg")], "must be a .gif or .png"),
        (["--init", str(gif), "--resample", "1"], "'dpmpp' is multistep"),
        (["--init", str(tmp_path / "none.gif")], "no such file"),
    ]:
        result = run("--out", str(out), *args)
        assert result.exit_code == 2 and msg in result.output, (args, result.output)


def test_cli_sample_init_never_imports_torch(tmp_path):
    gif = _flat_gif(tmp_path / "in.gif")
    out = tmp_path / "s.gif"
    code = (f"import sys; sys.modules['torch'] = None; from vdeploy.cli import main; "
            f"main(['sample', '--model', {str(model_dir('uncond'))!r}, '--out', {str(out)!r}, '--init', {str(gif)!r}, "
            f"'--steps', '2', '--quiet', '--length', '6'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.is_file()


@pytest.mark.parametrize("sampler,steps,resample,cond_scale", [
    ("ddpm", None, 1, 1.0),   # the seed's q_sample/p_sample loop, every training step, RePaint in torch
    ("ddim", 5, 1, 2.0),      # the wrapper around the torch denoiser, fused --cfg graph on the runtime side
    ("dpmpp", 5, 0, 1.0),
])
def test_parity_with_torch_from_the_same_noise(exported_model, sampler, steps, resample, cond_scale):
    from export_fixtures import single_thread_torch
    from vdeploy.export.parity import run_conditioned_parity

    single_thread_torch()
    report = run_conditioned_parity(exported_model.dir, exported_model.ckpt, sampler=sampler, steps=steps,
                                    resample=resample, cond_scale=cond_scale, batch_size=2)
    n = report["steps"]
    assert report["calls"] == report["torch_calls"] == n + resample * (n - 1)
    assert report["max_per_call_abs_err"] <= 1e-3 and report["final_max_abs_err"] <= 1e-3, report
    assert report["known_frames_max_abs_err"] <= 1e-6 and report["passed"]
