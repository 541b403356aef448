"""The building blocks of :class:`vdeploy.model.Unet3D`: position encodings, norms, blocks and attentions.

Same parameter names and shapes as video-diffusion-pytorch's modules of the same names; the forward passes
are written for export (ONNX opset 17, onnxruntime, TensorRT) rather than copied:

* Every convolution of this network is purely spatial ((1,k,k) kernels), so the whole network runs in
  the *folded* layout ``(b*f, c, h, w)`` with ``conv2d`` / ``conv_transpose2d`` over ``weight.squeeze(2)``
  (same ``nn.Conv3d`` parameters). GroupNorm statistics span frames, so they are reduced over a
  ``(b, f, g, c/g*h*w)`` view (no transpose); LayerNorm/RMSNorm are per position and need no unfolding.
* Temporal attention: tokens ``(b, f, h*w, c)`` (one transpose of ``x`` in, one out), projections as single
  large GEMMs, heads split by one transpose per tensor, MatMul -> Softmax -> MatMul with pre-scaled queries,
  no einsum. The rotary embedding is folded into per-frame query/key weights
  (``W_i = diag(cos_i) W + diag(sin_i) W[pair_swap]``), so it costs no activation-sized op; the relative
  position bias is a ``(heads, f, f)`` table. Both come from :meth:`Unet3D.position_tables` and can be
  passed in precomputed (``forward(..., tables=...)``): an export for a fixed frame count holds them, and
  the rotated weights, as constants.
* Spatial linear attention is re-associated so that neither ``v`` nor the attention output (hidden-sized)
  is materialized: ``context = (k xᵀ) W_vᵀ``, then one per-sample ``(c, hidden)`` matrix times ``q``.

Re-association changes float32 round-off only, no more than upstream's own distance from a float64
evaluation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def exists(x) -> bool:
    return x is not None


def default(val, d):
    if exists(val):
        return val
    return d() if callable(d) else d


def is_odd(n: int) -> bool:
    return (n % 2) == 1


def prob_mask_like(shape, prob: float, device) -> Tensor:
    """Bool mask, each entry True with probability ``prob`` (same RNG use as upstream)."""
    if prob == 1:
        return torch.ones(shape, device=device, dtype=torch.bool)
    if prob == 0:
        return torch.zeros(shape, device=device, dtype=torch.bool)
    return torch.zeros(shape, device=device).float().uniform_(0, 1) < prob


# ---------------------------------------------------------------------------------------------------
# position encodings


class RelativePositionBias(nn.Module):
    """T5 relative position bias (Raffel et al. 2020): log-spaced distance buckets -> one bias per head."""

    def __init__(self, heads: int = 8, num_buckets: int = 32, max_distance: int = 128):
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    @staticmethod
    def _relative_position_bucket(relative_position: Tensor, num_buckets: int = 32, max_distance: int = 128) -> Tensor:
        # identical float32 arithmetic to upstream, so bucket boundaries match exactly
        ret = 0
        n = -relative_position
        num_buckets //= 2
        ret += (n < 0).long() * num_buckets
        n = torch.abs(n)
        max_exact = num_buckets // 2
        is_small = n < max_exact
        # clamp only avoids log(0) for entries that `is_small` discards anyway
        val_if_large = max_exact + (
            torch.log(n.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).long()
        val_if_large = torch.min(val_if_large, torch.full_like(val_if_large, num_buckets - 1))
        ret += torch.where(is_small, n, val_if_large)
        return ret

    def forward(self, n: int, device=None) -> Tensor:
        """The ``(heads, n, n)`` bias added to attention logits between frames i (query) and j (key)."""
        device = default(device, self.relative_attention_bias.weight.device)
        pos = torch.arange(int(n), dtype=torch.long, device=device)
        rel_pos = pos[None, :] - pos[:, None]  # j - i
        bucket = self._relative_position_bucket(rel_pos, num_buckets=self.num_buckets, max_distance=self.max_distance)
        return self.relative_attention_bias(bucket).permute(2, 0, 1)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer, Su et al. 2021) as rotary-embedding-torch defines it.

    Feature pairs ``(2p, 2p+1)`` of the first ``2 * len(freqs)`` features rotate by ``pos * freqs[p]``;
    ``freqs`` is a frozen parameter so that it sits in the state dict like upstream's.
    """

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        self.freqs = nn.Parameter(freqs, requires_grad=False)
        self.rot_dim = 2 * freqs.shape[0]  # an odd dim leaves its last feature unrotated

    def tables(self, n: int, dim_head: int, device=None) -> tuple[Tensor, Tensor]:
        """cos and signed sin tables, each ``(dim_head, n)``: position ``i`` rotates a query/key ``q`` to
        ``q * cos[:, i] + q[pair_swap] * sin[:, i]`` (:func:`pair_swap_index`).

        Features beyond the rotary width pass through (cos 1, sin 0).
        """
        freqs = self.freqs.detach()
        device = default(device, freqs.device)
        freqs = freqs.to(device=device, dtype=torch.float32)
        rot = self.rot_dim
        assert rot <= dim_head, f"rotary width {rot} exceeds the head dimension {dim_head}"
        pos = torch.arange(int(n), device=device, dtype=torch.float32)
        angles = (pos[:, None] * freqs[None, :]).repeat_interleave(2, dim=-1)  # (n, rot): '... (d r)', r=2
        # rotate_half(x) = (-x[2p+1], x[2p]) = x[pair_swap] * (-1, +1): fold the sign into sin
        sign = torch.tensor([-1.0, 1.0], device=device).repeat(rot // 2)
        cos, sin = angles.cos(), angles.sin() * sign
        if rot < dim_head:
            cos = torch.cat((cos, cos.new_ones(int(n), dim_head - rot)), dim=-1)
            sin = torch.cat((sin, sin.new_zeros(int(n), dim_head - rot)), dim=-1)
        return cos.t().contiguous(), sin.t().contiguous()


def pair_swap_index(dim_head: int, rot_dim: int) -> Tensor:
    """Feature index that swaps 2p <-> 2p+1 within the rotary width (rotate_half without its sign)."""
    idx = torch.arange(dim_head)
    idx[:rot_dim] = idx[:rot_dim].reshape(-1, 2).flip(-1).reshape(-1)
    return idx


# ---------------------------------------------------------------------------------------------------
# small modules


class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        return self.fn(x, **kwargs) + x


class SinusoidalPosEmb(nn.Module):
    """Transformer sinusoidal embedding of the diffusion step (``sin`` half, then ``cos`` half)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        half_dim = self.dim // 2
        emb = math.log(10000) / (half_dim - 1)
        emb = torch.exp(torch.arange(half_dim, device=x.device) * -emb)
        emb = x[:, None] * emb[None, :]
        return torch.cat((emb.sin(), emb.cos()), dim=-1)


class LayerNorm(nn.Module):
    """Channel LayerNorm (no bias) over dim 1; ``gamma`` keeps upstream's ``(1, dim, 1, 1, 1)`` shape."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(1, dim, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        # x: (b*f, c, h, w) folded or (b, c, f, h, w); statistics per position over channels
        mean = x.mean(dim=1, keepdim=True)
        d = x - mean
        var = (d * d).mean(dim=1, keepdim=True)
        gamma = self.gamma.reshape(1, -1, *([1] * (x.ndim - 2)))
        # the divide stays on the small (…, 1, …) statistics tensor: full-size ops are multiplies, which
        # an fp16 export can run in fp16 while it keeps Div/Sqrt in fp32
        return d * (1.0 / torch.sqrt(var + self.eps)) * gamma


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.fn = fn
        self.norm = LayerNorm(dim)

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        return self.fn(self.norm(x), **kwargs)


class RMSNorm(nn.Module):
    """0.7.0's norm in ``Block``: ``F.normalize(x, dim=1) * sqrt(dim) * gamma``."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1, 1))


def _group_norm_film(x: Tensor, frames: int, norm: nn.GroupNorm, scale: Tensor | None, shift: Tensor | None) -> Tensor:
    """GroupNorm of the unfolded ``(b, c, f, h, w)`` tensor, then FiLM ``* (scale + 1) + shift``.

    ``scale`` and ``shift`` are ``(b, c)`` (one FiLM per sample, upstream's) or ``(b, f, c)`` (one per frame:
    ``Unet3D``'s ``frame_film``).

    Statistics per (sample, group) over ``(c/g, f, h, w)``, reduced on a ``(b, f, g, c/g, h*w)`` view of the
    folded ``(b*f, c, h, w)`` input; the affine and FiLM terms fold into one per-channel multiply-add.
    """
    bf, c, h, w = x.shape
    g = norm.num_groups
    xg = x.reshape(-1, frames, g, (c // g) * h * w)
    # two-stage means (contiguous block per frame, then across frames): as accurate as nn.GroupNorm's
    mean = xg.mean(dim=-1, keepdim=True).mean(dim=1, keepdim=True)
    d = xg - mean
    var = (d * d).mean(dim=-1, keepdim=True).mean(dim=1, keepdim=True)
    d = d.reshape(-1, frames, g, c // g, h * w)
    var = var.reshape(-1, 1, g, 1, 1)
    a = norm.weight.reshape(1, 1, g, c // g, 1)
    b = norm.bias.reshape(1, 1, g, c // g, 1)
    if exists(scale):
        n = frames if scale.ndim == 3 else 1  # per-frame FiLM (b, f, c) or one per sample (b, c)
        s1 = (scale + 1).reshape(-1, n, g, c // g, 1)
        a, b = a * s1, b * s1 + shift.reshape(-1, n, g, c // g, 1)
    # a / sqrt rather than rsqrt * a: ORT's DivMulFusion mis-wires 1/x -> Mul(const) (seen with ORT 1.32)
    y = d * (a / torch.sqrt(var + norm.eps)) + b
    return y.reshape(bf, c, h, w)


def _rms_norm_film(x: Tensor, frames: int, norm: RMSNorm, scale: Tensor | None, shift: Tensor | None) -> Tensor:
    """RMSNorm over channels (``F.normalize`` semantics, eps 1e-12), then FiLM, on the folded layout."""
    bf, c, h, w = x.shape
    xv = x.reshape(-1, frames, c, h * w)
    a = norm.gamma.reshape(1, 1, c, 1) * norm.scale
    y = xv * (1.0 / torch.linalg.vector_norm(xv, dim=2, keepdim=True).clamp_min(1e-12))
    if exists(scale):
        n = frames if scale.ndim == 3 else 1  # per-frame FiLM (b, f, c) or one per sample (b, c)
        y = y * (a * (scale + 1).reshape(-1, n, c, 1)) + shift.reshape(-1, n, c, 1)
    else:
        y = y * a
    return y.reshape(bf, c, h, w)


def _conv(conv: nn.Conv3d, x: Tensor) -> Tensor:
    """A (1, k, k) ``Conv3d`` (every conv of this network) applied as ``conv2d`` over ``(b*f, c, h, w)``."""
    return F.conv2d(x, conv.weight.squeeze(2), conv.bias, stride=conv.stride[1:], padding=conv.padding[1:])


def _conv_transpose(conv: nn.ConvTranspose3d, x: Tensor) -> Tensor:
    return F.conv_transpose2d(x, conv.weight.squeeze(2), conv.bias, stride=conv.stride[1:], padding=conv.padding[1:])


def Upsample(dim: int) -> nn.ConvTranspose3d:
    return nn.ConvTranspose3d(dim, dim, (1, 4, 4), (1, 2, 2), (0, 1, 1))


def Downsample(dim: int) -> nn.Conv3d:
    return nn.Conv3d(dim, dim, (1, 4, 4), (1, 2, 2), (0, 1, 1))


# ---------------------------------------------------------------------------------------------------
# building blocks


class Block(nn.Module):
    """(1,3,3) conv -> GroupNorm (or RMSNorm) -> optional FiLM -> SiLU."""

    def __init__(self, dim: int, dim_out: int, groups: int = 8, norm_type: str = "group"):
        super().__init__()
        self.proj = nn.Conv3d(dim, dim_out, (1, 3, 3), padding=(0, 1, 1))
        self.norm = nn.GroupNorm(groups, dim_out) if norm_type == "group" else RMSNorm(dim_out)
        self.act = nn.SiLU()

    def forward(self, x: Tensor, frames: int, scale: Tensor | None = None, shift: Tensor | None = None) -> Tensor:
        x = _conv(self.proj, x)
        if isinstance(self.norm, nn.GroupNorm):
            x = _group_norm_film(x, frames, self.norm, scale, shift)
        else:
            x = _rms_norm_film(x, frames, self.norm, scale, shift)
        return self.act(x)


class ResnetBlock(nn.Module):
    """Two Blocks with a residual; the (time [+ cond]) embedding modulates the first by FiLM: ``time_emb`` is
    ``(b, time_emb_dim)`` (the same FiLM for every frame, upstream's) or ``(b, f, time_emb_dim)`` (one per frame)."""

    def __init__(self, dim: int, dim_out: int, *, time_emb_dim: int | None = None, groups: int = 8,
                 norm_type: str = "group"):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, dim_out * 2)) if exists(time_emb_dim) else None
        self.block1 = Block(dim, dim_out, groups=groups, norm_type=norm_type)
        self.block2 = Block(dim_out, dim_out, groups=groups, norm_type=norm_type)
        self.res_conv = nn.Conv3d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: Tensor, frames: int, time_emb: Tensor | None = None) -> Tensor:
        scale = shift = None
        if exists(self.mlp):
            assert exists(time_emb), "time emb must be passed in"
            scale, shift = self.mlp(time_emb).chunk(2, dim=time_emb.ndim - 1)
        h = self.block1(x, frames, scale, shift)
        h = self.block2(h, frames)
        res = _conv(self.res_conv, x) if isinstance(self.res_conv, nn.Conv3d) else x
        return h + res


