"""vdeploy export: checked ONNX graphs, the CFG graph, fp16, the manifest, upstream checkpoints."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from export_fixtures import (  # noqa: F401  (pytest fixtures)
    STEP,
    TINY_EXPORT_CONFIG,
    TINY_UNCOND_CONFIG,
    exported_model,
    exported_model_dir,
    single_thread_torch,
    tiny_unet,
    write_upstream_checkpoint,
)
from vdeploy.export.checks import ort_session
from vdeploy.export.spec import FP16_ATOL, FP32_ATOL
from vdeploy.runtime import manifest as vmanifest

single_thread_torch()


def _inputs(rng, b, config, cond_dim=None, size=None):
    s = size or config["image_size"]
    x = rng.standard_normal((b, config["channels"], config["num_frames"], s, s), dtype=np.float32)
    t = rng.integers(0, config["timesteps"], size=(b,), dtype=np.int64)
    cond = rng.standard_normal((b, cond_dim), dtype=np.float32) if cond_dim else None
    return x, t, cond


def _torch(unet, x, t, cond=None, **kw):
    with torch.no_grad():
        c = torch.from_numpy(cond) if cond is not None else None
        return unet(torch.from_numpy(x), torch.from_numpy(t), cond=c, **kw).numpy()


def test_graphs_pass_the_checker_with_the_declared_io(exported_model):
    manifest = vmanifest.load(exported_model.dir)
    assert set(manifest.graphs) == {"denoiser", "denoiser_cfg", "denoiser_fp16"}
    for name, graph in manifest.graphs.items():
        path = exported_model.dir / graph.file
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        assert [i.name for i in model.graph.input] == [i.name for i in graph.inputs]
        assert [o.name for o in model.graph.output] == ["eps"]
        assert model.opset_import[0].version == 17
    den = manifest.graphs["denoiser"]
    assert [(i.name, i.dtype, i.shape, i.role) for i in den.inputs] == [
        ("x", "float32", ("batch", 3, 4, "height", "width"), "x"),
        ("t", "int64", ("batch",), "t"),
        ("cond", "float32", ("batch", 6), "cond"),
    ]
    assert den.dynamic_axes["x"] == {0: "batch", 3: "height", 4: "width"}
    assert den.input("cond").name == "cond" and den.input("cond_scale") is None
    cfg_inputs = manifest.graphs["denoiser_cfg"].inputs
    assert cfg_inputs[-1] == vmanifest.TensorSpec("cond_scale", "float32", (1,), "cond_scale")
    assert manifest.graphs["denoiser_cfg"].guidance and manifest.graphs["denoiser_fp16"].precision == "fp16"


@pytest.mark.parametrize("batch", [1, 3])
def test_ort_matches_torch_conditioned_and_unconditioned(exported_model, batch):
    unet, config = exported_model.unet, exported_model.config
    session = ort_session(exported_model.dir / "denoiser.onnx")
    null = np.load(exported_model.dir / "null_cond_emb.npy")
    x, t, cond = _inputs(np.random.default_rng(100 + batch), batch, config, cond_dim=6)
    (cond_eps,) = session.run(None, {"x": x, "t": t, "cond": cond})
    (null_eps,) = session.run(None, {"x": x, "t": t, "cond": np.repeat(null, batch, axis=0)})
    assert cond_eps.shape == (batch, 3, 4, 16, 16)
    assert np.abs(cond_eps - _torch(unet, x, t, cond)).max() <= FP32_ATOL
    # the learned null embedding as cond is upstream's null_cond_prob=1
    assert np.abs(null_eps - _torch(unet, x, t, cond, null_cond_prob=1.0)).max() <= FP32_ATOL
    assert np.abs(cond_eps - null_eps).max() > 1e-3  # conditioning matters in this model


def test_dynamic_image_size(exported_model):
    unet, config = exported_model.unet, exported_model.config
    session = ort_session(exported_model.dir / "denoiser.onnx")
    x, t, cond = _inputs(np.random.default_rng(5), 2, config, cond_dim=6, size=24)
    (eps,) = session.run(None, {"x": x, "t": t, "cond": cond})
    assert eps.shape == (2, 3, 4, 24, 24)
    assert np.abs(eps - _torch(unet, x, t, cond)).max() <= FP32_ATOL


@pytest.mark.parametrize("batch,scale", [(1, 3.0), (3, 7.5), (2, 1.0)])
def test_cfg_graph_equals_forward_with_cond_scale(exported_model, batch, scale):
    unet, config = exported_model.unet, exported_model.config
    session = ort_session(exported_model.dir / "denoiser_cfg.onnx")
    x, t, cond = _inputs(np.random.default_rng(200 + batch), batch, config, cond_dim=6)
    (eps,) = session.run(None, {"x": x, "t": t, "cond": cond, "cond_scale": np.array([scale], np.float32)})
    with torch.no_grad():
        ref = unet.forward_with_cond_scale(
            torch.from_numpy(x), torch.from_numpy(t), cond=torch.from_numpy(cond), cond_scale=scale
        ).numpy()
    assert np.abs(eps - ref).max() <= FP32_ATOL * max(1.0, scale)


def test_fp16_graph_within_its_tolerance(exported_model):
    unet, config = exported_model.unet, exported_model.config
    model = onnx.load(str(exported_model.dir / "denoiser_fp16.onnx"))
    dtypes = {init.data_type for init in model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in dtypes
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 I/O
    session = ort_session(exported_model.dir / "denoiser_fp16.onnx")
    x, t, cond = _inputs(np.random.default_rng(7), 3, config, cond_dim=6)
    (eps,) = session.run(None, {"x": x, "t": t, "cond": cond})
    err = np.abs(eps - _torch(unet, x, t, cond)).max()
    assert err <= FP16_ATOL
    assert err > 0  # it really is float16


def test_manifest_records_hashes_parity_schedule_and_source(exported_model):
    from vdeploy.diffusion import cosine_beta_schedule

    d = exported_model.dir
    manifest = vmanifest.load(d, verify=True)
    on_disk = sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and p.name != "vdeploy.json")
    assert sorted(manifest.files) == on_disk
    for name, digest in manifest.files.items():
        assert vmanifest.sha256_file(d / name) == digest
    assert manifest.source["step"] == STEP and manifest.source["ema"] is True
    assert manifest.opset == 17
    assert manifest.config["cond_dim"] == 6 and manifest.config["num_frames"] == 4
    assert np.allclose(manifest.schedule.betas, cosine_beta_schedule(20).numpy(), rtol=0, atol=0)
    assert manifest.schedule.timesteps == 20 and manifest.schedule.prediction_type == "eps"
    assert manifest.schedule.beta_schedule == "cosine"
    cond = manifest.conditioning
    assert cond.cond_dim == 6 and cond.null_embedding == "null_cond_emb.npy"
    null = np.load(d / cond.null_embedding)
    assert np.array_equal(null, exported_model.unet.null_cond_emb.detach().numpy())
    parity = manifest.parity
    assert set(parity["denoiser"]["max_abs_err"]) >= {"b1_cond", "b1_uncond", "b3_cond", "b3_uncond"}
    assert max(parity["denoiser"]["max_abs_err"].values()) <= FP32_ATOL
    assert max(parity["denoiser_cfg"]["max_abs_err"].values()) <= FP32_ATOL
    assert max(parity["denoiser_fp16"]["max_abs_err"].values()) <= parity["denoiser_fp16"]["atol"]


def test_runtime_pipeline_loads_the_export(exported_model_dir):
    from vdeploy.runtime import Pipeline

    pipe = Pipeline.from_dir(exported_model_dir, backend="cpu")
    video = pipe(batch_size=1, cond=np.zeros((1, 6), np.float32), cond_scale=2.0, sampler="ddim", steps=3, seed=0)
    assert video.shape == (1, 3, 4, 16, 16)
    assert np.isfinite(video).all()


def test_upstream_checkpoint_exports_and_matches_the_upstream_model(ref_vdp, tmp_path):
    """A ``model-N.pt`` as upstream's Trainer.save writes it; the architecture from --config."""
    from click.testing import CliRunner

    from vdeploy.cli import main

    torch.manual_seed(3)
    unet = ref_vdp.Unet3D(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8, cond_dim=6).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    diffusion = ref_vdp.GaussianDiffusion(unet, image_size=16, num_frames=4, timesteps=20)
    ckpt = write_upstream_checkpoint(tmp_path / "model-3.pt", diffusion.state_dict(), step=3000)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_EXPORT_CONFIG))
    out = tmp_path / "model"
    result = CliRunner().invoke(
        main, ["export", "--ckpt", str(ckpt), "--config", str(config), "--out", str(out), "--optimize", "none"]
    )
    assert result.exit_code == 0, result.output
    manifest = vmanifest.load(out)
    assert manifest.source["step"] == 3000
    session = ort_session(out / "denoiser.onnx")
    x, t, cond = _inputs(np.random.default_rng(9), 3, manifest.config, cond_dim=6)
    (eps,) = session.run(None, {"x": x, "t": t, "cond": cond})
    assert np.abs(eps - _torch(unet, x, t, cond)).max() <= FP32_ATOL  # the upstream model itself


