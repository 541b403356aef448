"""vdeploy.model.Unet3D against the real video-diffusion-pytorch package (0.6.3 GroupNorm, 0.7.0 RMSNorm).

State dicts must load both ways with strict=True and outputs must agree to float32 round-off, for every
feature of the seed; the export-friendly formulation must trace to ONNX and match in onnxruntime.

Tolerance: ``test_outputs_match_reference`` measures the reference's own float32 round-off on each case (the
same reference in float64, ``r = max |ref32 - ref64|``) and asks ours to be within ``4 r`` (plus 8 ulp of
the output's magnitude) of the float64 reference; tests/reference_tolerance.py gives the argument. ``ATOL``
bounds the other comparisons, on the same networks: it sits inside the range that derivation gives for them
(5.6e-6 to 2.0e-5, median 1.2e-5, errors at most 0.29 of it; torch 2.13.0 CPU, 2026-12-04).
"""

from __future__ import annotations

import copy

import pytest
import torch

from vdeploy.model import BERT_MODEL_DIM, Unet3D

ATOL = 1e-5

# tiny configs: seconds each on 2 CPU cores
TINY = dict(dim=16, dim_mults=(1, 2, 4), attn_heads=2, attn_dim_head=16)
CONFIGS = {
    "uncond": dict(TINY),
    "cond": dict(TINY, cond_dim=12),
    "no_linear_attn": dict(TINY, use_sparse_linear_attn=False),
    # init_dim must equal dim (upstream's final conv expects dim * 2 channels), so it is set explicitly
    "custom_dims_1ch": dict(TINY, init_dim=16, out_dim=2, channels=1, init_kernel_size=5),
    # head width above the rotary width (32): only the first 32 features of each head rotate
    "wide_heads": dict(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=48),
    # odd head width: rotary-embedding-torch fails for odd widths <= 32, so 33 (rotary width 32, one left over)
    "odd_heads": dict(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=33),
    "default_heads": dict(dim=16, dim_mults=(1, 2)),  # attn_heads=8, attn_dim_head=32, resnet_groups=8
}
SHAPES = [(2, 4, 16), (1, 7, 24)]  # (batch, frames, size): two frame counts, odd one included


def reference_class(ref_vdp, ref_vdp070, norm_type):
    return ref_vdp.Unet3D if norm_type == "group" else ref_vdp070.Unet3D