class SpatialLinearAttention(nn.Module):
    """Linear attention over each frame's h*w positions (Shen et al. 2021, "Efficient Attention")."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        self.dim_head = dim_head
        hidden_dim = dim_head * heads
        self.to_qkv = nn.Conv2d(dim, hidden_dim * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x: Tensor, **_) -> Tensor:
        bf, c, h, w = x.shape  # folded: this attention is per frame
        n, heads, d = h * w, self.heads, self.dim_head
        w_q, w_k, w_v = (wt[:, :, 0, 0] for wt in self.to_qkv.weight.chunk(3))
        x = x.reshape(bf, c, n)
        # q position-major (bf, n, heads, d) so that its softmax over the head features is a last-axis one
        q = torch.matmul(x.transpose(1, 2), w_q.t()).reshape(bf, n, heads, d).softmax(dim=-1)
        k = torch.matmul(w_k, x).reshape(bf, heads, d, n).softmax(dim=-1)
        # upstream: context = k vᵀ with v = W_v x, out = contextᵀ (q * scale), y = W_o out + b.
        # Re-associated so that neither v nor out (hidden x n each) is materialized:
        #   context = (k xᵀ) W_vᵀ                     (heads, d, e): a reduction over the n positions
        #   y = [W_o,h contextₕᵀ]ₕ q * scale + b      one (c x hidden) matrix per sample times q
        kx = torch.matmul(k, x.transpose(1, 2)[:, None])  # (bf, heads, d, c)
        context = torch.matmul(kx, w_v.reshape(heads, d, c).transpose(1, 2))  # (bf, heads, d, e)
        w_o = self.to_out.weight[:, :, 0, 0].reshape(c, heads, d).transpose(0, 1)  # (heads, c, e)
        mix = torch.matmul(w_o * self.scale, context.transpose(-1, -2))  # (bf, heads, c, d)
        mix = mix.transpose(1, 2).reshape(bf, c, heads * d)
        y = torch.matmul(mix, q.reshape(bf, n, heads * d).transpose(1, 2)) + self.to_out.bias[:, None]
        return y.reshape(bf, c, h, w)


class Attention(nn.Module):
    """Multi-head softmax attention along axis 1 of ``(b, T, n, dim)`` tokens, for each of the n positions.

    Same parameters as upstream's ``Attention`` (``to_qkv``/``to_out`` ``nn.Linear``). The projections are
    single large GEMMs over all ``b*T*n`` tokens; heads are split by one reshape-and-transpose per tensor.
    The rotary embedding is applied through the query/key *weights*: position ``i`` uses
    ``W_i = diag(cos_i) W + diag(sin_i) W[pair_swap]``, so ``W_i x == rotate(W x, i)`` and the rotation costs
    no activation-sized op (for a fixed frame count the exported ``W_i`` are constants).
    """

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32, rotary_emb: RotaryEmbedding | None = None):
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        self.dim_head = dim_head
        hidden_dim = dim_head * heads
        self.rotary_emb = rotary_emb
        self.to_qkv = nn.Linear(dim, hidden_dim * 3, bias=False)
        self.to_out = nn.Linear(hidden_dim, dim, bias=False)
        if exists(rotary_emb):
            self.register_buffer("pair_swap", pair_swap_index(dim_head, rotary_emb.rot_dim), persistent=False)

    def _rotated_weight(self, w: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``(hidden, dim)`` projection -> ``(T, dim, hidden)``: one rotated copy per position, transposed."""
        wh = w.reshape(self.heads, self.dim_head, -1)
        w_t = wh * cos.t()[:, None, :, None] + wh[:, self.pair_swap] * sin.t()[:, None, :, None]
        return w_t.reshape(cos.shape[1], -1, w.shape[1]).transpose(1, 2)

    def _split_heads(self, y: Tensor) -> Tensor:
        b, t, n, _ = y.shape  # (b, T, n, heads*d) -> (b, n, heads, T, d)
        return y.reshape(b, t, n, self.heads, self.dim_head).permute(0, 2, 3, 1, 4)

    def forward(
        self,
        x: Tensor,
        pos_bias: Tensor | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
        blocked: Tensor | None = None,
        values_only: bool = False,
    ) -> Tensor:
        """Args:
            x: ``(b, T, n, dim)`` normalized tokens; attention runs along T.
            pos_bias: ``(heads, T, T)`` logit bias, or None.
            rotary: ``(cos, sin)`` tables ``(dim_head, T)`` from :meth:`RotaryEmbedding.tables`, or None.
            blocked: bool mask broadcastable to the logits ``(b, n, heads, T, T)``; True = not attended.
            values_only: upstream's all-present focus: return ``to_out(v)`` per token.

        Returns:
            ``(b, T, n, dim)``.
        """
        w_q, w_k, w_v = self.to_qkv.weight.chunk(3)
        w_o = self.to_out.weight
        if values_only:
            return torch.matmul(torch.matmul(x, w_v.t()), w_o.t())
        w_q = w_q * self.scale  # pre-scaled queries: (s W_q) x = s (W_q x)
        if exists(rotary):
            cos, sin = rotary
            w_q, w_k = self._rotated_weight(w_q, cos, sin), self._rotated_weight(w_k, cos, sin)
        else:
            w_q, w_k = w_q.t(), w_k.t()
        # separate projections rather than one and a split: no copy of the (3 * hidden) tensor
        q = self._split_heads(torch.matmul(x, w_q))  # (b, n, heads, T, d)
        k = self._split_heads(torch.matmul(x, w_k))
        v = self._split_heads(torch.matmul(x, w_v.t()))
        sim = torch.matmul(q, k.transpose(-1, -2))  # (b, n, heads, i, j)
        if exists(pos_bias):
            sim = sim + pos_bias
        if exists(blocked):
            sim = sim.masked_fill(blocked, torch.finfo(sim.dtype).min)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()  # as upstream: stable in fp16
        attn = sim.softmax(dim=-1)
        out = torch.matmul(attn, v)  # (b, n, heads, T, d)
        b, n, _, t, _ = out.shape
        out = out.permute(0, 3, 1, 2, 4).reshape(b, t, n, -1)
        return torch.matmul(out, w_o.t())


