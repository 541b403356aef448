"""``vdeploy sample``: writes a GIF without torch; bad input is one line and exit code 2."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from vdeploy.cli import main

from runtime_fixtures import COND_DIM, model_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cond():
    return model_dir("cond")


def test_sample_writes_a_gif_grid(cond, tmp_path):
    out = tmp_path / "grid.gif"
    result = CliRunner().invoke(main, [
        "sample", "--model", str(cond), "--out", str(out), "--batch-size", "4", "--steps", "3", "--seed", "0",
        "--sampler", "ddim", "--backend", "cpu",
    ])
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (4 videos, 4 frames, 8x8) with ddim on onnxruntime-cpu" in result.output
    with Image.open(out) as gif:
        assert gif.n_frames == 4
        assert gif.size == (2 * 12, 2 * 12)  # 2x2 grid of 8 px videos padded by 2 px


def test_sample_with_text_and_embeddings(cond, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, [
        "sample", "--model", str(cond), "--out", str(tmp_path / "t.gif"), "--steps", "2", "--quiet",
        "--text", "a red ball", "--text", "blue cube", "--cond-scale", "2",
    ])
    assert result.exit_code == 0, result.output
    assert "(2 videos" in result.output
    np.save(tmp_path / "c.npy", np.ones((3, COND_DIM), np.float32))
    result = runner.invoke(main, [
        "sample", "--model", str(cond), "--out", str(tmp_path / "c.gif"), "--steps", "2", "--quiet",
        "--cond", str(tmp_path / "c.npy"),
    ])
    assert result.exit_code == 0, result.output
    assert "(3 videos" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "{tmp}/x.png"], "--out must end in .gif or .mp4"),
        (["--out", "{tmp}/missing/x.gif"], "does not exist"),
        (["--model", "{tmp}/nope"], "does not exist"),
        (["--steps", "0"], "Invalid value for '--steps'"),
        (["--steps", "51"], "steps must be an integer in [1, 50]"),
        (["--sampler", "euler"], "Invalid value for '--sampler'"),
        (["--eta", "0.5"], "takes no option eta"),
        (["--cond", "{tmp}/missing.npy"], "cannot read --cond"),
        (["--text", "a", "--cond", "{tmp}/c.npy"], "either --text or --cond"),
        (["--backend", "cuda"], "vdeploy[gpu]"),
        (["--batch-size", "2", "--text", "a", "--text", "b", "--text", "c"], "does not match the 3 rows"),
        (["--precision", "fp16", "--backend", "cpu"], "no fp16 denoiser graph"),
    ],
)
def test_sample_bad_input_is_one_line_and_exit_code_2(cond, tmp_path, args, message):
    # a repeated option takes its last value: the case's --out/--model override the defaults
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    argv = ["sample", "--model", str(cond), "--out", str(tmp_path / "out.gif"), "--quiet", *args]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert message in lines[0]


def test_sample_refuses_a_tampered_model(cond, tmp_path):
    data = bytearray((cond / "denoiser.onnx").read_bytes())
    data[-3] ^= 0xFF
    (cond / "denoiser.onnx").write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["sample", "--model", str(cond), "--out", str(tmp_path / "x.gif")])
    assert result.exit_code == 2
    assert "does not match the sha256 in vdeploy.json" in result.output


def test_sample_command_never_imports_torch(tmp_path):
    folder = model_dir("uncond")
    out = tmp_path / "s.gif"
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None
        from vdeploy.cli import main
        main(["sample", "--model", {str(folder)!r}, "--out", {str(out)!r}, "--steps", "3", "--seed", "1"])
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    auto = "onnxruntime-cpu"  # auto on a CPU-only machine (OpenVINO only where onnxruntime is missing)
    assert f"backend: {auto}" in result.stderr and "outside the denoiser" in result.stderr
    assert out.is_file()