def make_pair(ref_cls, cfg: dict, norm_type: str = "group", seed: int = 0):
    """A reference model with random weights and a vdeploy model loaded from its state dict."""
    torch.manual_seed(seed)
    ref = ref_cls(**cfg).eval()
    with torch.no_grad():  # move the constant-initialized params (norm gains/biases) off 1 and 0
        for p in ref.parameters():
            if p.requires_grad and p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.add_(0.1 * torch.randn_like(p))
    ours = Unet3D(**cfg, norm_type=norm_type).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def inputs(cfg: dict, batch: int, frames: int, size: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.get("channels", 3), frames, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    cond = torch.randn(batch, cfg["cond_dim"], generator=g) if cfg.get("cond_dim") else None
    return x, t, cond


def roundoff_tolerance(ref: torch.nn.Module, *args) -> tuple[torch.Tensor, float]:
    """The reference's float64 output for ``args`` and the tolerance its own float32 round-off gives."""
    from reference_tolerance import MARGIN, ULP

    as64 = [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    ref32 = ref(*args)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the tensors the reference makes inside forward (positions, ...)
    try:
        ref64 = copy.deepcopy(ref).double()(*as64)
    finally:
        torch.set_default_dtype(default)
    roundoff = (ref32.double() - ref64).abs().max().item()
    return ref64, MARGIN * roundoff + 8 * ULP * max(1.0, ref64.abs().max().item())


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------------
# state dicts


@pytest.mark.parametrize("norm_type", ["group", "rms"])
@pytest.mark.parametrize("name", ["uncond", "cond", "no_linear_attn", "custom_dims_1ch"])
def test_state_dict_round_trip(ref_vdp, ref_vdp070, norm_type, name):
    cfg = CONFIGS[name]
    ref_cls = reference_class(ref_vdp, ref_vdp070, norm_type)
    torch.manual_seed(0)
    ref = ref_cls(**cfg)
    ours = Unet3D(**cfg, norm_type=norm_type)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(our_sd) == list(ref_sd)  # same names, same order
    assert {k: v.shape for k, v in our_sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    assert {k: v.dtype for k, v in our_sd.items()} == {k: v.dtype for k, v in ref_sd.items()}
    # strict both ways, values carried over exactly
    ours.load_state_dict(ref_sd, strict=True)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in ref_sd.items())
    torch.manual_seed(123)
    fresh = Unet3D(**cfg, norm_type=norm_type)
    ref.load_state_dict(fresh.state_dict(), strict=True)
    assert all(torch.equal(ref.state_dict()[k], v) for k, v in fresh.state_dict().items())


def test_state_dict_layout_details(ref_vdp):
    ours = Unet3D(**CONFIGS["cond"])
    sd = ours.state_dict()
    # the rotary frequencies of the ONE shared module appear under every temporal attention
    freq_keys = [k for k in sd if k.endswith("rotary_emb.freqs")]
    assert "init_temporal_attn.fn.fn.fn.rotary_emb.freqs" in freq_keys
    assert "downs.0.3.fn.fn.fn.rotary_emb.freqs" in freq_keys and "mid_temporal_attn.fn.fn.fn.rotary_emb.freqs" in freq_keys
    assert len(freq_keys) == 1 + 2 * 3 + 1
    rotary = {id(m.fn.fn.fn.rotary_emb) for m in [ours.init_temporal_attn, ours.mid_temporal_attn, *(d[3] for d in ours.downs)]}
    assert len(rotary) == 1
    freqs = ours.init_temporal_attn.fn.fn.fn.rotary_emb.freqs
    assert isinstance(freqs, torch.nn.Parameter) and not freqs.requires_grad
    d = min(32, CONFIGS["cond"]["attn_dim_head"])
    torch.testing.assert_close(freqs, 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d), rtol=0, atol=0)
    # conv weights keep their 5-D Conv3d shapes
    assert sd["init_conv.weight"].shape == (16, 3, 1, 7, 7)
    assert sd["downs.0.4.weight"].shape == (16, 16, 1, 4, 4)
    assert sd["ups.0.4.weight"].shape == (32, 32, 1, 4, 4)
    assert sd["final_conv.1.weight"].shape == (3, 16, 1, 1, 1)
    assert sd["null_cond_emb"].shape == (1, 12)


def test_bert_text_cond_width(ref_vdp):
    assert BERT_MODEL_DIM == 768
    cfg = dict(TINY, use_bert_text_cond=True)
    ref, ours = make_pair(ref_vdp.Unet3D, cfg)
    assert ours.has_cond and ours.null_cond_emb.shape == (1, 768)
    x, t, _ = inputs(cfg, 2, 4, 16)
    cond = torch.randn(2, 768)
    with torch.no_grad():
        assert max_diff(ours(x, t, cond), ref(x, t, cond)) <= ATOL


def test_rms_variant_keys_differ_from_group(ref_vdp070):
    sd = Unet3D(**TINY, norm_type="rms").state_dict()
    assert sd["downs.0.0.block1.norm.gamma"].shape == (16, 1, 1, 1)
    assert not any(k.endswith("block1.norm.weight") for k in sd)
    with pytest.raises(ValueError, match="norm_type"):
        Unet3D(**TINY, norm_type="layer")


# ------------------------------------------------------------------------------------------------
# outputs


@pytest.mark.parametrize("norm_type", ["group", "rms"])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}f{}s{}".format(*s))
def test_outputs_match_reference(ref_vdp, ref_vdp070, norm_type, name, shape):
    cfg = CONFIGS[name]
    ref, ours = make_pair(reference_class(ref_vdp, ref_vdp070, norm_type), cfg, norm_type)
    x, t, cond = inputs(cfg, *shape)
    with torch.no_grad():
        (expected, atol), got = roundoff_tolerance(ref, x, t, cond), ours(x, t, cond)
    assert got.shape == (shape[0], cfg.get("out_dim") or cfg.get("channels", 3), shape[1], shape[2], shape[2])
    assert got.is_contiguous()
    assert max_diff(got.double(), expected) <= atol
    assert expected.abs().max() > 0.1  # not a vacuous comparison


