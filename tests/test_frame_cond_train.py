"""Trained masked frame conditioning (MCVD, Voleti et al. 2022), the training half: the config key, the
U-Net's frames/mask inputs, the masked loss, the trainer's per-clip masks, sampling with known frames and
``vdeploy train --frame-conditioning``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from vdeploy import config as C
from vdeploy.checkpoint import load_denoiser_state
from vdeploy.cli import main
from vdeploy.diffusion import GaussianDiffusion
from vdeploy.model import Unet3D
from vdeploy.train_parts import MASK_KINDS, check_mask_probs, frame_masks

BASE = {"dim": 8, "dim_mults": [1, 2], "attn_heads": 2, "attn_dim_head": 8, "image_size": 16, "num_frames": 4,
        "timesteps": 10}
CONFIG = C.resolve({**BASE, "frame_conditioning": True})
SHAPE = (2, 3, 4, 16, 16)
MASK = torch.tensor([[1.0, 0, 0, 0], [1, 0, 0, 1]])  # prediction of 3 frames, interpolation of 2


def make_unet(config=CONFIG, seed=0, **kw) -> Unet3D:
    torch.manual_seed(seed)
    return Unet3D(**{**C.unet_kwargs(config), **kw}).eval()


@pytest.fixture(scope="module")
def unet():
    return make_unet()


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    frames = torch.rand(SHAPE, generator=g) * 2 - 1
    return x, torch.tensor([2, 7]), frames


# ------------------------------------------------------------------------------------------ config --

def test_config_key_defaults_off_and_is_validated():
    plain = C.resolve(BASE)
    assert plain["frame_conditioning"] is False and C.unet_kwargs(plain)["frame_conditioning"] is False
    assert C.unet_kwargs(CONFIG)["frame_conditioning"] is True
    for bad in (1, "true", None):
        with pytest.raises(C.ConfigError, match="'frame_conditioning' must be true or false"):
            C.resolve({**BASE, "frame_conditioning": bad})
    for name in C.PRESETS:
        assert C.load(name)["frame_conditioning"] is False


# ------------------------------------------------------------------------------------------- model --

def test_plain_state_dicts_load_strict_and_only_the_stem_widens(ref_vdp):
    ref_kwargs = {k: v for k, v in C.unet_kwargs(C.resolve(BASE)).items()
                  if k not in ("norm_type", "frame_conditioning")}
    torch.manual_seed(0)
    ref_sd = ref_vdp.Unet3D(**ref_kwargs).state_dict()
    plain = Unet3D(**C.unet_kwargs(C.resolve(BASE)))
    assert plain.frame_conditioning is False
    plain.load_state_dict(ref_sd, strict=True)  # 0.6.3 weights, unchanged by the new key

    fc = make_unet()
    assert fc.frame_conditioning is True
    fc_sd, plain_sd = fc.state_dict(), plain.state_dict()
    assert list(fc_sd) == list(plain_sd)  # the same names: only the stem's input width differs
    assert fc_sd["init_conv.weight"].shape == (8, 3 * 2 + 1, 1, 7, 7)
    assert plain_sd["init_conv.weight"].shape == (8, 3, 1, 7, 7)
    assert [k for k in fc_sd if fc_sd[k].shape != plain_sd[k].shape] == ["init_conv.weight"]
    with pytest.raises(RuntimeError, match="init_conv.weight"):
        fc.load_state_dict(plain_sd, strict=True)


def test_no_frames_is_zero_frames_and_mask(unet):
    x, t, _ = _inputs()
    with torch.no_grad():
        none = unet(x, t)
        zeros = unet(x, t, frames=torch.zeros_like(x), mask=torch.zeros(2, 4))
    assert torch.equal(none, zeros)


def test_known_frames_steer_the_output_and_unknown_values_are_ignored(unet):
    x, t, frames = _inputs()
    with torch.no_grad():
        generated = unet(x, t)
        known = unet(x, t, frames=frames, mask=MASK)
        other = frames.clone()
        other[0, :, 1:] = 7.0  # unknown frames of row 0 and 1
        other[1, :, 1:3] = -3.0
        ignored = unet(x, t, frames=other, mask=MASK.bool())  # a bool mask works as the float one
        changed = frames.clone()
        changed[0, :, 0] = -changed[0, :, 0]  # a known frame of row 0
        moved = unet(x, t, frames=changed, mask=MASK)
    assert (known - generated).abs().amax(dim=(1, 2, 3, 4)).min() > 1e-2  # every row sees its known frames
    assert torch.equal(known, ignored)
    assert (moved[0] - known[0]).abs().max() > 1e-3
    assert torch.equal(moved[1], known[1])  # rows are independent


def test_a_plain_model_refuses_frames_and_bad_inputs_are_value_errors(unet):
    x, t, frames = _inputs()
    plain = make_unet(C.resolve(BASE))
    with pytest.raises(ValueError, match="without frame_conditioning"):
        plain(x, t, frames=frames, mask=MASK)
    with pytest.raises(ValueError, match="without frame_conditioning"):
        plain(x, t, mask=MASK)
    with pytest.raises(ValueError, match="frames without mask"):
        unet(x, t, frames=frames)
    with pytest.raises(ValueError, match="mask without frames"):
        unet(x, t, mask=MASK)
    with pytest.raises(ValueError, match="frames must have the shape of x"):
        unet(x, t, frames=frames[:, :, :2], mask=MASK)
    with pytest.raises(ValueError, match=r"mask must have shape \(b, f\)"):
        unet(x, t, frames=frames, mask=MASK[:, :3])


def test_guidance_gives_both_calls_the_frames():
    unet = make_unet(C.resolve({**CONFIG, "cond_dim": 6}))
    x, t, frames = _inputs()
    cond = torch.randn(2, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        guided = unet.forward_with_cond_scale(x, t, cond=cond, cond_scale=3.0, frames=frames, mask=MASK)
        c = unet(x, t, cond=cond, frames=frames, mask=MASK)
        n = unet(x, t, cond=cond, null_cond_prob=1.0, frames=frames, mask=MASK)
        n_plain = unet(x, t, cond=cond, null_cond_prob=1.0)
    torch.testing.assert_close(guided, n + (c - n) * 3.0, rtol=0, atol=1e-6)
    assert (guided - (n_plain + (c - n_plain) * 3.0)).abs().max() > 1e-3  # the null call did see them


class _Traced(nn.Module):
    def __init__(self, unet, frames: int):
        super().__init__()
        self.unet = unet
        for name, table in unet.position_tables(frames).items():
            self.register_buffer(name, table)

    def forward(self, x, t, frames, mask):
        tables = {"pos_bias": self.pos_bias, "rotary_cos": self.rotary_cos, "rotary_sin": self.rotary_sin}
        return self.unet(x, t, tables=tables, frames=frames, mask=mask)


def test_frames_and_mask_trace_to_onnx(unet, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    x, t, frames = _inputs()
    path = tmp_path / "fc.onnx"
    with torch.no_grad():
        torch.onnx.export(_Traced(unet, 4).eval(), (x, t, frames, MASK), str(path), opset_version=17, dynamo=False,
                          input_names=["x", "t", "frames", "mask"], output_names=["eps"])
        expected = unet(x, t, frames=frames, mask=MASK)
    assert [i.name for i in onnx.load(str(path)).graph.input] == ["x", "t", "frames", "mask"]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"x": x.numpy(), "t": t.numpy(), "frames": frames.numpy(), "mask": MASK.numpy()})
    assert abs(got - expected.numpy()).max() <= 1e-4
    other = frames.numpy().copy()
    other[0, :, 1:] = 5.0  # the graph ignores unknown frames' values too
    (again,) = sess.run(None, {"x": x.numpy(), "t": t.numpy(), "frames": other, "mask": MASK.numpy()})
    assert abs(again - got).max() == 0


# -------------------------------------------------------------------------------------------- loss --

class _Stub(nn.Module):
    """A denoiser whose prediction is a parameter (so the loss's gradient per element is visible); it records
    what it is given."""

    frame_conditioning = True

    def __init__(self, shape=SHAPE):
        super().__init__()
        self.out = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(5)))
        self.calls = []

    def forward(self, x, t, cond=None, frames=None, mask=None, **_):
        self.calls.append({"x": x.clone(), "t": t.clone(), "frames": frames, "mask": mask})
        return self.out * 1.0

    def forward_with_cond_scale(self, x, t, cond=None, cond_scale=1.0, **kwargs):
        return self.forward(x, t, cond, **kwargs)


def _stub_diffusion(loss_type="l1", **kw):
    stub = _Stub()
    return stub, GaussianDiffusion(stub, image_size=16, num_frames=4, timesteps=10, loss_type=loss_type, **kw)


@pytest.mark.parametrize("loss_type", ["l1", "l2"])
def test_the_loss_covers_the_unknown_frames_only(loss_type):
    stub, diffusion = _stub_diffusion(loss_type)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(SHAPE, generator=g) * 2 - 1, torch.randn(SHAPE, generator=g)
    t = torch.tensor([3, 9])
    loss = diffusion.p_losses(x0, t, noise=noise, mask=MASK)
    call = stub.calls[-1]
    assert call["frames"] is x0 and torch.equal(call["mask"], MASK)  # the denoiser sees the clean video
    unknown = ~MASK.bool()  # (b, f)
    err = (noise - stub.out.detach()).abs() if loss_type == "l1" else (noise - stub.out.detach()) ** 2
    by_hand = torch.cat([err[i][:, unknown[i]].flatten() for i in range(2)]).mean()
    torch.testing.assert_close(loss.detach(), by_hand, rtol=1e-6, atol=0)
    loss.backward()
    grad = stub.out.grad.permute(0, 2, 1, 3, 4)  # (b, f, c, h, w)
    assert grad[MASK.bool()].abs().max() == 0  # a known frame's prediction does not matter
    assert (grad[unknown].flatten(1).abs().amin(dim=1) > 0).all()

    with torch.no_grad():  # perturbing only the known frames' prediction leaves the loss as it was
        stub.out.permute(0, 2, 1, 3, 4)[MASK.bool()] += 10.0
    assert torch.equal(diffusion.p_losses(x0, t, noise=noise, mask=MASK), loss.detach())

    # a batch with no known frame is plain generation: the ordinary loss, with zero frames
    none = diffusion.p_losses(x0, t, noise=noise, mask=torch.zeros(2, 4))
    plain_fn = F.l1_loss if loss_type == "l1" else F.mse_loss
    torch.testing.assert_close(none, plain_fn(noise, stub.out), rtol=1e-6, atol=0)


def test_forward_passes_the_mask_through_and_a_real_model_learns_from_it():
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(make_unet().train(), **C.diffusion_kwargs(CONFIG))
    video = torch.rand(SHAPE)
    t, noise = torch.tensor([1, 8]), torch.randn(SHAPE)
    with_mask = diffusion(video, t=t, noise=noise, mask=MASK)
    without = diffusion(video, t=t, noise=noise)
    assert torch.isfinite(with_mask) and with_mask.item() != without.item()
    with_mask.backward()
    assert diffusion.denoise_fn.init_conv.weight.grad[:, 3:].abs().sum() > 0  # the frames' channels learn


# ------------------------------------------------------------------------------------------- masks --

def test_mask_kinds_follow_the_probabilities_and_their_definitions():
    probs = check_mask_probs((2, 2, 1), num_frames=6)
    assert probs == pytest.approx((0.4, 0.4, 0.2))
    u = torch.rand(20000, 2, generator=torch.Generator().manual_seed(0))
    mask, kind = frame_masks(u, 6, probs)
    assert mask.shape == (20000, 6) and mask.dtype == torch.float32
    freq = torch.bincount(kind, minlength=3).float() / len(kind)
    assert (freq - torch.tensor(probs)).abs().max() < 0.015, freq
    gen, pred, interp = (mask[kind == i] for i in range(3))
    assert gen.sum() == 0
    k = pred.sum(dim=1).long()
    assert torch.equal(pred, (torch.arange(6) < k[:, None]).float())  # the first k frames known
    assert k.min() == 1 and k.max() == 5
    k_freq = torch.bincount(k, minlength=6)[1:].float() / len(k)
    assert (k_freq - 0.2).abs().max() < 0.03, k_freq  # k uniform in 1..f-1
    assert torch.equal(interp, torch.tensor([1.0, 0, 0, 0, 0, 1]).expand_as(interp))
    assert MASK_KINDS == ("generation", "prediction", "interpolation")


def test_a_kind_of_probability_zero_is_never_drawn():
    edges = torch.tensor([[0.0, 0.0], [0.5, 0.5], [1 - 2**-24, 1 - 2**-24]])
    u = torch.cat([edges, torch.rand(2000, 2, generator=torch.Generator().manual_seed(1))])
    for probs, allowed in [((0.5, 0, 0.5), {0, 2}), ((0, 0.3, 0.7), {1, 2}), ((1 / 3, 2 / 3, 0), {0, 1}),
                           ((0, 0, 1), {2}), ((1, 0, 0), {0})]:
        _, kind = frame_masks(u, 4, check_mask_probs(probs, 4))
        assert set(kind.tolist()) == allowed, probs


@pytest.mark.parametrize("probs, frames, message", [
    ((1, 1), 4, "three finite non-negative"), ((1, -1, 1), 4, "non-negative"), ((0, 0, 0), 4, "positive sum"),
    ((1, float("nan"), 1), 4, "finite"), ("abc", 4, "three"), ((1, 0, 1), 2, "interpolation needs at least 3"),
    ((1, 1, 0), 1, "prediction needs at least 2"),
])
def test_bad_mask_probs_are_refused(probs, frames, message):
    with pytest.raises(ValueError, match=message):
        check_mask_probs(probs, frames)
    assert check_mask_probs((1, 0, 0), 1) == (1.0, 0.0, 0.0)


# ----------------------------------------------------------------------------------------- trainer --

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from vdeploy.data import synth_dataset

    d = tmp_path_factory.mktemp("data")
    synth_dataset(d, num=4, frames=4, size=16, seed=0)
    return d


def make_trainer(folder, results, steps, config=CONFIG, **kw):
    from vdeploy.trainer import Trainer

    args = {"train_batch_size": 2, "train_num_steps": steps, "gradient_accumulate_every": 1,
            "save_and_sample_every": steps, "results_folder": results, "num_sample_rows": 1, "train_lr": 1e-3,
            "step_start_ema": 2, "update_ema_every": 1, "progress": False, "config": config, **kw}
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(Unet3D(**C.unet_kwargs(config)), **C.diffusion_kwargs(config))
    return Trainer(diffusion, folder, **args)


def test_masks_are_keyed_by_the_clips_global_position(data_dir, tmp_path, monkeypatch):
    trainer = make_trainer(data_dir, tmp_path, steps=1, mask_probs=(1, 1, 1))
    assert trainer.mask_probs == pytest.approx((1 / 3,) * 3)
    data = torch.rand(4, *SHAPE[1:])
    trainer.step = 7
    whole = trainer._loss_kwargs(1, data, None, 0.0, None)
    assert whole["mask"].shape == (4, 4)
    t, _, u = trainer.step_noise(1, 4)
    assert u.shape == (4, 4) and torch.equal(whole["mask"], frame_masks(u[:, 2:], 4, trainer.mask_probs)[0])
    # the second of two processes with 2 clips each draws the last two clips' masks
    monkeypatch.setattr(type(trainer.accelerator), "process_index", property(lambda self: 1))
    second = trainer._loss_kwargs(1, data[:2], None, 0.0, None)
    assert torch.equal(second["mask"], whole["mask"][2:]) and torch.equal(second["t"], whole["t"][2:])
    # over many steps every kind appears
    monkeypatch.undo()
    kinds = set()
    for step in range(30):
        trainer.step = step
        kinds |= set(frame_masks(trainer.step_noise(0, 4)[2][:, 2:], 4, trainer.mask_probs)[1].tolist())
    assert kinds == {0, 1, 2}


def test_a_plain_model_keeps_its_draws_and_refuses_mask_probs(data_dir, tmp_path):
    plain = make_trainer(data_dir, tmp_path / "p", steps=1, config=C.resolve(BASE))
    assert plain.mask_probs is None and "mask" not in plain._loss_kwargs(0, torch.rand(2, *SHAPE[1:]), None, 0, None)
    assert plain.step_noise(0, 2)[2].shape == (2, 2)
    with pytest.raises(ValueError, match="mask_probs is for a frame-conditioned model"):
        make_trainer(data_dir, tmp_path / "q", steps=1, config=C.resolve(BASE), mask_probs=(1, 0, 0))


def test_resume_continues_the_same_masks_bit_for_bit(data_dir, tmp_path):
    straight = make_trainer(data_dir, tmp_path / "a", steps=4, mask_probs=(0.2, 0.4, 0.4))
    straight.train()
    first = make_trainer(data_dir, tmp_path / "b", steps=2, mask_probs=(0.2, 0.4, 0.4))
    first.train()
    raw = torch.load(tmp_path / "b" / "model-last.pt", weights_only=True)
    assert raw["trainer"]["mask_probs"] == pytest.approx([0.2, 0.4, 0.4])
    assert raw["config"]["frame_conditioning"] is True
    torch.manual_seed(99)
    resumed = make_trainer(data_dir, tmp_path / "b", steps=4, mask_probs=raw["trainer"]["mask_probs"])
    resumed.load(-1)
    resumed.train()
    a, b = straight.unwrapped_model.state_dict(), resumed.unwrapped_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
              for d in ("a", "b")]
    assert losses[0] == losses[1]


# ---------------------------------------------------------------------------------------- sampling --

def test_sample_keeps_the_given_frames_and_feeds_them_every_step(unet):
    diffusion = GaussianDiffusion(unet, **C.diffusion_kwargs(CONFIG)).eval()
    frames = torch.rand(SHAPE, generator=torch.Generator().manual_seed(2))
    seen = []
    original = unet.forward_with_cond_scale
    unet.forward_with_cond_scale = lambda x, t, **kw: seen.append((x.clone(), kw)) or original(x, t, **kw)
    try:
        video = diffusion.sample(frames=frames, mask=MASK.bool(), generator=torch.Generator().manual_seed(0),
                                 progress=False)
    finally:
        del unet.forward_with_cond_scale
    known = MASK.bool()[:, None, :, None, None].expand(SHAPE)
    assert video.shape == SHAPE and torch.equal(video[known], frames[known])  # exactly the given values
    assert video[~known].min() >= 0 and video[~known].max() <= 1 and not torch.equal(video[~known], frames[~known])
    assert len(seen) == 10
    model_frames = frames * 2 - 1
    for x, kw in seen:
        assert torch.equal(kw["frames"], model_frames) and torch.equal(kw["mask"], MASK)
    # the sample's known frames before the first call are q(x_{T-1} | frames), drawn with x_T's noise
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    abar = diffusion.alphas_cumprod[-1]
    expected = abar.sqrt() * model_frames + (1 - abar).sqrt() * x_T
    torch.testing.assert_close(seen[0][0][known], expected[known], rtol=0, atol=1e-6)
    assert torch.equal(seen[0][0][~known], x_T[~known])

    # without frames the frame-conditioned model generates (zeros for frames and mask)
    plain = diffusion.sample(batch_size=2, generator=torch.Generator().manual_seed(0), progress=False)
    assert plain.shape == SHAPE and not torch.equal(plain[known], frames[known])


def test_sample_refuses_frames_it_cannot_use(unet):
    diffusion = GaussianDiffusion(unet, **C.diffusion_kwargs(CONFIG))
    frames = torch.rand(SHAPE)
    with pytest.raises(ValueError, match="together"):
        diffusion.sample(frames=frames, progress=False)
    with pytest.raises(ValueError, match="sample's shape"):
        diffusion.sample(frames=frames[:, :, :2], mask=MASK[:, :2], progress=False)
    plain = GaussianDiffusion(make_unet(C.resolve(BASE)), **C.diffusion_kwargs(C.resolve(BASE)))
    with pytest.raises(ValueError, match="frame_conditioning=True"):
        plain.sample(frames=frames, mask=MASK, progress=False)


# --------------------------------------------------------------------------------------------- CLI --

def _cli(args):
    proc = subprocess.run([sys.executable, "-m", "vdeploy.cli", *args], capture_output=True, text=True)
    return proc.returncode, proc.stderr.strip().splitlines()


@pytest.mark.parametrize("value", ["0.4,0.6", "a,b,c", "-1,1,1", "0,0,0", "1,nan,1"])
def test_bad_mask_probs_are_one_line_errors(value, data_dir, tmp_path):
    code, lines = _cli(["train", "--data", str(data_dir), "--results", str(tmp_path / "r"), "--frame-conditioning",
                        "--mask-probs", value])
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("Error: Invalid value for '--mask-probs'") and "G,P,I" in lines[0]


def test_mask_probs_need_frame_conditioning(data_dir, tmp_path):
    code, lines = _cli(["train", "--data", str(data_dir), "--results", str(tmp_path / "r"), "--mask-probs", "1,1,1"])
    assert code == 2 and len(lines) == 1 and "--mask-probs needs a frame-conditioned model" in lines[0], lines


def test_train_help_documents_the_options():
    out = CliRunner().invoke(main, ["train", "--help"]).output
    assert "--frame-conditioning" in out and "--mask-probs G,P,I" in out and "interpolation" in out


def test_train_frame_conditioning_writes_a_loadable_checkpoint_and_resumes(data_dir, tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(BASE))
    results = tmp_path / "results"
    runner = CliRunner()
    first = runner.invoke(main, ["train", "--data", str(data_dir), "--results", str(results), "--config",
                                     str(config), "--frame-conditioning", "--mask-probs", "1,1,0", "--steps", "3",
                                     "--batch-size", "2", "--sample-rows", "1", "--quiet"])
    assert first.exit_code == 0, first.output
    assert "frame-conditioned (generation/prediction/interpolation 0.5/0.5/0)" in first.output
    raw = torch.load(results / "model-last.pt", weights_only=True)
    assert raw["step"] == 3 and raw["config"]["frame_conditioning"] is True
    assert raw["trainer"]["mask_probs"] == [0.5, 0.5, 0.0]
    sd, stored, _ = load_denoiser_state(results / "model-last.pt")
    model = Unet3D(**C.unet_kwargs(stored))
    model.load_state_dict(sd, strict=True)
    assert model.frame_conditioning and model.init_conv.weight.shape[1] == 7

    again = runner.invoke(main, ["train", "--data", str(data_dir), "--results", str(results), "--resume",
                                     "--steps", "4", "--quiet"])
    assert again.exit_code == 0, again.output
    assert "steps 3 -> 4" in again.output and "0.5/0.5/0" in again.output  # config and mask_probs kept
    assert torch.load(results / "model-last.pt", weights_only=True)["trainer"]["mask_probs"] == [0.5, 0.5, 0.0]
