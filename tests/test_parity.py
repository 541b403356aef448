"""vdeploy parity: PyTorch vs the runtime from the same noise, per call and at the end."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from export_fixtures import exported_model, single_thread_torch  # noqa: F401  (pytest fixture)
from vdeploy.cli import main

single_thread_torch()
KEYS = {"per_call_max_abs_err", "final_max_abs_err", "psnr_db"}


def test_ddpm_full_loop_matches_the_seed_sampler(exported_model):
    from vdeploy.export.parity import run_parity

    report = run_parity(exported_model.dir, exported_model.ckpt, sampler="ddpm", batch_size=2)
    assert report["torch_reference"] == "GaussianDiffusion.p_sample_loop"
    assert report["calls"] == report["steps"] == 20
    assert max(report["per_call_max_abs_err"]) <= 1e-3
    assert report["final_max_abs_err"] <= 1e-3 and report["psnr_db"] > 60
    assert report["passed"]


@pytest.mark.parametrize("sampler,cond_scale", [("ddim", 1.0), ("dpmpp", 3.0), ("ddpm", 2.0)])
def test_respaced_samplers_and_guidance(exported_model, sampler, cond_scale):
    from vdeploy.export.parity import run_parity

    report = run_parity(exported_model.dir, exported_model.ckpt, sampler=sampler, steps=6, cond_scale=cond_scale)
    assert report["calls"] == 6 and report["passed"], report
    assert "samplers" in report["torch_reference"]


def test_cli_json_keys(exported_model, tmp_path):
    out = tmp_path / "report" / "parity.json"
    result = CliRunner().invoke(main, ["parity", "--model", str(exported_model.dir), "--ckpt", str(exported_model.ckpt),
                                       "--sampler", "dpmpp", "--steps", "5", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert KEYS <= set(report)
    assert len(report["per_call_max_abs_err"]) == 5 and report["passed"] is True


def test_cli_exits_non_zero_when_the_tolerance_is_exceeded(exported_model, tmp_path):
    out = tmp_path / "parity.json"
    result = CliRunner().invoke(main, ["parity", "--model", str(exported_model.dir), "--ckpt", str(exported_model.ckpt),
                                       "--sampler", "ddim", "--steps", "3", "--atol", "1e-12", "--json", str(out)])
    assert result.exit_code == 1
    assert "parity exceeded atol" in result.output
    report = json.loads(out.read_text())  # still written
    assert KEYS <= set(report) and report["passed"] is False


def test_cli_bad_input_is_exit_2(exported_model, tmp_path):
    result = CliRunner().invoke(main, ["parity", "--model", str(tmp_path / "none"), "--ckpt", str(exported_model.ckpt)])
    assert result.exit_code == 2 and result.output.startswith("Error: ") and len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(main, ["parity", "--model", str(exported_model.dir), "--ckpt", str(tmp_path / "x.pt")])
    assert result.exit_code == 2 and "x.pt" in result.output
