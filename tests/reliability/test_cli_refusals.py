"""Bad settings at the CLI (issue 11, why 1/5/6/9): every one is refused where it enters, before slow work,
in one ``Error:`` line naming the option or key, the value and what is allowed, with exit code 2 and no
traceback — NaN/Inf floats, unwritable outputs, damaged data, empty embeddings, non-UTF-8 prompts, bad
stored configs, a runtime-only install."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from reliability_support import ROOT, cli_command, cli_env, tiny_config, tiny_data  # noqa: F401 (fixtures)

from vdeploy.cli import main


def one_line_error(result, code: int = 2) -> str:
    """The single ``Error:`` line of a refused CliRunner run (stdout and stderr together)."""
    assert result.exit_code == code, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


FLOATS = [
    ("train", "--lr", "inf"), ("train", "--lr", "nan"), ("train", "--max-grad-norm", "nan"),
    ("train", "--ema-decay", "nan"), ("train", "--cond-scale", "nan"), ("train", "--null-cond-prob", "nan"),
    ("train", "--cond-scale", "-inf"), ("train", "--lr", "1e400"),
    ("sample", "--cond-scale", "nan"), ("sample", "--eta", "nan"), ("sample", "--fps", "inf"),
    ("parity", "--cond-scale", "nan"), ("parity", "--atol", "nan"), ("parity", "--cond-scale", "inf"),
    ("export", "--atol", "nan"), ("export", "--fp16-atol", "inf"),
]
REQUIRED = {"train": ["--data", "."], "sample": ["--model", ".", "--out", "x.gif"],
            "parity": ["--model", ".", "--ckpt", "x.pt"], "export": ["--ckpt", "x.pt", "--out", "m"]}


@pytest.mark.parametrize("command, option, value", FLOATS)
def test_non_finite_floats_are_refused_naming_the_option(command, option, value):
    line = one_line_error(CliRunner().invoke(main, [command, *REQUIRED[command], option, value]))
    assert f"Invalid value for '{option}'" in line, line
    assert "is not a finite number" in line or "is not in the range" in line, line  # inf above a bound: the range


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "100000000"], "Invalid value for '--batch-size': 100000000 is not in the range 1<=x<=4096"),
    (["--sample-rows", "1000"], "Invalid value for '--sample-rows'"),
])
def test_huge_sizes_are_bounded(tiny_data, args, message):  # noqa: F811
    assert message in one_line_error(CliRunner().invoke(main, ["train", "--data", str(tiny_data), *args]))


def test_huge_synth_sizes_are_bounded(tmp_path):
    line = one_line_error(CliRunner().invoke(main, ["data", "synth", str(tmp_path / "d"), "--size", "1000000"]))
    assert "Invalid value for '--size': 1000000 is not in the range 8<=x<=1024" in line
    assert not (tmp_path / "d").exists()


def test_train_refuses_an_unwritable_results_folder_and_a_file_as_data(tiny_data, tmp_path):  # noqa: F811
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    line = one_line_error(CliRunner().invoke(main, ["train", "--data", str(tiny_data), "--results",
                                                   str(blocker / "results")]))
    assert line == f"Error: --results {blocker / 'results'}: cannot write there ({blocker} is not a directory)"
    line = one_line_error(CliRunner().invoke(main, ["train", "--data", str(blocker)]))
    assert "is a file, not a directory" in line and "does not exist" not in line


def test_train_survives_a_truncated_gif_among_the_first(tmp_path, tiny_config):  # noqa: F811
    from vdeploy.data import UnreadableVideoWarning, synth_dataset

    data = tmp_path / "data"
    synth_dataset(data, num=3, frames=4, size=16)
    first = data / "00000.gif"
    first.write_bytes(first.read_bytes()[:-40])  # header intact, frames torn
    with pytest.warns(UnreadableVideoWarning, match="00000.gif"):  # skipped, named
        result = CliRunner().invoke(main, ["train", "--data", str(data), "--results", str(tmp_path / "r"),
                                           "--config", str(tiny_config), "--steps", "1", "--batch-size", "2",
                                           "--sample-rows", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "trained 1 steps" in result.output


def test_a_stored_config_that_does_not_resolve_is_one_line_in_export_and_resume(tmp_path, tiny_data):  # noqa: F811
    from vdeploy.checkpoint import make_checkpoint

    results = tmp_path / "r"
    results.mkdir()
    bad = {"dim": 8, "dim_mults": [1, 0], "image_size": 16, "num_frames": 4}
    ckpt = make_checkpoint(step=1, model={"w": torch.zeros(1)}, ema=None, optimizer=None, scaler=None, config=bad)
    torch.save(ckpt, results / "model-last.pt")
    expected = "config key 'dim_mults' must be a list of 1 to 8 integers from 1 to 64, got [1, 0]"
    runs = [["export", "--ckpt", str(results / "model-last.pt"), "--out", str(tmp_path / "m")],
            ["train", "--data", str(tiny_data), "--results", str(results), "--resume"]]
    for args in runs:
        proc = subprocess.run(cli_command(*args), capture_output=True, text=True, env=cli_env(), timeout=300)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
        assert proc.returncode == 2 and len(errors) == 1 and expected in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "m").exists()


def test_data_synth_refuses_to_overwrite_clips_without_overwrite(tmp_path):
    out = tmp_path / "data"
    runner = CliRunner()
    assert runner.invoke(main, ["data", "synth", str(out), "--num", "3", "--size", "8", "--frames", "2"]).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    line = one_line_error(runner.invoke(main, ["data", "synth", str(out), "--num", "2", "--seed", "5"]))
    assert line == (f"Error: {out} already holds 3 clip(s) (00000.gif, ...): pass --overwrite to replace a synthetic "
                    "dataset, or pick another folder")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    again = runner.invoke(main, ["data", "synth", str(out), "--num", "2", "--size", "8", "--frames", "2",
                                 "--overwrite"])
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in out.iterdir()) == ["00000.gif", "00000.txt", "00001.gif", "00001.txt"]


# ------------------------------------------------------------------------------------------ vdeploy sample --


@pytest.fixture(scope="module")
def models():
    from runtime_fixtures import COND_DIM, model_dir

    return {"uncond": model_dir("uncond"), "cond": model_dir("cond"), "cond_dim": COND_DIM}


def _sample(model, tmp_path, *args):
    return CliRunner().invoke(main, ["sample", "--model", str(model), "--out", str(tmp_path / "s.gif"), "--steps",
                                     "2", "--quiet", "--backend", "cpu", *args])


@pytest.mark.parametrize("content, message", [
    (np.zeros((0, 6), np.float32), "has shape (0, 6): expected (b, cond_dim) with at least one row"),
    (np.zeros((2, 3, 6), np.float32), "has shape (2, 3, 6)"),
    (np.array([["a"] * 6]), "holds <U1 values: expected floats"),
    (np.full((1, 6), np.nan, np.float32), "holds NaN or Inf"),
    (np.full((1, 6), 1e300), "holds NaN or Inf (as float32)"),
])
def test_sample_checks_the_cond_file(models, tmp_path, content, message):
    np.save(tmp_path / "c.npy", content)
    line = one_line_error(_sample(models["cond"], tmp_path, "--cond", str(tmp_path / "c.npy")))
    assert f"--cond {tmp_path / 'c.npy'}" in line and message in line, line
    assert not (tmp_path / "s.gif").exists()


def test_sample_refuses_non_utf8_text(models, tmp_path):
    # a shell passing the bytes b"a \xff" gives Python's argv "a \udcff" (surrogateescape)
    line = one_line_error(_sample(models["cond"], tmp_path, "--text", "a \udcff"))
    assert line == "Error: --text b'a \\xff' is not UTF-8 text"


def test_text_or_cond_on_an_unconditioned_model_names_the_option_not_the_other(models, tmp_path):
    line = one_line_error(_sample(models["uncond"], tmp_path, "--text", "a red ball"))
    assert line.startswith("Error: --text:") and "unconditional model" in line
    assert "--cond" not in line and "`cond`" not in line and "embeddings instead" not in line  # refused too
    np.save(tmp_path / "c.npy", np.ones((1, models["cond_dim"]), np.float32))
    line = one_line_error(_sample(models["uncond"], tmp_path, "--cond", str(tmp_path / "c.npy")))
    assert line.startswith("Error: --cond:") and "unconditional model" in line


def test_outputs_are_checked_writable_before_the_run(models, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    line = one_line_error(CliRunner().invoke(main, ["parity", "--model", str(models["uncond"]), "--ckpt", "x.pt",
                                                   "--json", str(blocker / "p.json")]))
    assert line == f"Error: --json {blocker / 'p.json'}: cannot write there ({blocker} is not a directory)"
    # the benchmark refuses its --json before it exports or times anything
    proc = subprocess.run([sys.executable, "-m", "vdeploy.cli", "bench", "--json", str(blocker / "b.json")],
                          capture_output=True, text=True, env=cli_env(), timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"--json {blocker / 'b.json'}: cannot write there ({blocker} is not a directory)" in proc.stderr


# ------------------------------------------------------------------------------------ runtime-only install --


@pytest.mark.parametrize("args", [
    ["train", "--data", "."], ["export", "--ckpt", "x.pt", "--out", "m"], ["parity", "--model", ".", "--ckpt", "x.pt"],
])
def test_torch_side_commands_name_the_extra_on_a_runtime_only_install(tmp_path, args):
    """A sitecustomize on PYTHONPATH blocks ``import torch`` in the subprocess, as a `vdeploy[cpu]` install lacks it."""
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        sys.modules["torch"] = None  # import torch -> ImportError, find_spec -> None
    """))
    env = cli_env(PYTHONPATH=str(tmp_path))
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert probe.returncode != 0  # the sitecustomize is in effect
    proc = subprocess.run(cli_command(*args), capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: vdeploy {args[0]} needs torch"), proc.stderr
    assert "pip install 'vdeploy[train,export]'" in lines[0] and "ModuleNotFoundError" not in proc.stderr
