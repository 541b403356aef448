"""Trainer and checkpoints: learning, exact resume, safe loading, the seed's checkpoint format."""

from __future__ import annotations

import json

import pytest
import torch

from vdeploy import checkpoint as ckpt_io
from vdeploy.checkpoint import CheckpointError, load_checkpoint, load_denoiser_state
from vdeploy.config import diffusion_kwargs, resolve, unet_kwargs
from vdeploy.data import DataError, synth_dataset
from vdeploy.diffusion import GaussianDiffusion
from vdeploy.trainer import Trainer

CONFIG = resolve({"dim": 8, "dim_mults": [1, 2], "attn_heads": 2, "attn_dim_head": 8,
                  "image_size": 16, "num_frames": 4, "timesteps": 10})



@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    synth_dataset(d, num=4, frames=4, size=16, seed=0)
    return d


def make_diffusion(config=CONFIG, seed=0, text_encoder=None):
    from vdeploy.model import Unet3D

    torch.manual_seed(seed)
    return GaussianDiffusion(Unet3D(**unet_kwargs(config)), **diffusion_kwargs(config), text_encoder=text_encoder)


def make_trainer(folder, results, steps, **kw):
    encoder = kw.pop("text_encoder", None)
    args = {"train_batch_size": 2, "train_num_steps": steps, "gradient_accumulate_every": 1,
            "save_and_sample_every": kw.pop("save_every", steps), "results_folder": results, "num_sample_rows": 1,
            "train_lr": 1e-3, "step_start_ema": 2, "update_ema_every": 1, "progress": False, "config": CONFIG, **kw}
    return Trainer(make_diffusion(config=args["config"], text_encoder=encoder), folder, **args)


def _state_equal(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_loss_falls_when_overfitting_two_clips(tmp_path):
    data = tmp_path / "two"
    synth_dataset(data, num=2, frames=4, size=16, seed=1)
    trainer = make_trainer(data, tmp_path / "res", steps=80, save_every=1000, train_lr=3e-3)
    losses = []
    trainer.train(log_fn=lambda log: losses.append(log["loss"]))
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)
    assert (tmp_path / "res" / "model-last.pt").is_file()  # the end of training is always saved