class TemporalAttention(nn.Module):
    """Attention across frames at every spatial position: upstream's ``EinopsToAndFrom('b c f h w',
    'b (h w) f c', Attention)``, taking and returning the folded ``(b*f, c, h, w)`` layout."""

    def __init__(self, fn: Attention):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor, *, frames: int, pos_bias=None, rotary=None, blocked=None, values_only=False,
                **_) -> Tensor:
        bf, c, h, w = x.shape
        tokens = x.reshape(-1, frames, c, h * w).transpose(2, 3)  # (b, f, h*w, c)
        out = self.fn(tokens, pos_bias=pos_bias, rotary=rotary, blocked=blocked, values_only=values_only)
        return out.transpose(2, 3).reshape(bf, c, h, w)


class SpatialAttention(nn.Module):
    """Full attention over each frame's positions: upstream's ``EinopsToAndFrom('b c f h w',
    'b f (h w) c', Attention)``, on the folded layout."""

    def __init__(self, fn: Attention):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor, **_) -> Tensor:
        bf, c, h, w = x.shape
        tokens = x.reshape(bf, c, h * w).transpose(1, 2)[:, :, None]  # (b*f, h*w, 1, c)
        return self.fn(tokens)[:, :, 0].transpose(1, 2).reshape(bf, c, h, w)


