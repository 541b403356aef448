"""``text_standardize``: the caption map fitted on the training captions, stored in the U-Net's buffers, applied
wherever a caption becomes ``cond`` (training's caption table, ``GaussianDiffusion.embed_text``, the exported text
encoder graph the runtime runs), and nothing at all when off."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export_fixtures import save_tiny_bert, single_thread_torch
from vdeploy import config as C
from vdeploy.diffusion import GaussianDiffusion
from vdeploy.model import Unet3D
from vdeploy.text import TextEncoder, fit_standardizer, standardize, standardize_for

single_thread_torch()

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "green", "yellow", "circle", "square",
         "triangle", "moving", "left", "right", "up", "down"]
BASE = {"dim": 8, "dim_mults": [1, 2], "attn_heads": 2, "attn_dim_head": 8, "use_sparse_linear_attn": False,
        "image_size": 16, "num_frames": 4, "timesteps": 10, "cond_dim": 12}


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny random BERT whose tokenizer knows the caption words (distinct captions, distinct vectors)."""
    from transformers import BertTokenizer

    folder = save_tiny_bert(tmp_path_factory.mktemp("bert"), VOCAB)
    # the vocabulary passed by position: transformers 5 ignores the vocab_file keyword (every word [UNK])
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    assert TextEncoder(folder).tokenize(["a red circle"])["input_ids"].tolist() == [[2, 5, 6, 10, 3]]
    return folder


def _diffusion(config: dict, encoder=None) -> GaussianDiffusion:
    resolved = C.resolve(dict(config))
    torch.manual_seed(0)
    return GaussianDiffusion(Unet3D(**C.unet_kwargs(resolved)), **C.diffusion_kwargs(resolved), text_encoder=encoder)


def test_off_by_default_changes_nothing():
    """The default builds the seed's Unet3D: same kwargs, same state-dict keys, same weights (no draws added)."""
    assert C.resolve(dict(BASE))["text_standardize"] == "none"
    assert "text_standardize" not in C.unet_kwargs(C.resolve(dict(BASE)))
    off = _diffusion(BASE).denoise_fn.state_dict()
    on = _diffusion({**BASE, "text_standardize": "whiten"}).denoise_fn.state_dict()
    assert set(on) - set(off) == {"text_mean", "text_proj"}
    assert all(torch.equal(off[k], on[k]) for k in off)  # building the buffers draws no random numbers
    with pytest.raises(C.ConfigError, match="text_standardize"):
        C.resolve({**BASE, "text_standardize": "pca"})
    with pytest.raises(ValueError, match="conditional"):
        Unet3D(dim=8, dim_mults=(1, 2), text_standardize="std")


@pytest.mark.parametrize("mode", ["std", "whiten"])
def test_fit_separates_what_the_captions_share(mode):
    """Vectors that share a large common part and differ in a small one (as mean-pooled captions do) come out
    centred, of unit mean square per dimension, and no longer pointing the same way."""
    g = torch.Generator().manual_seed(0)
    shared = 5 * torch.randn(16, generator=g)
    x = shared + 0.1 * torch.randn(64, 16, generator=g)
    mean, proj = fit_standardizer(x, mode)
    y = standardize(x, mean, proj)
    # float32 sums of 64 rows of values ~1: round-off ~1e-6
    assert y.mean(dim=0).abs().max() < 1e-4
    if mode == "whiten":
        assert abs(y.pow(2).sum(dim=1).mean().item() / 16 - 1) < 1e-4
    else:  # each dimension's variance over its floor: just under 1
        assert (y.pow(2).mean(dim=0) <= 1 + 1e-4).all() and (y.pow(2).mean(dim=0) > 0.9).all()
    cos = torch.nn.functional.cosine_similarity
    assert cos(x[0], x[1], dim=0) > 0.99 and cos(y[0], y[1], dim=0).abs() < 0.6
    with pytest.raises(ValueError, match="at least two"):
        fit_standardizer(x[:1], mode)


