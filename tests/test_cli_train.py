"""``vdeploy data synth`` and ``vdeploy train``: help, one-line errors with exit code 2, a tiny run and its resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from vdeploy.cli import main

TINY = {"dim": 8, "dim_mults": [1, 2], "attn_heads": 2, "attn_dim_head": 8, "image_size": 16, "num_frames": 4,
        "timesteps": 5}



@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    result = CliRunner().invoke(main, ["data", "synth", str(d), "--num", "4", "--frames", "4", "--size", "16"])
    assert result.exit_code == 0, result.output
    assert "wrote 4 clips" in result.output
    return d


@pytest.fixture
def tiny_json(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


def test_help_lists_the_commands_without_importing_torch():
    code = ("import sys; from vdeploy.cli import main\n"
            "try: main(['--help'])\nexcept SystemExit as e: assert e.code == 0\n"
            "assert 'torch' not in sys.modules, 'vdeploy --help imported torch'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "data" in out and "train" in out


def test_train_help_documents_the_options():
    result = CliRunner().invoke(main, ["train", "--help"])
    assert result.exit_code == 0
    for option in ("--data", "--results", "--config", "--steps", "--batch-size", "--lr", "--grad-accum", "--amp",
                   "--save-every", "--resume", "--text-encoder"):
        assert option in result.output
    from vdeploy.config import PRESETS

    assert f"({', '.join(PRESETS)})" in " ".join(result.output.split())


def test_data_synth_help():
    result = CliRunner().invoke(main, ["data", "synth", "--help"])
    assert result.exit_code == 0 and "--num" in result.output and "moving" in result.output


def _run_error(args):
    """Run the real console entry point and return (exit code, stderr lines)."""
    proc = subprocess.run([sys.executable, "-m", "vdeploy.cli", *args], capture_output=True, text=True)
    return proc.returncode, proc.stderr.strip().splitlines()


@pytest.mark.parametrize("case, message", [
    ("missing-option", "Missing option '--data'"),
    ("missing-folder", "does not exist"),
    ("empty-folder", "no .gif files found"),
    ("bad-json", "cannot read config"),
    ("unknown-key", "unknown config key(s): bogus"),
    ("frames-too-many", "wants num_frames=8 but videos in"),
    ("bad-number", "Invalid value for '--steps'"),
    ("resume-nothing", "--resume: no checkpoint"),
])
def test_bad_input_is_one_line_and_exit_code_2(case, message, tmp_path, data_dir, tiny_json):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    (tmp_path / "empty").mkdir()
    args = {
        "missing-option": ["train"],
        "missing-folder": ["train", "--data", str(tmp_path / "nope")],
        "empty-folder": ["train", "--data", str(tmp_path / "empty")],
        "bad-json": ["train", "--data", str(data_dir), "--config", str(bad_json)],
        "unknown-key": ["train", "--data", str(data_dir), "--config", str(_json(tmp_path / "bogus.json", {**TINY, "bogus": 1}))],
        "frames-too-many": ["train", "--data", str(data_dir), "--config", str(_json(tmp_path / "f8.json", {**TINY, "num_frames": 8}))],
        "bad-number": ["train", "--data", str(data_dir), "--steps", "many"],
        "resume-nothing": ["train", "--data", str(data_dir), "--results", str(tmp_path / "r"), "--resume"],
    }[case]
    code, lines = _run_error(args)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], lines


def _json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_train_then_resume(data_dir, tmp_path, tiny_json):
    runner = CliRunner()
    results = tmp_path / "results"
    args = ["train", "--data", str(data_dir), "--results", str(results), "--config", str(tiny_json),
            "--batch-size", "2", "--save-every", "2", "--sample-rows", "1", "--quiet"]
    first = runner.invoke(main, [*args, "--steps", "2", "--ema-start", "1", "--ema-every", "1", "--lr", "5e-4"])
    assert first.exit_code == 0, first.output
    assert "4 videos (4 captioned)" in first.output and "final loss" in first.output
    assert (results / "model-1.pt").is_file() and (results / "sample-last.gif").is_file()
    with open(results / "log.jsonl", "a") as log:  # a crash after the checkpoint logged a step it lost
        log.write(json.dumps({"step": 3, "loss": 1.0}) + "\n")

    again = runner.invoke(main, ["train", "--data", str(data_dir), "--results", str(results), "--resume",
                                 "--steps", "4", "--quiet"])
    assert again.exit_code == 0, again.output
    assert "steps 2 -> 4" in again.output  # the config came from the checkpoint
    raw = torch.load(results / "model-last.pt", weights_only=True)
    assert raw["step"] == 4 and raw["config"]["dim"] == TINY["dim"]
    # settings not given again are the first run's; the one given (--steps) wins
    kept = raw["trainer"]
    assert (kept["train_batch_size"], kept["step_start_ema"], kept["update_ema_every"], kept["train_lr"],
            kept["num_sample_rows"], kept["train_num_steps"]) == (2, 1, 1, 5e-4, 1, 4)
    steps = [json.loads(line)["step"] for line in (results / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]

    other = runner.invoke(main, [*args, "--resume", "--config", "tiny"])
    assert other.exit_code == 2 and "differs from the config" in other.output

    # an earlier run is never overwritten by accident
    fresh = runner.invoke(main, [*args, "--steps", "2"])
    assert fresh.exit_code == 2 and "holds checkpoints of an earlier run" in fresh.output
    assert torch.load(results / "model-last.pt", weights_only=True)["step"] == 4
    fresh = runner.invoke(main, [*args, "--steps", "2", "--overwrite"])
    assert fresh.exit_code == 0, fresh.output
    assert not (results / "model-2.pt").exists()
    assert len((results / "log.jsonl").read_text().splitlines()) == 2


def test_ctrl_c_saves_a_checkpoint_that_resumes(data_dir, tmp_path, tiny_json):
    import time

    results = tmp_path / "results"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vdeploy.cli", "train", "--data", str(data_dir), "--results", str(results),
         "--config", str(tiny_json), "--batch-size", "2", "--steps", "100000", "--save-every", "100000", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    log = results / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.exists() and log.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "continue with --resume" in err and "Traceback" not in err
    raw = torch.load(results / "model-last.pt", weights_only=True)
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert raw["step"] == steps[-1] >= 2  # saved at a step boundary, nothing lost
