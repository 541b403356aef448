"""Token-level text conditioning (config ``text_cross_attention``): the U-Net's cross-attention to the caption's
token embeddings, training, export, the torch-free runtime, parity.

Tiny models throughout: a random BERT (hidden 12) with a WordPiece tokenizer, a dim-8 U-Net at 16 px, 4 frames.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from export_fixtures import save_tiny_bert, single_thread_torch
from vdeploy import config as C
from vdeploy.diffusion import GaussianDiffusion
from vdeploy.model import Unet3D

single_thread_torch()

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "green", "circle", "square", "triangle",
         "moving", "left", "right", "up", "down"]
MAX_TOKENS = 8
CONFIG = {"dim": 8, "dim_mults": [1, 2], "attn_heads": 2, "attn_dim_head": 8, "image_size": 16, "num_frames": 4,
          "timesteps": 20, "cond_dim": 12}
TOKEN_CONFIG = {**CONFIG, "text_cross_attention": True, "text_max_tokens": MAX_TOKENS}


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny random BERT (hidden 12) with a WordPiece tokenizer, saved the way HF saves models."""
    return save_tiny_bert(tmp_path_factory.mktemp("bert"), VOCAB)


def token_unet(seed: int = 0, config: dict = TOKEN_CONFIG) -> tuple[Unet3D, dict]:
    """A token model with random weights, every bias and null parameter non-trivial."""
    resolved = C.resolve(dict(config))
    torch.manual_seed(seed)
    unet = Unet3D(**C.unet_kwargs(resolved))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "relative_attention_bias" in name or name.endswith("bias"):
                p.normal_(0, 0.2)
    return unet.eval(), resolved


def token_inputs(b: int, lengths, seed: int = 0):
    """Random pooled vectors, tokens and masks with ``lengths[i]`` real tokens in row i."""
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(b, 12, generator=g)
    tokens = torch.randn(b, MAX_TOKENS, 12, generator=g)
    mask = (torch.arange(MAX_TOKENS)[None] < torch.tensor(lengths)[:, None]).float()
    return cond, tokens, mask


# ------------------------------------------------------------------------------------------- the model ----


def test_flag_off_leaves_the_model_as_it_was():
    base = C.resolve(dict(CONFIG))
    assert base["text_cross_attention"] is False and base["text_max_tokens"] == 16
    kwargs = C.unet_kwargs(base)
    assert "text_cross_attention" not in kwargs and "text_max_tokens" not in kwargs  # the seed's Unet3D takes them
    torch.manual_seed(0)
    plain = Unet3D(**kwargs)
    assert not any("text" in k for k in plain.state_dict())
    torch.manual_seed(0)
    tokens = Unet3D(**C.unet_kwargs(C.resolve(dict(TOKEN_CONFIG))))
    # the token model only adds keys, and draws upstream's weights first
    keys, more = list(plain.state_dict()), list(tokens.state_dict())
    assert [k for k in more if k in keys] == keys
    assert all(k.startswith(("null_text_tokens", "text_cross_attns.")) for k in more if k not in keys)
    assert all(torch.equal(plain.state_dict()[k], tokens.state_dict()[k]) for k in keys)
    with pytest.raises(ValueError, match="without text_cross_attention"):
        plain.eval()(torch.zeros(1, 3, 4, 16, 16), torch.tensor([1]), cond=torch.zeros(1, 12),
                     text_tokens=torch.zeros(1, MAX_TOKENS, 12), text_mask=torch.ones(1, MAX_TOKENS))


def test_config_checks_the_token_keys():
    with pytest.raises(C.ConfigError, match="text_cross_attention"):
        C.resolve({**CONFIG, "text_cross_attention": 1})
    with pytest.raises(C.ConfigError, match="text_max_tokens"):
        C.resolve({**TOKEN_CONFIG, "text_max_tokens": 0})
    with pytest.raises(ValueError, match="needs a text-conditioned model"):
        Unet3D(dim=8, dim_mults=(1, 2), text_cross_attention=True)


