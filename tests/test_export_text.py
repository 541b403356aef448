"""Text encoder export: a local BERT + the seed's bert_embed pooling -> text_encoder/model.onnx + tokenizer.json."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from export_fixtures import TINY_EXPORT_CONFIG, save_tiny_bert, single_thread_torch, tiny_unet, write_vdeploy_checkpoint
from vdeploy.export.checks import ort_session
from vdeploy.export.spec import FP32_ATOL, ExportError
from vdeploy.runtime import manifest as vmanifest

single_thread_torch()

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "green", "circle", "square",
         "moving", "left", "right", "up", "down"]
CAPTIONS = ["a red circle moving left", "green", "a blue square moving up and down quickly", "zebra"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny random BERT (hidden 12) with a WordPiece tokenizer, saved the way HF saves models."""
    return save_tiny_bert(tmp_path_factory.mktemp("bert"), VOCAB)


def _runtime_embed(folder, texts):
    """What the torch-free runtime does: ``tokenizers`` on tokenizer.json, then onnxruntime."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    enc = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in enc], np.int64)
    mask = np.array([e.attention_mask for e in enc], np.int64)
    return ort_session(folder / "model.onnx").run(None, {"input_ids": ids, "attention_mask": mask})[0]


@pytest.mark.parametrize("cls_repr", [False, True], ids=["masked-mean", "cls"])
def test_text_encoder_export_matches_vdeploy_text(bert_dir, tmp_path, cls_repr):
    from vdeploy.export.text_encoder import export_text_encoder
    from vdeploy.text import TextEncoder

    info = export_text_encoder(tmp_path, bert_dir, cls_repr=cls_repr, cond_dim=12)
    folder = tmp_path / "text_encoder"
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "tokenizer.json"]
    onnx.checker.check_model(str(folder / "model.onnx"), full_check=True)
    model = onnx.load(str(folder / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output] == ["embedding"]
    assert info["pooling"] == ("cls" if cls_repr else "masked_mean_excluding_cls")
    assert max(info["parity"]["max_abs_err"].values()) <= FP32_ATOL
    ref = TextEncoder(bert_dir)(CAPTIONS, return_cls_repr=cls_repr).numpy()
    got = _runtime_embed(folder, CAPTIONS)
    assert got.shape == (4, 12)
    assert np.abs(got - ref).max() <= FP32_ATOL


def test_text_encoder_width_must_match_cond_dim(bert_dir, tmp_path):
    from vdeploy.export.text_encoder import export_text_encoder

    with pytest.raises(ExportError, match="embeds to 12 dims but the model's cond_dim is 6"):
        export_text_encoder(tmp_path, bert_dir, cond_dim=6)


def test_export_with_text_encoder_and_sample_from_text(bert_dir, tmp_path):
    from click.testing import CliRunner

    from vdeploy.cli import main
    from vdeploy.runtime import Pipeline

    unet, config = tiny_unet({**TINY_EXPORT_CONFIG, "cond_dim": 12})
    ckpt = write_vdeploy_checkpoint(tmp_path / "model-1.pt", unet, config)
    out = tmp_path / "model"
    result = CliRunner().invoke(
        main, ["export", "--ckpt", str(ckpt), "--out", str(out), "--text-encoder", str(bert_dir), "--optimize", "none"]
    )
    assert result.exit_code == 0, result.output
    manifest = vmanifest.load(out)
    cond = manifest.conditioning
    assert cond.text_encoder == "text_encoder" and cond.cond_dim == 12
    assert cond.pooling == "masked_mean_excluding_cls" and cond.max_length == 128
    assert {"text_encoder/model.onnx", "text_encoder/tokenizer.json"} <= set(manifest.files)
    assert max(manifest.parity["text_encoder"]["max_abs_err"].values()) <= FP32_ATOL
    video = Pipeline.from_dir(out, backend="cpu")(text=["a red circle"], sampler="ddim", steps=2, seed=0)
    assert video.shape == (1, 3, 4, 16, 16) and np.isfinite(video).all()