@pytest.mark.parametrize("norm_type", ["group", "rms"])
@pytest.mark.parametrize("mask", [[True, True, True], [False, False, False], [True, False, True]], ids=["all", "none", "mixed"])
def test_focus_present_mask(ref_vdp, ref_vdp070, norm_type, mask):
    cfg = CONFIGS["cond"]
    ref, ours = make_pair(reference_class(ref_vdp, ref_vdp070, norm_type), cfg, norm_type)
    x, t, cond = inputs(cfg, 3, 5, 16)
    mask = torch.tensor(mask)
    with torch.no_grad():
        expected, got = ref(x, t, cond, focus_present_mask=mask), ours(x, t, cond, focus_present_mask=mask)
        plain = ours(x, t, cond)
    assert max_diff(got, expected) <= ATOL
    if mask.any():  # focusing really changes the result (of the focused samples only)
        assert max_diff(got[mask], plain[mask]) > 1e-3
    if not mask.all():
        assert max_diff(got[~mask], plain[~mask]) <= ATOL


def test_prob_focus_present(ref_vdp):
    cfg = CONFIGS["uncond"]
    ref, ours = make_pair(ref_vdp.Unet3D, cfg)
    x, t, _ = inputs(cfg, 4, 4, 16)
    with torch.no_grad():
        # probability 1 is the all-True mask, 0 is no mask
        assert max_diff(ours(x, t, prob_focus_present=1.0), ref(x, t, focus_present_mask=torch.ones(4, dtype=torch.bool))) <= ATOL
        assert max_diff(ours(x, t, prob_focus_present=0.0), ref(x, t)) <= ATOL
        # in between: the same RNG draw as upstream, so the same random mask
        torch.manual_seed(7)
        expected = ref(x, t, prob_focus_present=0.5)
        torch.manual_seed(7)
        got = ours(x, t, prob_focus_present=0.5)
    assert max_diff(got, expected) <= ATOL


@pytest.mark.parametrize("norm_type", ["group", "rms"])
def test_conditioning_and_guidance(ref_vdp, ref_vdp070, norm_type):
    cfg = CONFIGS["cond"]
    ref, ours = make_pair(reference_class(ref_vdp, ref_vdp070, norm_type), cfg, norm_type)
    x, t, cond = inputs(cfg, 3, 4, 16)
    with torch.no_grad():
        for scale in (1.0, 3.0):
            expected = ref.forward_with_cond_scale(x, t, cond=cond, cond_scale=scale)
            got = ours.forward_with_cond_scale(x, t, cond=cond, cond_scale=scale)
            # null + (c - null) * s = s * c - (s - 1) * null amplifies each forward's round-off
            assert max_diff(got, expected) <= ATOL * (2 * scale - 1)
        # cond_scale 1 is the plain conditional output; 3 is really guided
        assert max_diff(ours.forward_with_cond_scale(x, t, cond=cond, cond_scale=1.0), ours(x, t, cond)) == 0
        null = ours(x, t, cond, null_cond_prob=1.0)
        guided = ours.forward_with_cond_scale(x, t, cond=cond, cond_scale=3.0)
        torch.testing.assert_close(guided, null + (ours(x, t, cond) - null) * 3.0, rtol=0, atol=1e-6)
        # null_cond_prob 1: the learned null embedding replaces every cond
        assert max_diff(null, ref(x, t, cond, null_cond_prob=1.0)) <= ATOL
        assert max_diff(null, ours(x, t, ours.null_cond_emb.expand(3, -1))) <= ATOL
        assert max_diff(null, ours(x, t, cond)) > 1e-3
        # null_cond_prob in (0, 1): same RNG draw as upstream
        torch.manual_seed(3)
        expected = ref(x, t, cond, null_cond_prob=0.5)
        torch.manual_seed(3)
        got = ours(x, t, cond, null_cond_prob=0.5)
        assert max_diff(got, expected) <= ATOL


def test_init_dim_other_than_dim_is_rejected(ref_vdp):
    cfg = dict(TINY, init_dim=24)
    x, t, _ = inputs(cfg, 1, 4, 16)
    with pytest.raises(RuntimeError):  # upstream builds it, then cannot run it
        ref_vdp.Unet3D(**cfg)(x, t)
    with pytest.raises(ValueError, match="init_dim"):
        Unet3D(**cfg)


def test_cond_is_required_when_configured():
    model = Unet3D(**CONFIGS["cond"])
    x, t, _ = inputs(CONFIGS["cond"], 1, 4, 16)
    with pytest.raises(AssertionError, match="cond must be passed"):
        model(x, t)


def test_unconditional_guidance_returns_logits():
    model = Unet3D(**CONFIGS["uncond"]).eval()
    x, t, _ = inputs(CONFIGS["uncond"], 1, 4, 16)
    with torch.no_grad():
        assert torch.equal(model.forward_with_cond_scale(x, t, cond_scale=5.0), model(x, t))


