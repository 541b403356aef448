"""vdeploy export: every bad input is one line and exit code 2, and nothing is left behind."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from export_fixtures import (  # noqa: F401  (pytest fixtures)
    TINY_EXPORT_CONFIG,
    diffusion_state,
    exported_model,
    single_thread_torch,
    tiny_unet,
    write_upstream_checkpoint,
    write_vdeploy_checkpoint,
)
from vdeploy.cli import main

single_thread_torch()


def _export(tmp_path, *args):
    """Run ``vdeploy export`` into ``tmp_path/work/out``; return (result, the work dir's listing after)."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    result = CliRunner().invoke(main, ["export", "--optimize", "none", *args], catch_exceptions=False)
    return result, sorted(p.name for p in work.iterdir())


def _one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    # progress lines may come first (the root logger's set-up depends on what ran before);
    # the error itself is one line, the last, and there is no traceback
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    assert "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def out(tmp_path):
    return str(tmp_path / "work" / "model")


def test_missing_checkpoint(tmp_path, out):
    result, left = _export(tmp_path, "--ckpt", str(tmp_path / "nope.pt"), "--out", out)
    _one_line_error(result, "nope.pt", "does not exist")
    assert left == []


def test_corrupt_checkpoint(tmp_path, out):
    bad = tmp_path / "model-1.pt"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    result, left = _export(tmp_path, "--ckpt", str(bad), "--out", out)
    _one_line_error(result, "model-1.pt")
    assert left == []


def test_truncated_checkpoint(tmp_path, exported_model, out):
    data = exported_model.ckpt.read_bytes()
    bad = tmp_path / "model-2.pt"
    bad.write_bytes(data[: len(data) // 2])
    result, left = _export(tmp_path, "--ckpt", str(bad), "--out", out)
    _one_line_error(result, "model-2.pt")
    assert left == []


@pytest.mark.parametrize(
    "payload",
    [[1, 2, 3], {"step": 3, "model": {"a": "not a tensor"}}, {"hello": "world"}],
    ids=["list", "model-not-tensors", "unknown-dict"],
)
def test_not_a_state_dict(tmp_path, out, payload):
    bad = tmp_path / "model-3.pt"
    torch.save(payload, bad)
    result, left = _export(tmp_path, "--ckpt", str(bad), "--out", out)
    _one_line_error(result, "model-3.pt")
    assert left == []


def test_config_not_matching_the_weights_names_the_first_key(tmp_path, exported_model, out):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**TINY_EXPORT_CONFIG, "dim": 16}))
    result, left = _export(tmp_path, "--ckpt", str(exported_model.ckpt), "--config", str(other), "--out", out)
    line = _one_line_error(result, "does not match the weights", "first mismatching key")
    assert "'" in line.split("first mismatching key", 1)[1]
    assert left == []


def test_config_missing_a_key_of_the_weights(tmp_path, exported_model, out):
    uncond = tmp_path / "uncond.json"
    uncond.write_text(json.dumps({k: v for k, v in TINY_EXPORT_CONFIG.items() if k != "cond_dim"}))
    result, left = _export(tmp_path, "--ckpt", str(exported_model.ckpt), "--config", str(uncond), "--out", out)
    _one_line_error(result, "first mismatching key")
    assert left == []


def test_upstream_checkpoint_without_config(tmp_path, out):
    unet, config = tiny_unet()
    ckpt = write_upstream_checkpoint(tmp_path / "model-5.pt", diffusion_state(unet, config))
    result, left = _export(tmp_path, "--ckpt", str(ckpt), "--out", out)
    _one_line_error(result, "holds no model config", "--config")
    assert left == []


def test_bad_config_value(tmp_path, exported_model, out):
    result, left = _export(tmp_path, "--ckpt", str(exported_model.ckpt), "--config", "huge", "--out", out)
    _one_line_error(result, "huge")
    assert left == []


def test_unwritable_output_dir(tmp_path, exported_model):
    blocker = tmp_path / "work" / "a-file"
    blocker.parent.mkdir()
    blocker.write_text("not a directory")
    result, left = _export(tmp_path, "--ckpt", str(exported_model.ckpt), "--out", str(blocker / "model"))
    _one_line_error(result, "cannot write the output directory")
    assert left == ["a-file"]


def test_output_is_a_foreign_directory(tmp_path, exported_model):
    foreign = tmp_path / "work" / "photos"
    foreign.mkdir(parents=True)
    (foreign / "holiday.jpg").write_bytes(b"\xff\xd8")
    result, left = _export(tmp_path, "--ckpt", str(exported_model.ckpt), "--out", str(foreign))
    _one_line_error(result, "refusing to replace")
    assert left == ["photos"] and [p.name for p in foreign.iterdir()] == ["holiday.jpg"]


def test_tensorrt_without_the_module_is_one_line(tmp_path, exported_model, out):
    pytest.importorskip("click")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    result, left = _export(tmp_path, "--ckpt", str(exported_model.ckpt), "--out", out, "--tensorrt")
    _one_line_error(result, "tensorrt")
    assert left == []


def test_failed_parity_leaves_nothing_behind(tmp_path, exported_model, out):
    result, left = _export(tmp_path, "--ckpt", str(exported_model.ckpt), "--out", out, "--atol", "1e-12")
    assert result.exit_code == 1
    assert "does not match PyTorch" in result.output and "b3_uncond" in result.output
    assert left == []


def test_no_ema_exports_the_raw_weights(tmp_path):
    from vdeploy.checkpoint import make_checkpoint, save_checkpoint
    from vdeploy.export import export_onnx

    raw, config = tiny_unet(seed=0)
    ema, _ = tiny_unet(seed=1)
    ckpt = save_checkpoint(
        make_checkpoint(step=1, model=diffusion_state(raw, config), ema=diffusion_state(ema, config),
                        optimizer=None, scaler=None, config=config),
        tmp_path / "model-1.pt",
    )
    a = export_onnx(ckpt, tmp_path / "ema", optimize="none")
    b = export_onnx(ckpt, tmp_path / "raw", ema=False, optimize="none")
    assert a.source["ema"] is True and b.source["ema"] is False
    assert np.array_equal(np.load(tmp_path / "raw" / "null_cond_emb.npy"), raw.null_cond_emb.detach().numpy())
    assert np.array_equal(np.load(tmp_path / "ema" / "null_cond_emb.npy"), ema.null_cond_emb.detach().numpy())


def test_unsupported_opset(tmp_path, exported_model, out):
    from vdeploy.export import ExportError, export_onnx

    with pytest.raises(ExportError, match="opset 21 is not supported"):
        export_onnx(exported_model.ckpt, out, opset=21)
    assert not (tmp_path / "work").exists() or list((tmp_path / "work").iterdir()) == []
    result, left = _export(tmp_path, "--ckpt", str(exported_model.ckpt), "--out", out, "--opset", "16")
    _one_line_error(result, "--opset")
    assert left == []


def test_cfg_on_an_unconditioned_model_fails_before_tracing(tmp_path, out, monkeypatch):
    from vdeploy.export import exporter

    config = {k: v for k, v in TINY_EXPORT_CONFIG.items() if k != "cond_dim"}
    unet, resolved = tiny_unet(config)
    ckpt = write_vdeploy_checkpoint(tmp_path / "model-4.pt", unet, resolved)

    def no_trace(*args, **kwargs):
        raise AssertionError("traced before the arguments were checked")

    monkeypatch.setattr(exporter, "_trace", no_trace)
    result, left = _export(tmp_path, "--ckpt", str(ckpt), "--out", out, "--cfg")
    _one_line_error(result, "--cfg needs a conditioned model")
    assert left == []