def test_padding_tokens_do_not_change_the_output():
    unet, _ = token_unet()
    x, t = torch.randn(2, 3, 4, 16, 16), torch.tensor([3, 17])
    cond, tokens, mask = token_inputs(2, [3, 5])
    with torch.no_grad():
        out = unet(x, t, cond=cond, text_tokens=tokens, text_mask=mask)
        junk = tokens.clone()
        junk[mask == 0] = torch.randn(int((mask == 0).sum()), 12) * 1e3
        # padding is not attended: exactly the same output whatever it holds
        assert torch.equal(unet(x, t, cond=cond, text_tokens=junk, text_mask=mask), out)
        # ... while a real token changes it, and a bool mask is the float one
        assert not torch.equal(unet(x, t, cond=cond, text_tokens=tokens, text_mask=torch.ones_like(mask)), out)
        assert torch.equal(unet(x, t, cond=cond, text_tokens=tokens, text_mask=mask.bool()), out)
        with pytest.raises(ValueError, match="text_tokens and text_mask"):
            unet(x, t, cond=cond)
        with pytest.raises(ValueError, match="text_mask must have shape"):
            unet(x, t, cond=cond, text_tokens=tokens, text_mask=mask[:, :3])


def test_the_null_branch_uses_the_null_tokens_and_guidance_combines_them():
    unet, _ = token_unet()
    x, t = torch.randn(2, 3, 4, 16, 16), torch.tensor([3, 17])
    cond, tokens, mask = token_inputs(2, [3, 5])
    null_tokens = unet.null_text_tokens.detach().expand(2, -1, -1)
    with torch.no_grad():
        null = unet(x, t, cond=cond, text_tokens=tokens, text_mask=mask, null_cond_prob=1.0)
        by_hand = unet(x, t, cond=unet.null_cond_emb.expand(2, -1), text_tokens=null_tokens,
                       text_mask=torch.ones(2, MAX_TOKENS))
        assert torch.equal(null, by_hand)
        # dropping a row (the trainer's own draws) is the same null
        dropped = unet.drop_text(torch.tensor([True, False]), tokens, mask)
        assert torch.equal(dropped[0][0], unet.null_text_tokens[0]) and torch.equal(dropped[0][1], tokens[1])
        assert dropped[1][0].eq(1).all() and torch.equal(dropped[1][1], mask[1])
        cond_out = unet(x, t, cond=cond, text_tokens=tokens, text_mask=mask)
        guided = unet.forward_with_cond_scale(x, t, cond=cond, text_tokens=tokens, text_mask=mask, cond_scale=3.0)
        torch.testing.assert_close(guided, null + (cond_out - null) * 3.0, rtol=0, atol=1e-5)


def test_captions_give_pooled_vector_and_tokens(bert_dir):
    from vdeploy.text import TextEncoder

    encoder = TextEncoder(bert_dir)
    captions = ["a red circle moving left", "green"]
    pooled, tokens, mask = encoder.encode(captions, MAX_TOKENS)
    assert torch.equal(pooled, encoder(captions))  # the pooled vector is exactly the one without tokens
    assert tokens.shape == (2, MAX_TOKENS, 12) and mask.tolist()[1] == [1, 1, 1] + [0] * 5  # [CLS] green [SEP]
    assert tokens[1, 3:].eq(0).all() and mask[0].sum() == 7
    short = encoder.encode(captions, 4)[1:]
    assert torch.equal(short[0], tokens[:, :4]) and torch.equal(short[1], mask[:, :4])  # cut, not re-encoded

    unet, _ = token_unet()
    diffusion = GaussianDiffusion(unet, image_size=16, num_frames=4, timesteps=20, text_encoder=encoder)
    noise = [torch.randn(2, 3, 4, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(21)]
    by_caption = diffusion.sample(cond=captions, cond_scale=2.0, noise=iter(noise), progress=False)
    by_embedding = diffusion.sample(cond=pooled, text_tokens=tokens, text_mask=mask, cond_scale=2.0,
                                    noise=iter(noise), progress=False)
    assert torch.equal(by_caption, by_embedding)


def test_training_steps_with_caption_dropout(bert_dir, tmp_path):
    from vdeploy.data import synth_dataset
    from vdeploy.text import TextEncoder
    from vdeploy.trainer import Trainer

    data = tmp_path / "data"
    synth_dataset(data, num=4, frames=4, size=16, seed=0)
    config = C.resolve(dict(TOKEN_CONFIG))
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(Unet3D(**C.unet_kwargs(config)), **C.diffusion_kwargs(config),
                                  text_encoder=TextEncoder(bert_dir))
    trainer = Trainer(diffusion, data, train_batch_size=2, train_num_steps=2, gradient_accumulate_every=1,
                      save_and_sample_every=2, results_folder=tmp_path / "res", num_sample_rows=1,
                      step_start_ema=0, update_ema_every=1, progress=False, config=config, null_cond_prob=0.5,
                      cond_scale=2.0)
    assert trainer.token_table.shape == (len(set(trainer.ds.captions)), MAX_TOKENS, 12)
    before = trainer.unwrapped_model.denoise_fn.null_text_tokens.detach().clone()
    loss = trainer.train()
    assert np.isfinite(loss)
    unet = trainer.unwrapped_model.denoise_fn
    assert not torch.equal(unet.null_text_tokens, before)  # the null tokens learn where captions are dropped
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in unet.parameters())
    raw = torch.load(tmp_path / "res" / "model-last.pt", weights_only=True)
    assert raw["config"]["text_cross_attention"] is True and "null_text_tokens" in str(list(raw["model"]))