def test_training_table_embed_text_and_runtime_agree(bert_dir, tmp_path):
    """The trainer fits the map on its captions into the U-Net's buffers (saved with the weights); the caption
    table it trains on, ``embed_text`` on a caption, and the exported text encoder the runtime runs give the same
    vector; the export's null embedding is the trained parameter, untouched."""
    from vdeploy.data import synth_dataset
    from vdeploy.runtime.text import TextEncoder as RuntimeTextEncoder
    from vdeploy.trainer import Trainer

    data = tmp_path / "data"
    synth_dataset(data, num=6, frames=4, size=16, seed=0)
    config = C.resolve({**BASE, "text_standardize": "whiten"})
    encoder = TextEncoder(bert_dir)
    diffusion = _diffusion(config, encoder)
    trainer = Trainer(diffusion, data, train_batch_size=2, train_num_steps=1, gradient_accumulate_every=1,
                      save_and_sample_every=1, results_folder=tmp_path / "res", num_sample_rows=1,
                      step_start_ema=0, update_ema_every=1, progress=False, config=config, cond_scale=2.0)
    unet = trainer.unwrapped_model.denoise_fn
    captions = trainer.ds.captions
    raw = encoder(captions)
    mean, proj = fit_standardizer(raw, "whiten")
    assert torch.equal(unet.text_mean, mean) and torch.equal(unet.text_proj, proj)
    assert torch.allclose(trainer.cond_table, standardize(raw, mean, proj), atol=1e-6)
    # the same caption through GaussianDiffusion.embed_text (sampling with captions): the same vector
    assert torch.allclose(diffusion.embed_text(captions[:2]), trainer.cond_table[:2], atol=1e-6)
    trainer.train()
    saved = torch.load(tmp_path / "res" / "model-last.pt", weights_only=True)
    assert torch.equal(saved["ema"]["denoise_fn.text_proj"], proj)

    from click.testing import CliRunner

    from vdeploy.cli import main
    from vdeploy.runtime import manifest as vmanifest

    out = tmp_path / "model"
    result = CliRunner().invoke(main, ["export", "--ckpt", str(tmp_path / "res" / "model-last.pt"), "--out", str(out),
                                       "--text-encoder", str(bert_dir), "--optimize", "none"])
    assert result.exit_code == 0, result.output
    assert vmanifest.load(out).conditioning.pooling == "masked_mean_excluding_cls+whiten"
    # the null embedding is the trained parameter as it is: it was learned in the mapped space
    assert np.array_equal(np.load(out / "null_cond_emb.npy").reshape(-1),
                          saved["ema"]["denoise_fn.null_cond_emb"].reshape(-1).numpy())
    runtime = RuntimeTextEncoder(out / "text_encoder")
    prompts = ["a red circle moving left", "a yellow triangle moving down", "zebra"]
    got = runtime(prompts)
    want = diffusion.embed_text(prompts).numpy()
    # float32 through 2 BERT layers (~1e-6 of values ~1), then a 12x12 map with gains ~10: well under 1e-4
    assert got.shape == (3, 12) and np.abs(got - want).max() < 1e-4
    assert np.abs(got - raw[:1].numpy()).max() > 0.1  # the runtime's vector is the mapped one, not the raw one


def test_export_off_is_the_raw_pooled_vector(bert_dir, tmp_path):
    from vdeploy.export.text_encoder import export_text_encoder
    from vdeploy.runtime.text import TextEncoder as RuntimeTextEncoder

    diffusion = _diffusion(BASE, TextEncoder(bert_dir))
    assert standardize_for(diffusion.denoise_fn, torch.ones(2, 12)).equal(torch.ones(2, 12))
    info = export_text_encoder(tmp_path, bert_dir, cond_dim=12)
    assert info["pooling"] == "masked_mean_excluding_cls"
    prompts = ["a red circle moving left", "blue"]
    got = RuntimeTextEncoder(tmp_path / "text_encoder")(prompts)
    assert np.abs(got - TextEncoder(bert_dir)(prompts).numpy()).max() < 1e-5
    assert torch.equal(diffusion.embed_text(prompts), TextEncoder(bert_dir)(prompts))