# the logit bias of a key that is not attended: softmax gives it weight 0 next to any real logit (exp(-1e4)
# underflows float32), and float16 holds it (an fp16 export keeps the constant finite, unlike finfo.min)
MASKED_LOGIT = -1e4


class CrossAttention(nn.Module):
    """Attention from every position of every frame to a caption's token embeddings: Imagen's text
    cross-attention (Saharia et al. 2022; imagen-pytorch's ``CrossAttention``), on the folded layout.

    The queries are the (normalized) features of all ``f*h*w`` positions of a sample; the keys and values are
    that sample's tokens, LayerNormed and projected by this layer, after one learned null key/value per head
    (imagen-pytorch's ``null_kv``), so every query has a key to attend to even when no token is kept. Padding
    keys get the logit bias :data:`MASKED_LOGIT` (``key_bias``, built once per forward): their attention weight
    is 0, and the caller zeroes their embeddings, so what a padding position holds never reaches the output.
    MatMul -> Add -> Softmax -> MatMul with pre-scaled queries, no einsum (as :class:`Attention`), and no max
    subtracted before the softmax (softmax kernels do that themselves; an fp16 export keeps softmax in fp32).

    Args:
        dim: channels of the features.
        context_dim: width of the token embeddings.
        heads, dim_head: attention heads and their width.
    """

    def __init__(self, dim: int, context_dim: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        self.dim_head = dim_head
        hidden_dim = heads * dim_head
        self.to_q = nn.Linear(dim, hidden_dim, bias=False)
        self.norm_context = nn.LayerNorm(context_dim)
        self.to_kv = nn.Linear(context_dim, hidden_dim * 2, bias=False)
        self.null_kv = nn.Parameter(torch.randn(2, heads, 1, dim_head))
        self.to_out = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: Tensor, *, frames: int, context: Tensor, key_bias: Tensor, **_) -> Tensor:
        """Args:
            x: ``(b*f, c, h, w)`` normalized features (folded).
            frames: ``f``.
            context: ``(b, L, context_dim)`` token embeddings (padding positions zeroed by the caller).
            key_bias: ``(b, 1, 1, 1 + L)`` logit bias: 0 for the null key and every real token,
                :data:`MASKED_LOGIT` for padding.

        Returns:
            ``(b*f, c, h, w)``.
        """
        bf, c, h, w = x.shape
        heads, d = self.heads, self.dim_head
        tokens = x.reshape(-1, frames, c, h * w).transpose(2, 3).reshape(-1, frames * h * w, c)  # (b, N, c)
        q = torch.matmul(tokens, (self.to_q.weight * self.scale).t())
        q = q.reshape(q.shape[0], -1, heads, d).transpose(1, 2)  # (b, heads, N, d)
        kv = torch.matmul(self.norm_context(context), self.to_kv.weight.t())  # (b, L, 2 * hidden)
        kv = kv.reshape(kv.shape[0], -1, 2, heads, d).permute(2, 0, 3, 1, 4)  # (2, b, heads, L, d)
        null = self.null_kv.to(kv.dtype)[:, None].expand(-1, kv.shape[1], -1, -1, -1)  # (2, b, heads, 1, d)
        k, v = torch.cat((null, kv), dim=3).unbind(0)
        sim = torch.matmul(q, k.transpose(-1, -2)) + key_bias  # (b, heads, N, 1 + L)
        out = torch.matmul(sim.softmax(dim=-1), v)  # (b, heads, N, d)
        out = torch.matmul(out.transpose(1, 2).reshape(out.shape[0], -1, heads * d), self.to_out.weight.t())
        return out.reshape(-1, frames, h * w, c).transpose(2, 3).reshape(bf, c, h, w)