# ------------------------------------------------------------------------------ export and the runtime ----


@pytest.fixture(scope="module")
def token_export(bert_dir, tmp_path_factory):
    """The token model exported with the fused guidance graph and the tiny BERT: ``(model dir, checkpoint, unet)``.
    With frame conditioning too, as ``make demo`` trains: both kinds of graph inputs side by side."""
    from export_fixtures import write_vdeploy_checkpoint
    from vdeploy.export import export_onnx

    root = tmp_path_factory.mktemp("tokens")
    # v-prediction: x0 = sqrt(abar) x - sqrt(1 - abar) v divides by nothing, so float32 round-off stays round-off
    # over a whole loop; an eps model multiplies the graph's ~1e-5 per-call error by 1 / sqrt(abar) ~ 300 at the
    # first step of this 20-step schedule (random weights put the runs' final errors at 0.8 to 1.2e-3 then)
    unet, config = token_unet(seed=1, config={**TOKEN_CONFIG, "prediction_type": "v", "frame_conditioning": True})
    ckpt = write_vdeploy_checkpoint(root / "model-7.pt", unet, config)
    export_onnx(ckpt, root / "model", cfg=True, optimize="none", text_encoder=str(bert_dir))
    return root / "model", ckpt, unet


def test_export_records_the_token_inputs_by_role(token_export):
    from vdeploy.export.spec import FP32_ATOL
    from vdeploy.runtime import manifest as vmanifest

    model_dir, _, unet = token_export
    manifest = vmanifest.load(model_dir)
    for name in ("denoiser", "denoiser_cfg"):
        graph = manifest.graphs[name]
        assert graph.input("text_tokens").shape == ("batch", MAX_TOKENS, 12)
        assert graph.input("text_mask").shape == ("batch", MAX_TOKENS)
        # checked against torch at export: conditioned (with padding), null (null tokens fed) and guided cases
        errors = manifest.parity[name]["max_abs_err"]
        assert max(errors.values()) <= FP32_ATOL and any("uncond" in k for k in errors) == (name == "denoiser")
    cond = manifest.conditioning
    assert cond.null_tokens == "null_text_tokens.npy" and "null_text_tokens.npy" in manifest.files
    np.testing.assert_array_equal(np.load(model_dir / cond.null_tokens), unet.null_text_tokens[0].detach().numpy())
    assert [o.name for o in cond.text_encoder_graph.outputs] == ["embedding", "tokens"]
    assert max(manifest.parity["text_encoder"]["max_abs_err"].values()) <= FP32_ATOL