def test_gradients_match_reference(ref_vdp):
    """The training path: same loss gradients w.r.t. every parameter."""
    cfg = CONFIGS["cond"]
    ref, ours = make_pair(ref_vdp.Unet3D, cfg)
    ref.train(), ours.train()
    x, t, cond = inputs(cfg, 2, 4, 16)
    ref(x, t, cond).square().mean().backward()
    ours(x, t, cond).square().mean().backward()
    ref_grads = {k: p.grad for k, p in ref.named_parameters()}
    for k, p in ours.named_parameters():
        if ref_grads[k] is None:
            assert p.grad is None, k
        else:
            torch.testing.assert_close(p.grad, ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)


# ------------------------------------------------------------------------------------------------
# position tables and export


def test_position_tables_explicit_equals_computed():
    cfg = CONFIGS["wide_heads"]
    torch.manual_seed(0)
    model = Unet3D(**cfg).eval()
    x, t, _ = inputs(cfg, 2, 6, 16)
    tables = model.position_tables(6)
    assert tables["pos_bias"].shape == (2, 6, 6)
    assert tables["rotary_cos"].shape == tables["rotary_sin"].shape == (48, 6)
    # features past the rotary width (32) pass through; frame 0 is not rotated
    assert torch.all(tables["rotary_cos"][32:] == 1) and torch.all(tables["rotary_sin"][32:] == 0)
    assert torch.all(tables["rotary_cos"][:, 0] == 1) and torch.all(tables["rotary_sin"][:, 0] == 0)
    with torch.no_grad():
        assert torch.equal(model(x, t, tables=tables), model(x, t))
        other = {k: v * 0.5 for k, v in tables.items()}
        assert max_diff(model(x, t, tables=other), model(x, t)) > 1e-4  # the tables are really used
    with pytest.raises(AssertionError, match="frame count"):
        model(x, t, tables=model.position_tables(5))


def test_bfloat16_forward_is_finite():
    """Masking and tables follow the model dtype (finfo of the current dtype, no float32 leaks)."""
    cfg = CONFIGS["cond"]
    torch.manual_seed(0)
    model = Unet3D(**cfg).eval().to(torch.bfloat16)
    x, t, cond = inputs(cfg, 2, 4, 16)
    with torch.no_grad():
        out = model(x.bfloat16(), t, cond.bfloat16(), focus_present_mask=torch.tensor([True, False]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


class _Denoiser(torch.nn.Module):
    """What the export stage traces: ``forward(x, t, cond)`` with the position tables as buffers."""

    def __init__(self, model: Unet3D, frames: int):
        super().__init__()
        self.model = model
        for k, v in model.position_tables(frames).items():
            self.register_buffer(k, v.detach().clone())

    def forward(self, x, t, cond):
        tables = {"pos_bias": self.pos_bias, "rotary_cos": self.rotary_cos, "rotary_sin": self.rotary_sin}
        return self.model(x, t, cond, tables=tables)


@pytest.mark.parametrize("norm_type", ["group", "rms"])
def test_onnx_export_matches_torch(tmp_path, norm_type):
    """Freshly initialized weights on purpose: the exporter deduplicates the identical norm constants into
    Identity nodes, the graph shape that once tripped onnxruntime's DivMulFusion."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    cfg = CONFIGS["cond"]
    torch.manual_seed(0)
    model = Unet3D(**cfg, norm_type=norm_type).eval()
    x, t, cond = inputs(cfg, 2, 4, 16)
    wrapper = _Denoiser(model, frames=4).eval()
    path = tmp_path / "denoiser.onnx"
    with torch.no_grad():
        torch.onnx.export(
            wrapper, (x, t, cond), str(path), opset_version=17, dynamo=False,
            input_names=["x", "t", "cond"], output_names=["eps"],
        )
        expected = model(x, t, cond)
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    # export-friendly: no einsum, no 3-D convolutions, no masking plumbing on the inference path
    assert not ops & {"Einsum", "Where", "RandomUniformLike", "RandomUniform", "ScatterND", "Range"}, ops
    for node in graph.node:
        if node.op_type in ("Conv", "ConvTranspose"):
            kernel = next(a for a in node.attribute if a.name == "kernel_shape")
            assert len(kernel.ints) == 2, node.name
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"x": x.numpy(), "t": t.numpy(), "cond": cond.numpy()})
    assert got.shape == tuple(expected.shape)
    assert abs(got - expected.numpy()).max() <= 1e-4
