"""Reusable export fixtures: tiny checkpoints and one tiny exported model directory per test session.

Use from any test module::

    from export_fixtures import exported_model, exported_model_dir  # noqa: F401  (pytest fixtures)

    def test_something(exported_model_dir):      # Path of a checked model dir (vdeploy.json, ...)
        ...

``exported_model`` gives the richer :class:`Exported` (dir, checkpoint, config, the torch ``Unet3D``).
The model: a conditioned tiny ``vdeploy.model.Unet3D`` (dim 8, mults 1,2, 4 frames, 16 px, cond_dim 6,
20 timesteps) with random weights, saved as a vdeploy checkpoint (step 7) and exported with ``--cfg``
and ``--fp16`` (``optimize="none"``: no latency measurement in tests). Building it takes ~10 s once.

torch runs single-threaded in these tests: on the shared 2-core machines a second intra-op thread
that gets descheduled stalls every OpenMP barrier (tiny convolutions then cost 50x more).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

TINY_EXPORT_CONFIG = {
    "dim": 8,
    "dim_mults": [1, 2],
    "attn_heads": 2,
    "attn_dim_head": 8,
    "image_size": 16,
    "num_frames": 4,
    "timesteps": 20,
    "cond_dim": 6,
}
TINY_UNCOND_CONFIG = {k: v for k, v in TINY_EXPORT_CONFIG.items() if k != "cond_dim"}
STEP = 7


@dataclass
class Exported:
    dir: Path
    ckpt: Path
    config: dict
    unet: object  # vdeploy.model.Unet3D (eval mode)


def single_thread_torch() -> None:
    import torch

    torch.set_num_threads(1)


def save_tiny_bert(folder: Path, vocab: list[str]) -> Path:
    """A tiny random BERT (hidden 12) with a WordPiece tokenizer over ``vocab``, saved the way HF saves models."""
    import torch
    from transformers import BertConfig, BertModel

    try:
        from transformers import BertTokenizerFast as Tokenizer
    except ImportError:  # transformers >= 5 folds the fast tokenizer into BertTokenizer
        from transformers import BertTokenizer as Tokenizer
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # the vocabulary by position: transformers 5 ignores a `vocab_file=` keyword and tokenizes everything as [UNK]
    tokenizer = Tokenizer(str(folder / "vocab.txt"))
    word = next(w for w in vocab if not w.startswith("["))
    assert tokenizer(word, add_special_tokens=False)["input_ids"] == [vocab.index(word)], "tokenizer lost its vocab"
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=12, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=32)
    BertModel(config).save_pretrained(folder)
    return folder


def tiny_unet(config: dict = TINY_EXPORT_CONFIG, seed: int = 0):
    """A tiny ``vdeploy.model.Unet3D`` with random weights (null embedding and position bias included)."""
    import torch

    from vdeploy import config as vconfig
    from vdeploy.model import Unet3D

    resolved = vconfig.resolve(dict(config))
    torch.manual_seed(seed)
    unet = Unet3D(**vconfig.unet_kwargs(resolved))
    with torch.no_grad():  # make every table non-trivial: zero-initialized biases hide bugs
        for name, p in unet.named_parameters():
            if "relative_attention_bias" in name or name.endswith("bias"):
                p.normal_(0, 0.2)
    return unet.eval(), resolved


def diffusion_state(unet, config: dict) -> dict:
    """The ``GaussianDiffusion`` state dict around ``unet`` (``denoise_fn.*`` + schedule buffers)."""
    from vdeploy.diffusion import GaussianDiffusion

    from vdeploy import config as vconfig

    return GaussianDiffusion(unet, **vconfig.diffusion_kwargs(config)).state_dict()


def write_vdeploy_checkpoint(path: Path, unet, config: dict, step: int = STEP) -> Path:
    """A vdeploy checkpoint (``vdeploy.checkpoint.make_checkpoint``) whose EMA and raw weights are ``unet``'s."""
    from vdeploy.checkpoint import make_checkpoint, save_checkpoint

    state = diffusion_state(unet, config)
    data = make_checkpoint(step=step, model=state, ema=state, optimizer=None, scaler=None, config=config)
    return save_checkpoint(data, path)


def write_upstream_checkpoint(path: Path, diffusion_state_dict: dict, step: int = STEP, ema_state_dict=None) -> Path:
    """``model-N.pt`` as video-diffusion-pytorch 0.6.3's ``Trainer.save`` writes it (no config inside)."""
    import torch

    data = {
        "step": step,
        "model": diffusion_state_dict,
        "ema": ema_state_dict if ema_state_dict is not None else diffusion_state_dict,
        "scaler": {},  # GradScaler(enabled=False).state_dict()
    }
    torch.save(data, str(path))
    return path


@pytest.fixture(scope="session")
def exported_model(tmp_path_factory) -> Exported:
    """A tiny conditioned model exported with cfg and fp16 graphs (once per session)."""
    from vdeploy.export import export_onnx

    single_thread_torch()
    root = tmp_path_factory.mktemp("export")
    unet, config = tiny_unet()
    ckpt = write_vdeploy_checkpoint(root / "model-7.pt", unet, config)
    out = root / "model"
    export_onnx(ckpt, out, cfg=True, fp16=True, optimize="none")
    return Exported(out, ckpt, config, unet)


@pytest.fixture(scope="session")
def exported_model_dir(exported_model) -> Path:
    """The directory of :func:`exported_model`."""
    return exported_model.dir