def test_runtime_text_encoder_gives_the_torch_tokens(token_export, bert_dir):
    from vdeploy.runtime import Pipeline
    from vdeploy.text import TextEncoder

    pipe = Pipeline.from_dir(token_export[0], backend="cpu")
    captions = ["a red circle moving left", "blue", "a green triangle moving up and down left right up down"]
    rows = pipe.encode_text(captions)
    assert rows.shape == (3, pipe.cond_width) and pipe.cond_width == 12 + MAX_TOKENS * 12 + MAX_TOKENS
    pooled, tokens, mask = pipe.token_layout.split(rows)
    ref = TextEncoder(bert_dir).encode(captions, MAX_TOKENS)
    np.testing.assert_array_equal(mask, ref[2].numpy())  # the last caption is cut at MAX_TOKENS
    # float32 round-off of a 2-layer BERT in onnxruntime vs torch: the export's own atol
    assert np.abs(pooled - ref[0].numpy()).max() <= 1e-4 and np.abs(tokens - ref[1].numpy()).max() <= 1e-4
    with pytest.raises(ValueError, match="also attends to the prompt's tokens"):
        pipe(cond=pooled, sampler="ddim", steps=1)


@pytest.mark.parametrize("sampler,known", [("ddpm", 0), ("ddim", 0), ("dpmpp", 0), ("ddim", 2)])
def test_parity_of_a_token_model_with_guidance(token_export, sampler, known):
    from vdeploy.export.parity import DEFAULT_ATOL, run_parity

    model_dir, ckpt, _ = token_export
    # ddpm: upstream's loop over all 20 steps in torch; ddim/dpmpp: the same run around the torch denoiser. Both runs
    # go through the fused guidance graph (cond and null tokens in one batch) and a batch of 2 rows with different
    # token counts (known=2: the first 2 frames given, the trained method); the tolerance is vdeploy parity's own
    # (float32 over a whole loop)
    report = run_parity(model_dir, ckpt, sampler=sampler, steps=None if sampler == "ddpm" else 4, batch_size=2,
                        cond_scale=2.5, seed=3, known=known)
    assert report["passed"] and report["final_max_abs_err"] <= DEFAULT_ATOL
    assert report["max_per_call_abs_err"] <= DEFAULT_ATOL


def test_two_call_guidance_equals_the_fused_graph(token_export):
    from vdeploy.runtime import Pipeline

    pipe = Pipeline.from_dir(token_export[0], backend="cpu")
    assert pipe.guidance(3.0) == "fused"
    fused = pipe(text=["a red circle moving left", "blue square"], cond_scale=3.0, sampler="ddim", steps=3, seed=0)
    pipe.cfg_backend = None  # the plain graph twice: cond rows, then the packed null rows
    assert pipe.guidance(3.0) == "two-calls"
    two = pipe(text=["a red circle moving left", "blue square"], cond_scale=3.0, sampler="ddim", steps=3, seed=0)
    # one batch of 2b against two of b: float32 round-off of the same ops, through 3 steps
    assert np.abs(fused - two).max() <= 1e-4