def test_resume_continues_bit_for_bit(data_dir, tmp_path):
    straight = make_trainer(data_dir, tmp_path / "a", steps=6, save_every=3, gradient_accumulate_every=2)
    straight.train()

    first = make_trainer(data_dir, tmp_path / "b", steps=3, gradient_accumulate_every=2)
    first.train()
    torch.manual_seed(123)  # a fresh process would be in another RNG state: the checkpoint restores it
    resumed = make_trainer(data_dir, tmp_path / "b", steps=6, save_every=3, gradient_accumulate_every=2)
    assert resumed.load(-1).name == "model-last.pt"
    assert resumed.step == 3
    resumed.train()

    assert _state_equal(straight.unwrapped_model.state_dict(), resumed.unwrapped_model.state_dict())
    assert _state_equal(straight.ema_model.state_dict(), resumed.ema_model.state_dict())
    assert straight.data_order.consumed == resumed.data_order.consumed == 6 * 2 * 2
    log_a = [json.loads(line)["loss"] for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(line)["loss"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert log_a == log_b  # the same losses step by step, across the restart


def test_checkpoint_is_weights_only_and_complete(data_dir, tmp_path):
    trainer = make_trainer(data_dir, tmp_path, steps=2, save_every=2)
    trainer.train()
    path = tmp_path / "model-1.pt"
    assert (tmp_path / "model-last.pt").samefile(path) or (tmp_path / "model-last.pt").read_bytes() == path.read_bytes()
    assert (tmp_path / "1.gif").is_file() and (tmp_path / "sample-last.gif").is_file()
    raw = torch.load(path, weights_only=True)  # never runs code
    assert raw["format"] == "vdeploy-checkpoint" and raw["step"] == 2
    assert raw["config"] == CONFIG
    assert raw["optimizer"]["state"]  # Adam moments are there (the seed dropped them)
    assert set(raw["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert raw["data"] == {"seed": 0, "consumed": 4, "n": 4}
    assert all(k.startswith("denoise_fn.") or k in dict(trainer.ema_model.named_buffers()) for k in raw["ema"])
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


def test_load_denoiser_state_gives_strict_unet_weights_and_config(data_dir, tmp_path):
    from vdeploy.model import Unet3D

    trainer = make_trainer(data_dir, tmp_path, steps=3, step_start_ema=0)
    trainer.train()
    sd, config, step = load_denoiser_state(tmp_path / "model-last.pt")
    assert config == CONFIG and step == 3
    unet = Unet3D(**unet_kwargs(config))
    unet.load_state_dict(sd, strict=True)
    assert _state_equal(sd, trainer.ema_model.denoise_fn.state_dict())
    raw_sd, _, _ = load_denoiser_state(tmp_path / "model-last.pt", ema=False)
    assert _state_equal(raw_sd, trainer.unwrapped_model.denoise_fn.state_dict())
    assert not _state_equal(raw_sd, sd)  # EMA started at step 0, so it lags the raw weights


def test_seed_format_checkpoint_loads(data_dir, tmp_path, ref_vdp):
    # what video-diffusion-pytorch 0.6.3's Trainer.save writes
    torch.manual_seed(0)
    unet = ref_vdp.Unet3D(**{k: v for k, v in unet_kwargs(CONFIG).items() if k not in ("norm_type",
                                                                                      "frame_conditioning")})
    ref_diffusion = ref_vdp.GaussianDiffusion(unet, **diffusion_kwargs(CONFIG))
    seed_ckpt = {"step": 1000, "model": ref_diffusion.state_dict(), "ema": ref_diffusion.state_dict(),
                 "scaler": torch.amp.GradScaler("cuda", enabled=False).state_dict()}
    path = tmp_path / "model-1.pt"
    torch.save(seed_ckpt, path)

    data = load_checkpoint(path)
    assert data["format"] == "video-diffusion-pytorch" and data["step"] == 1000 and data["config"] is None
    sd, config, step = load_denoiser_state(path)
    assert config is None and step == 1000
    from vdeploy.model import Unet3D

    Unet3D(**unet_kwargs(CONFIG)).load_state_dict(sd, strict=True)

    trainer = make_trainer(data_dir, tmp_path, steps=1001)
    with pytest.warns(UserWarning, match="no optimizer state"):
        trainer.load(1)
    assert trainer.step == 1000
    assert _state_equal(trainer.unwrapped_model.state_dict(), ref_diffusion.state_dict())


def test_bare_state_dicts_load_too(tmp_path):
    diffusion = make_diffusion()
    torch.save(diffusion.state_dict(), tmp_path / "diffusion.pt")
    torch.save(diffusion.denoise_fn.state_dict(), tmp_path / "unet.pt")
    for name in ("diffusion.pt", "unet.pt"):
        with pytest.warns(UserWarning, match="no EMA weights"):
            sd, config, step = load_denoiser_state(tmp_path / name)
        assert _state_equal(sd, diffusion.denoise_fn.state_dict()) and config is None and step is None


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"\x00garbage" * 10, "cannot load checkpoint"),
    ("evil", "cannot load checkpoint"),
    ([1, 2, 3], "not a checkpoint: it holds a list"),
    ({"foo": 1}, "not a vdeploy or video-diffusion-pytorch checkpoint"),
])
def test_bad_checkpoints_raise_checkpoint_error(tmp_path, content, message):
    path = tmp_path / "c.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "evil":
        torch.save({"model": _Evil()}, path)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "model-1.pt"
    ckpt_io.save_checkpoint({"step": 1, "model": {"w": torch.ones(2)}}, path)
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt_io.save_checkpoint({"step": 2, "model": {"w": torch.zeros(2)}}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model-1.pt"]


def test_latest_checkpoint_prefers_model_last_then_highest_milestone(tmp_path):
    assert ckpt_io.latest_checkpoint(tmp_path) is None
    for n in (2, 10, 9):
        (tmp_path / f"model-{n}.pt").write_bytes(b"")
    assert ckpt_io.latest_checkpoint(tmp_path).name == "model-10.pt"
    (tmp_path / "model-last.pt").write_bytes(b"")
    assert ckpt_io.latest_checkpoint(tmp_path).name == "model-last.pt"


def test_ema_follows_the_seeds_rule(data_dir, tmp_path):
    trainer = make_trainer(data_dir, tmp_path, steps=1, step_start_ema=0, ema_decay=0.9)
    before = [p.detach().clone() for p in trainer.ema_model.parameters()]
    trainer.train()
    for old, ema, new in zip(before, trainer.ema_model.parameters(), trainer.unwrapped_model.parameters()):
        torch.testing.assert_close(ema, old * 0.9 + 0.1 * new)


class _CountingEncoder:
    """A stand-in text encoder: a fixed random embedding per caption, counting its calls."""

    dim, path = 6, "fake-encoder"

    def __init__(self):
        self.calls = 0

    def __call__(self, texts, return_cls_repr=False, device=None):
        self.calls += 1
        return torch.stack([torch.randn(self.dim, generator=torch.Generator().manual_seed(hash(t) % 2**31))
                            for t in texts]).to(device or "cpu")


def test_captions_condition_training_with_embeddings_cached_once(data_dir, tmp_path):
    encoder = _CountingEncoder()
    config = resolve({**CONFIG, "cond_dim": 6})
    trainer = make_trainer(data_dir, tmp_path, steps=3, save_every=3, config=config, text_encoder=encoder,
                           null_cond_prob=0.5)
    trainer.train()
    assert encoder.calls == 1  # all distinct captions embedded once, up front
    assert trainer.cond_table.shape == (4, 6)
    assert (tmp_path / "1.txt").read_text().strip() in trainer.ds.captions  # the sample grid's captions
    raw = torch.load(tmp_path / "model-last.pt", weights_only=True)
    assert raw["text_encoder"] == "fake-encoder" and raw["config"]["cond_dim"] == 6


def test_conditional_model_needs_captions(tmp_path):
    from vdeploy.data import write_gif

    write_gif(torch.zeros(4, 16, 16, 3, dtype=torch.uint8).numpy(), tmp_path / "data" / "x.gif")
    config = resolve({**CONFIG, "cond_dim": 6})
    with pytest.raises(DataError, match="1 of 1 videos have no caption"):
        make_trainer(tmp_path / "data", tmp_path / "res", steps=1, config=config, text_encoder=_CountingEncoder())


def test_config_must_match_the_model(data_dir, tmp_path):
    with pytest.raises(ValueError, match="num_frames=8 vs model 4"):
        Trainer(make_diffusion(), data_dir, config={**CONFIG, "num_frames": 8}, results_folder=tmp_path, progress=False)

