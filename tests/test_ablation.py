"""The issue-22 measurement scripts: ``benchmarks/frame_conditioning.py`` (end to end on a tiny text-conditioned model
directory) and ``benchmarks/ablation.py`` (the demo's recipe, the targets, the table)."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime_fixtures import model_dir

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


fc = _load("frame_conditioning")
ablation = _load("ablation")


def test_ablation_trains_what_make_demo_trains():
    """The driver's recipe plus its demo arm's flags is the Makefile demo target's `vdeploy train` line (less
    data/results/config paths), and the demo preset is that arm's config."""
    from vdeploy import config as vconfig

    assert vconfig.resolve(vconfig.PRESETS["demo"]) == vconfig.resolve(ablation.arm_config(
        ablation.ARMS[ablation.DEMO_ARM]))
    assert "--config demo" in (ROOT / "Makefile").read_text()
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if "$(VDEPLOY) train" in ln)
    steps = re.search(r"^DEMO_STEPS \?= (\d+)", text, re.M).group(1)
    words = shlex.split(line.replace("$(DEMO_STEPS)", steps))[2:]
    pairs, i = {}, 0
    while i < len(words):
        flag = words[i]
        value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else None
        pairs[flag] = value
        i += 2 if value is not None else 1
    for path_flag in ("--data", "--results", "--config"):
        pairs.pop(path_flag, None)
    recipe, i = {}, 0
    words = ablation.DEMO_TRAIN + list(ablation.ARMS[ablation.DEMO_ARM].flags)
    while i < len(words):
        value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else None
        recipe[words[i]] = value
        i += 2 if value is not None else 1
    assert recipe == pairs


def test_the_init_path_reads_the_known_frames_back_exactly(tmp_path):
    """A synthetic clip's frames survive the GIF and `vdeploy sample --init`'s reader bit for bit, so the
    continuation table measures the model, not the file format."""
    from vdeploy.cli_runtime import _read_init
    from vdeploy.runtime import save_gif

    for clip, _ in fc.held_out_clips(12, 8, 16, seed=1234):  # the benchmark's clips (up to --clips 12)
        save_gif(clip[:, :4], tmp_path / "c.gif")
        assert np.array_equal(_read_init(tmp_path / "c.gif", (3, 8, 16, 16), 4), clip[:, :4])


def test_scores_tell_truth_from_a_cross_fade():
    clips = fc.held_out_clips(4, 8, 16, seed=7)
    truth = fc.score_predictions([c for c, _ in clips], clips, range(1, 7))
    assert truth["centroid_error_px"] == 0 and truth["one_object"] == 1 and truth["direction_ok"] == 1
    ramp = np.linspace(0, 1, 8, dtype=np.float32)[None, :, None, None]
    fades = [(1 - ramp) * c[:, :1] + ramp * c[:, -1:] for c, _ in clips]
    fade = fc.score_predictions(fades, clips, range(1, 7))
    assert fade["one_object"] < 1  # two ghosts in the middle frames
    assert [row[2] for row in fade["per_clip_one_object"]] == [0] * 4  # frame 3 of 8: ghosts at 4/7 and 3/7
    assert truth["per_clip_one_object"] == [[1] * 6] * 4


def test_targets_compare_the_default_samplers_rows():
    report = {"adherence": {"dpmpp": {"adherence": 0.9375, "clean": 0.85}, "ddpm": {"adherence": 0.0, "clean": 0}},
              "interpolation": {"trained (masked conditioning)": {"centroid_error_px": 0.8, "one_object": 0.9},
                                "replacement": {"centroid_error_px": 5.0, "one_object": 1.0}},
              "init_path": {"dpmpp": {"centroid_error_px": 1.0, "one_object": 1.0}}}
    got = {name: r["met"] for name, r in fc.targets(report).items()}
    assert got == {"adherence": True, "clean": False, "interpolation_one_object": False, "interpolation_px": True,
                   "continuation_px": True, "continuation_one_object": True}


def test_benchmark_end_to_end_and_the_ablation_table(tmp_path, capsys):
    """Every table on a tiny text-conditioned model (4 frames, 8 px), its JSON read back by the ablation table."""
    arm = tmp_path / "runs" / "v_minsnr"
    arm.mkdir(parents=True)
    (arm / "config.json").write_text(json.dumps({"prediction_type": "v", "loss_weighting": "min_snr"}))
    (arm / "train_time.json").write_text(json.dumps({"train_seconds": 90.0}))
    out = arm / "fc_s2_r0.7.json"
    assert fc.main(["--model", str(model_dir("cond")), "--samplers", "dpmpp", "--init-samplers", "dpmpp,ddim",
                    "--seeds", "0", "--clips", "2", "--known", "2", "--sampler", "ddim", "--steps", "3",
                    "--resample", "1", "--rescale", "0.7", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["init_path"]) == {"dpmpp", "ddim", "baseline: freeze the last known frame"}
    assert set(report["interpolation"]) == {"replacement", "resampling (n=1)", "baseline: cross-fade first to last"}
    assert report["adherence"]["dpmpp"]["pairs"] == 4 and report["args"]["rescale"] == 0.7
    assert set(report["targets"]) == set(fc.TARGETS)
    assert "### Targets" in capsys.readouterr().out
    text = ablation.table(ablation.collect(tmp_path / "runs"))
    row = next(ln for ln in text.splitlines() if ln.startswith("| v_minsnr | v | min_snr | l1 | no | none | 0 | 2 | 0.7 |"))
    assert row.endswith("| 1.5 |")  # training minutes
    assert json.loads((arm / "arm.json").read_text())["measures"]["fc_s2_r0.7"]["args"]["cond_scale"] == 2


def test_rescale_samples_only_with_guidance():
    from vdeploy.runtime import Pipeline

    pipe = Pipeline.from_dir(model_dir("cond"), backend="cpu")
    run = dict(text=["a red ball moving left"], sampler="ddim", steps=3, seed=0)
    assert np.array_equal(fc.sample(pipe, 0.7, cond_scale=1.0, **run), pipe(cond_scale=1.0, **run))
    guided = fc.sample(pipe, 0.0, cond_scale=4.0, **run)
    rescaled = fc.sample(pipe, 1.0, cond_scale=4.0, **run)
    assert rescaled.shape == guided.shape and not np.array_equal(rescaled, guided)
    with pytest.raises(ValueError, match="rescale"):
        fc.sample(pipe, 2.0, cond_scale=4.0, **run)