def test_a_token_model_samples_from_text_without_torch(token_export, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "sample.gif"
    code = ("import sys; from vdeploy.cli import main; sys.argv = ['vdeploy', 'sample', '--model', sys.argv[1], "
            "'--out', sys.argv[2], '--text', 'a red circle moving left', '--cond-scale', '2', '--steps', '2', "
            "'--backend', 'cpu', '--quiet']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'sampling a token model imported torch'")
    result = subprocess.run([sys.executable, "-c", code, str(token_export[0]), str(out)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.is_file()


def test_the_serving_batcher_carries_token_rows(token_export):
    from serve_fixtures import assert_close
    from vdeploy.runtime import Pipeline
    from vdeploy.runtime.serve import Batcher

    pipe = Pipeline.from_dir(token_export[0], backend="cpu", threads=1)
    jobs = [dict(seed=0, sampler="ddim", steps=3, text="a red circle moving left", cond_scale=2.0),
            dict(seed=1, sampler="dpmpp", steps=3, text=["blue square moving up", "green"], cond_scale=3.0),
            dict(seed=2, sampler="ddim", steps=3)]  # no prompt: the packed null row
    batcher = Batcher(pipe, batching="on", warm=False, max_batch=16, buckets=tuple(range(1, 17)))
    try:
        submitted = [batcher.submit(**kwargs) for kwargs in jobs]
        results = [job.result(timeout=60) for job in submitted]
    finally:
        batcher.close()
    for kwargs, video in zip(jobs, results):  # float32 round-off of other batch compositions (serve_fixtures)
        assert_close(video, pipe(**kwargs), str(kwargs))


def test_a_bad_null_token_file_or_path_is_a_manifest_error(token_export, tmp_path):
    import json
    import shutil

    from vdeploy.runtime import Pipeline
    from vdeploy.runtime.manifest import ManifestError, sha256_file

    model_dir = tmp_path / "model"
    shutil.copytree(token_export[0], model_dir)
    manifest_path = model_dir / "vdeploy.json"
    data = json.loads(manifest_path.read_text())
    for name in ("../null.npy", "/etc/passwd"):  # nothing a manifest names may leave its directory
        manifest_path.write_text(json.dumps({**data, "conditioning": {**data["conditioning"], "null_tokens": name}}))
        with pytest.raises(ManifestError, match="null_tokens"):
            Pipeline.from_dir(model_dir, backend="cpu")
    np.save(model_dir / "null_text_tokens.npy", np.zeros((3, 12), np.float32))  # hashed, but the wrong shape
    manifest_path.write_text(json.dumps({**data, "files": {**data["files"], "null_text_tokens.npy": sha256_file(
        model_dir / "null_text_tokens.npy")}}))
    with pytest.raises(ManifestError, match=r"null token sequence .* expected float \(8, 12\)"):
        Pipeline.from_dir(model_dir, backend="cpu")
    no_null = {k: v for k, v in data["conditioning"].items() if k != "null_tokens"}
    manifest_path.write_text(json.dumps({**data, "conditioning": no_null}))
    with pytest.raises(ManifestError, match="null_tokens is missing"):
        Pipeline.from_dir(model_dir, backend="cpu")


def test_a_checkpoint_stored_before_the_token_keys_resumes(tmp_path):
    from vdeploy import checkpoint as ckpt_io
    from vdeploy.data import synth_dataset
    from vdeploy.trainer import Trainer

    data = tmp_path / "data"
    synth_dataset(data, num=2, frames=4, size=16, seed=0)
    config = C.resolve({k: v for k, v in CONFIG.items() if k != "cond_dim"})

    def trainer():
        torch.manual_seed(0)
        diffusion = GaussianDiffusion(Unet3D(**C.unet_kwargs(config)), **C.diffusion_kwargs(config))
        return Trainer(diffusion, data, train_batch_size=1, train_num_steps=1, gradient_accumulate_every=1,
                       results_folder=tmp_path / "res", progress=False, config=config)

    trainer().train()
    path = tmp_path / "res" / "model-last.pt"
    raw = ckpt_io.load_checkpoint(path)
    raw["config"] = {k: v for k, v in raw["config"].items() if not k.startswith("text_")}  # an older vdeploy's
    ckpt_io.save_checkpoint(raw, path)
    resumed = trainer()
    resumed.load(path)
    assert resumed.step == 1


def test_the_benchmark_times_a_token_model_against_torch(token_export, tmp_path):
    """``vdeploy bench --model-dir`` on a token (and frame-conditioned) model: every input fed by role, torch and
    the runtime on the same inputs, guidance with the null pooled vector and the null tokens in both."""
    from vdeploy.bench import main

    model_dir, _, _ = token_export
    out = tmp_path / "bench.json"
    rows = {"torch", "ort", "ort-cfg", "ort-guided"}
    argv = ["--model-dir", str(model_dir), "--work", str(tmp_path / "work"), "--backends", ",".join(sorted(rows)),
            "--batches", "1,2", "--repeats", "1", "--warmup", "1", "--threads", "1",
            "--loop-steps", "2", "--sampling-rounds", "1", "--dpmpp-steps", "4",
            "--skip", "coldstart,profile,quality", "--json", str(out), "-q"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    for run in ("seed_ddpm", "runtime_ddpm", "runtime_dpmpp"):  # the sampling section feeds the tokens too
        assert report["sampling"][run]["total_s"] > 0, run
    results = report["results"]
    assert set(results) == rows
    for name, entry in results.items():
        assert entry["status"] == "ok", (name, entry.get("error"))
        # fp32 graphs against torch fp32 on the same inputs (the guided rows against torch's guided eps): the
        # export's own per-call tolerance, float32 round-off of a few hundred ops
        assert 0 <= entry["max_abs_err_vs_torch"] < 1e-4, (name, entry["max_abs_err_vs_torch"])