def test_unconditioned_static_size_export_with_optimization(tmp_path):
    from vdeploy.export import export_unet

    unet, config = tiny_unet(TINY_UNCOND_CONFIG, seed=1)
    manifest = export_unet(unet, config, tmp_path / "m", dynamic_size=False, optimize="auto")
    den = manifest.graphs["denoiser"]
    assert [i.name for i in den.inputs] == ["x", "t"]
    assert den.inputs[0].shape == ("batch", 3, 4, 16, 16)
    assert manifest.conditioning == vmanifest.Conditioning()
    opt = den.optimization
    assert opt["kept"] in ("plain", "onnxslim") and set(opt["latency_ms"]) == {"plain", "onnxslim"}
    session = ort_session(tmp_path / "m" / "denoiser.onnx")
    x, t, _ = _inputs(np.random.default_rng(1), 3, config)
    (eps,) = session.run(None, {"x": x, "t": t})
    assert np.abs(eps - _torch(unet, x, t)).max() <= FP32_ATOL
    assert max(manifest.parity["denoiser"]["max_abs_err"].values()) <= FP32_ATOL


def test_re_export_replaces_a_previous_model_dir(exported_model, tmp_path):
    from vdeploy.export import export_onnx

    out = tmp_path / "model"
    export_onnx(exported_model.ckpt, out, optimize="none")
    first = vmanifest.load(out).files["denoiser.onnx"]
    (out / "stale.txt").write_text("from an older export")
    export_onnx(exported_model.ckpt, out, optimize="none", cfg=True)
    manifest = vmanifest.load(out)
    assert "denoiser_cfg" in manifest.graphs
    assert not (out / "stale.txt").exists()
    assert manifest.files["denoiser.onnx"] == first  # deterministic trace
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
