"""Unet3D: the space-time factored U-Net of video-diffusion-pytorch (Ho et al. 2022, "Video Diffusion Models").

Same modules, parameter names and shapes as ``video_diffusion_pytorch.Unet3D`` 0.6.3 (GroupNorm) and,
with ``norm_type="rms"``, 0.7.0 (RMSNorm in ``Block``): state dicts load both ways with ``strict=True``
and outputs agree to float32 round-off. The blocks, and how their forward passes are written for export,
are in :mod:`vdeploy.layers`.

* Training-only features cost nothing when off: ``null_cond_prob == 0`` adds no mask (in eval mode), no focus
  mask adds no masking ops, and nothing calls ``.item()``.
* ``frame_conditioning=True`` (vdeploy's, off by default) is MCVD-style masked frame conditioning (Voleti et
  al. 2022, "MCVD: Masked Conditional Video Diffusion"): the stem conv also takes the known frames and a
  per-frame mask, ``cat((x, frames * m, m))`` with ``2 * channels + 1`` input channels, so one model
  generates (no frame known), predicts (the first frames known) and interpolates (the first and last).
  Off, the model is the upstream one: the same state dict and the same outputs.
* ``text_cross_attention=True`` (vdeploy's, off by default) adds Imagen's token-level text conditioning
  (Saharia et al. 2022): beside the pooled caption vector (FiLM through the time embedding, as upstream), every
  level's attention block gets a cross-attention from all positions of all frames to the caption's token
  embeddings ``(b, text_max_tokens, cond_dim)`` with a key-padding mask, and a learned null token sequence
  replaces the tokens where the pooled vector is replaced by the null embedding (``null_cond_prob``), so "null"
  means null for both. Its modules come after upstream's (extra state-dict keys only; upstream's initialize
  from the same random draws). Off: no extra module, key or op.
* ``frame_film=True`` (vdeploy's, off by default) makes every ResNet block's FiLM per frame: frame ``i``'s
  conditioning vector is the usual ``time ⊕ pooled caption`` (after the null replacement of guidance) plus a small
  MLP (Linear -> SiLU -> Linear) of that vector and frame ``i``'s sinusoidal index, so the caption and the frame's
  place in the clip meet through a nonlinearity before every block (upstream's FiLM is the same for every frame).
  An experiment: it was built to give an output of the form ``f(caption, frame)`` ("moving left") a direct path,
  and measured it did not change the direction's adherence; upstream's U-Net, fine-tuned at the highest noise
  level, learns that output without it (README, "Frame-conditioned sampling"). The MLP's last layer starts at zero
  (the model starts as without it) and is built last (the other modules draw the same initial weights). Off: no
  extra module, key or op.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from vdeploy.layers import (
    Attention,
    MASKED_LOGIT,
    CrossAttention,
    Downsample,
    PreNorm,
    RelativePositionBias,
    Residual,
    ResnetBlock,
    RotaryEmbedding,
    SinusoidalPosEmb,
    SpatialAttention,
    SpatialLinearAttention,
    TemporalAttention,
    Upsample,
    _conv,
    _conv_transpose,
    default,
    exists,
    is_odd,
    prob_mask_like,
)

__all__ = ["BERT_MODEL_DIM", "Unet3D", "RelativePositionBias", "RotaryEmbedding"]

# Width of the BERT-base text embedding used by ``use_bert_text_cond=True`` (as upstream's text.py).
BERT_MODEL_DIM = 768


# ---------------------------------------------------------------------------------------------------
# model


class Unet3D(nn.Module):
    """Space-time factored 3D U-Net denoiser (Ho et al. 2022), compatible with video-diffusion-pytorch.

    Args:
        dim: base channel width.
        cond_dim: width of the conditioning vector (e.g. a text embedding); None for unconditional.
        out_dim: output channels (default ``channels``).
        dim_mults: width multiplier per resolution level.
        channels: input channels.
        attn_heads: heads of every attention.
        attn_dim_head: head width of the temporal attentions (spatial ones use 32, as upstream).
        use_bert_text_cond: condition on BERT-base embeddings (``cond_dim = BERT_MODEL_DIM``).
        init_dim: width after the stem conv (default ``dim``; upstream's forward only works when it equals
            ``dim``, so any other value is rejected here).
        init_kernel_size: odd spatial kernel of the stem conv.
        use_sparse_linear_attn: add spatial linear attention at every level.
        block_type: accepted for compatibility; only 'resnet' exists (upstream ignores it too).
        resnet_groups: GroupNorm groups (``norm_type='group'``).
        norm_type: 'group' (0.6.3) or 'rms' (0.7.0: RMSNorm in ``Block``, no groups).
        frame_conditioning: masked frame conditioning (MCVD): the stem conv takes ``2 * channels + 1``
            channels, the noisy video, the known frames times the mask, and the mask (see :meth:`forward`'s
            ``frames`` and ``mask``). False builds upstream's model.
        text_cross_attention: token-level text conditioning (needs ``cond_dim``): a cross-attention to the
            caption's token embeddings at every level (after the spatial attention, before the temporal one),
            fed by :meth:`forward`'s ``text_tokens`` and ``text_mask``. False builds upstream's model.
        text_max_tokens: the token sequence length ``L`` of ``text_tokens`` (captions padded or cut to it).
        text_standardize: the caption map stored with the weights ('none', 'std', 'whiten'; applied outside).
        frame_position: each frame's absolute index added to the stem's features.
        frame_film: per-frame FiLM in every ResNet block (the module docstring). False builds upstream's model.
    """

    def __init__(
        self,
        dim: int,
        cond_dim: int | None = None,
        out_dim: int | None = None,
        dim_mults=(1, 2, 4, 8),
        channels: int = 3,
        attn_heads: int = 8,
        attn_dim_head: int = 32,
        use_bert_text_cond: bool = False,
        init_dim: int | None = None,
        init_kernel_size: int = 7,
        use_sparse_linear_attn: bool = True,
        block_type: str = "resnet",
        resnet_groups: int = 8,
        norm_type: str = "group",
        frame_conditioning: bool = False,
        text_cross_attention: bool = False,
        text_max_tokens: int = 16,
        text_standardize: str = "none",
        frame_position: bool = False,
        frame_film: bool = False,
    ):
        super().__init__()
        if norm_type not in ("group", "rms"):
            raise ValueError(f"norm_type must be 'group' or 'rms', got {norm_type!r}")
        self.channels = channels
        self.norm_type = norm_type
        self.attn_heads = attn_heads
        self.attn_dim_head = attn_dim_head
        self.frame_conditioning = bool(frame_conditioning)

        # temporal attention and its relative positional encoding; ONE rotary module shared by all of them
        rotary_emb = RotaryEmbedding(min(32, attn_dim_head))

        def temporal_attn(d: int) -> TemporalAttention:
            return TemporalAttention(Attention(d, heads=attn_heads, dim_head=attn_dim_head, rotary_emb=rotary_emb))

        self.time_rel_pos_bias = RelativePositionBias(heads=attn_heads, max_distance=32)

        # initial conv
        init_dim = default(init_dim, dim)
        if init_dim != dim:
            # upstream builds this but its forward fails: the final conv takes dim * 2 channels while the
            # skip from the stem and the last up block carry init_dim each
            raise ValueError(f"init_dim ({init_dim}) must equal dim ({dim}): the final conv takes dim * 2 channels")
        assert is_odd(init_kernel_size)
        init_padding = init_kernel_size // 2
        # frame conditioning: the noisy video, the known frames (zero where unknown) and the mask
        in_channels = channels * 2 + 1 if self.frame_conditioning else channels
        self.init_conv = nn.Conv3d(
            in_channels, init_dim, (1, init_kernel_size, init_kernel_size), padding=(0, init_padding, init_padding)
        )
        self.init_temporal_attn = Residual(PreNorm(init_dim, temporal_attn(init_dim)))

        # dimensions
        dims = [init_dim, *map(lambda m: dim * m, dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))

        # time conditioning
        time_dim = dim * 4
        self.time_mlp = nn.Sequential(
            SinusoidalPosEmb(dim), nn.Linear(dim, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim)
        )

        # text conditioning (classifier-free guidance: a learned null embedding replaces dropped conds)
        self.has_cond = exists(cond_dim) or use_bert_text_cond
        cond_dim = BERT_MODEL_DIM if use_bert_text_cond else cond_dim
        text_dim = cond_dim  # the text encoder's width: its pooled vector and its tokens
        self.null_cond_emb = nn.Parameter(torch.randn(1, cond_dim)) if self.has_cond else None
        # text_standardize: the caption map fitted on the training captions (vdeploy.text.fit_standardizer, set by
        # the trainer) is stored here, so it travels with the weights; the U-Net never applies it (cond arrives mapped)
        self.text_standardize = text_standardize
        if text_standardize != "none":
            if text_standardize not in ("std", "whiten") or not self.has_cond:
                raise ValueError(f"text_standardize {text_standardize!r} needs a conditional Unet3D (cond_dim) and "
                                 "'std' or 'whiten'")
            self.register_buffer("text_mean", torch.zeros(text_dim))
            self.register_buffer("text_proj", torch.eye(text_dim))
        # frame_position: each frame's index (sinusoidal) through a learned map, zero at first (no random draw: the
        # other weights initialize as without it), added to the stem's features, so a frame knows where it stands
        # in the clip and not only how far it is from the others (the temporal attentions' relative positions)
        self.frame_position = bool(frame_position)
        if self.frame_position:
            self.frame_pos_proj = nn.Parameter(torch.zeros(init_dim, init_dim))
        cond_dim = time_dim + int(cond_dim or 0)

        # layers
        self.downs = nn.ModuleList([])
        self.ups = nn.ModuleList([])
        num_resolutions = len(in_out)
        block_klass = partial(ResnetBlock, groups=resnet_groups, norm_type=norm_type)
        block_klass_cond = partial(block_klass, time_emb_dim=cond_dim)

        def linear_attn(d: int) -> nn.Module:
            if not use_sparse_linear_attn:
                return nn.Identity()
            return Residual(PreNorm(d, SpatialLinearAttention(d, heads=attn_heads)))

        for ind, (dim_in, dim_out) in enumerate(in_out):
            is_last = ind >= (num_resolutions - 1)
            self.downs.append(
                nn.ModuleList(
                    [
                        block_klass_cond(dim_in, dim_out),
                        block_klass_cond(dim_out, dim_out),
                        linear_attn(dim_out),
                        Residual(PreNorm(dim_out, temporal_attn(dim_out))),
                        Downsample(dim_out) if not is_last else nn.Identity(),
                    ]
                )
            )

        mid_dim = dims[-1]
        self.mid_block1 = block_klass_cond(mid_dim, mid_dim)
        self.mid_spatial_attn = Residual(PreNorm(mid_dim, SpatialAttention(Attention(mid_dim, heads=attn_heads))))
        self.mid_temporal_attn = Residual(PreNorm(mid_dim, temporal_attn(mid_dim)))
        self.mid_block2 = block_klass_cond(mid_dim, mid_dim)

        for ind, (dim_in, dim_out) in enumerate(reversed(in_out)):
            is_last = ind >= (num_resolutions - 1)
            self.ups.append(
                nn.ModuleList(
                    [
                        block_klass_cond(dim_out * 2, dim_in),
                        block_klass_cond(dim_in, dim_in),
                        linear_attn(dim_in),
                        Residual(PreNorm(dim_in, temporal_attn(dim_in))),
                        Upsample(dim_in) if not is_last else nn.Identity(),
                    ]
                )
            )

        out_dim = default(out_dim, channels)
        self.final_conv = nn.Sequential(block_klass(dim * 2, dim), nn.Conv3d(dim, out_dim, 1))

        # token-level text conditioning (vdeploy's): built last, so upstream's modules draw their initial
        # weights exactly as without it
        self.text_cross_attention = bool(text_cross_attention)
        self.text_max_tokens = int(text_max_tokens) if self.text_cross_attention else None
        if self.text_cross_attention:
            if not self.has_cond:
                raise ValueError("text_cross_attention needs a text-conditioned model (cond_dim or "
                                 "use_bert_text_cond): the tokens come from the encoder of the pooled vector")
            if self.text_max_tokens < 1:
                raise ValueError(f"text_max_tokens must be >= 1, got {text_max_tokens!r}")
            self.null_text_tokens = nn.Parameter(torch.randn(1, self.text_max_tokens, text_dim))

            def cross_attn(d: int) -> nn.Module:
                return Residual(PreNorm(d, CrossAttention(d, text_dim, heads=attn_heads, dim_head=attn_dim_head)))

            # one per down level, the middle, one per up level (forward's order)
            widths = [d for _, d in in_out] + [mid_dim] + [d for d, _ in reversed(in_out)]
            self.text_cross_attns = nn.ModuleList([cross_attn(d) for d in widths])

        # per-frame FiLM (vdeploy's): built after everything else, so every other module draws its initial weights
        # as without it; the last layer starts at zero, so the model's first outputs are the ones without it
        self.frame_film = bool(frame_film)
        self.frame_film_dim = dim if self.frame_film else None  # width of the frame index's sinusoidal embedding
        if self.frame_film:
            self.frame_film_mlp = nn.Sequential(nn.Linear(cond_dim + dim, time_dim), nn.SiLU(),
                                                nn.Linear(time_dim, cond_dim))
            nn.init.zeros_(self.frame_film_mlp[2].weight)
            nn.init.zeros_(self.frame_film_mlp[2].bias)

    # -- position tables -----------------------------------------------------------------------------

    def position_tables(self, num_frames: int, device=None) -> dict[str, Tensor]:
        """Frame-position tables of the temporal attentions for ``num_frames`` frames.

        Args:
            num_frames: number of frames ``f`` the tables are for.
            device: where to build them (default: the model's device).

        Returns:
            ``{"pos_bias": (heads, f, f), "rotary_cos": (attn_dim_head, f), "rotary_sin": (attn_dim_head, f)}``,
            float32 (the bias in the parameters' dtype). ``pos_bias[h, i, j]`` is added to the logit of query
            frame i and key frame j; frame i rotates a query/key ``q`` of one head as
            ``q * rotary_cos[:, i] + q[pair_swap] * rotary_sin[:, i]`` (pair_swap exchanges features 2p and
            2p+1; rotate_half's sign is folded into ``rotary_sin``). With ``frame_position`` also ``"frame_pos": (f,
            init_dim)`` (added to the stem's features), with ``frame_film`` ``"frame_index": (f, dim)`` (each frame's
            sinusoidal index, the per-frame FiLM MLP's input).
            Pass them to :meth:`forward` as ``tables=`` to skip recomputing; an export registers them as
            buffers so they become graph constants.
        """
        device = default(device, self.init_conv.weight.device)
        cos, sin = self._rotary().tables(num_frames, self.attn_dim_head, device)
        tables = {"pos_bias": self.time_rel_pos_bias(num_frames, device=device), "rotary_cos": cos, "rotary_sin": sin}
        if self.frame_position:  # (f, init_dim): what frame_position adds to each frame's stem features
            index = torch.arange(num_frames, device=device, dtype=torch.float32)
            tables["frame_pos"] = SinusoidalPosEmb(self.frame_pos_proj.shape[0])(index) @ self.frame_pos_proj.float()
        if self.frame_film:  # (f, dim): each frame's sinusoidal index, an input of frame_film's MLP
            index = torch.arange(num_frames, device=device, dtype=torch.float32)
            tables["frame_index"] = SinusoidalPosEmb(self.frame_film_dim)(index)
        return tables

    def _rotary(self) -> RotaryEmbedding:
        return self.init_temporal_attn.fn.fn.fn.rotary_emb

    # -- forward -------------------------------------------------------------------------------------

    def forward_with_cond_scale(self, *args, cond_scale: float = 2.0, **kwargs) -> Tensor:
        """Classifier-free guidance (Ho & Salimans 2022): ``null + (cond - null) * cond_scale``.

        Args:
            *args, **kwargs: as :meth:`forward` (without ``null_cond_prob``); ``frames`` and ``mask`` reach
                both calls, so the null prediction sees the same known frames; the null call replaces ``cond``
                (and ``text_tokens``) by the learned null embedding (and null token sequence).
            cond_scale: guidance scale; 1 (or an unconditional model) returns the conditional logits.
        """
        logits = self.forward(*args, null_cond_prob=0.0, **kwargs)
        if cond_scale == 1 or not self.has_cond:
            return logits
        null_logits = self.forward(*args, null_cond_prob=1.0, **kwargs)
        return null_logits + (logits - null_logits) * cond_scale

    def _frame_input(self, x: Tensor, frames: Tensor | None, mask: Tensor | None) -> Tensor:
        """The stem's input: ``x``, or ``cat((x, frames * m, m))`` with the mask ``m`` as ``(b, 1, f, h, w)``."""
        if not self.frame_conditioning:
            if exists(frames) or exists(mask):
                raise ValueError("this Unet3D was built without frame_conditioning: it takes no frames or mask "
                                 "(build it with frame_conditioning=True, and train it so)")
            return x
        if exists(frames) != exists(mask):
            given, missing = ("frames", "mask") if exists(frames) else ("mask", "frames")
            raise ValueError(f"{given} without {missing}: pass both (the mask says which frames are known) or "
                             "neither (generation)")
        b, c, f, h, w = x.shape
        if not exists(frames):  # generation: no frame known
            return torch.cat((x, torch.zeros_like(x), x.new_zeros(b, 1, f, h, w)), dim=1)
        if not torch.jit.is_tracing():  # a traced shape is a tensor; the export fixes the shapes anyway
            if tuple(frames.shape) != (b, c, f, h, w):
                raise ValueError(f"frames must have the shape of x, (b, channels, f, h, w) = {(b, c, f, h, w)}, "
                                 f"got {tuple(frames.shape)}")
            if tuple(mask.shape) != (b, f):
                raise ValueError(f"mask must have shape (b, f) = {(b, f)} (1 = known frame), got {tuple(mask.shape)}")
        m = mask.to(x.dtype).reshape(b, 1, f, 1, 1)
        return torch.cat((x, frames.to(x.dtype) * m, m.expand(b, 1, f, h, w)), dim=1)

    def drop_text(self, drop: Tensor, text_tokens: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
        """The rows ``drop`` (``(b,)`` bool) of the token conditioning replaced by the null: the learned null token
        sequence, every position kept. What :meth:`forward` does with ``null_cond_prob`` (and the trainer with its
        own draws) beside replacing ``cond`` by ``null_cond_emb``."""
        null = self.null_text_tokens.to(text_tokens.dtype)
        tokens = torch.where(drop[:, None, None], null, text_tokens)
        return tokens, torch.where(drop[:, None], torch.ones_like(text_mask), text_mask)

    def text_context(self, text_tokens: Tensor | None, text_mask: Tensor | None, *, drop=None,
                     batch: int | None = None) -> dict[str, Tensor]:
        """The cross-attentions' inputs: ``{"context": (b, L, cond_dim) tokens, padding zeroed, "key_bias": (b, 1, 1,
        1 + L) logit bias, 0 for the null key and every real token, ``MASKED_LOGIT`` for padding}``.

        Args:
            text_tokens, text_mask: as :meth:`forward`'s (None with ``drop=True``: every row null).
            drop: rows replaced by the null token sequence: None, True (all; ``batch`` rows) or a ``(b,)`` bool.
        """
        dtype = self.init_conv.weight.dtype
        if drop is True:
            b = batch if text_tokens is None else text_tokens.shape[0]
            context = self.null_text_tokens.to(dtype).expand(b, -1, -1)
            keep = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        else:
            if not exists(text_tokens) or not exists(text_mask):
                raise ValueError("this Unet3D has text_cross_attention: pass text_tokens and text_mask with cond "
                                 "(GaussianDiffusion embeds captions into both)")
            if not torch.jit.is_tracing():
                want = (text_tokens.shape[0], self.text_max_tokens, self.null_text_tokens.shape[-1])
                if text_tokens.ndim != 3 or tuple(text_tokens.shape[1:]) != want[1:]:
                    raise ValueError(f"text_tokens must have shape (b, text_max_tokens, cond_dim) = {want}, got "
                                     f"{tuple(text_tokens.shape)}")
                if tuple(text_mask.shape) != want[:2]:
                    raise ValueError(f"text_mask must have shape (b, text_max_tokens) = {want[:2]}, got "
                                     f"{tuple(text_mask.shape)}")
            keep = text_mask != 0
            # padding zeroed: whatever a padding position holds, it reaches nothing (its logit is masked too)
            context = torch.where(keep[..., None], text_tokens.to(dtype), torch.zeros((), dtype=dtype,
                                                                                      device=text_tokens.device))
            if exists(drop):
                context, keep = self.drop_text(drop, context, keep)
        keep = torch.cat((torch.ones_like(keep[:, :1]), keep), dim=1)[:, None, None, :]  # the null key first
        zero = torch.zeros((), dtype=dtype, device=keep.device)
        return {"context": context, "key_bias": torch.where(keep, zero, torch.full_like(zero, MASKED_LOGIT))}

    def forward(
        self,
        x: Tensor,
        time: Tensor,
        cond: Tensor | None = None,
        null_cond_prob: float = 0.0,
        focus_present_mask: Tensor | None = None,
        prob_focus_present: float = 0.0,
        tables: dict[str, Tensor] | None = None,
        frames: Tensor | None = None,
        mask: Tensor | None = None,
        text_tokens: Tensor | None = None,
        text_mask: Tensor | None = None,
    ) -> Tensor:
        """Predict the noise (or whatever the model was trained on) of a video batch.

        Args:
            x: ``(b, channels, f, h, w)`` noisy videos.
            time: ``(b,)`` diffusion steps (long).
            cond: ``(b, cond_dim)`` conditioning; required when the model has one.
            null_cond_prob: probability per sample of replacing ``cond`` by the null embedding (training).
            focus_present_mask: ``(b,)`` bool; True samples attend only to their own frame in time.
            prob_focus_present: probability per sample of focusing on the present when no mask is given.
            tables: precomputed :meth:`position_tables` for ``f`` frames (computed here when None).
            frames: ``(b, channels, f, h, w)`` known frames in model space [-1, 1] (a frame-conditioned model
                only); the values of unknown frames are ignored (multiplied by the mask).
            mask: ``(b, f)`` float or bool, 1 where a frame of ``frames`` is known; required with ``frames``.
                Both None on a frame-conditioned model: generation (no frame known).
            text_tokens: ``(b, text_max_tokens, cond_dim)`` the caption's token embeddings (a model with
                ``text_cross_attention`` only; required with ``cond`` there, except with ``null_cond_prob >= 1``).
            text_mask: ``(b, text_max_tokens)`` float or bool, 1 for a real token, 0 for padding (not attended).

        Returns:
            ``(b, out_dim, f, h, w)``.

        Raises:
            ValueError: ``frames``/``mask`` given to a model without frame conditioning, one without the other,
                or of the wrong shape; text tokens missing, given to a model without ``text_cross_attention``,
                or of the wrong shape.
        """
        assert not (self.has_cond and not exists(cond)), "cond must be passed in if cond_dim specified"
        b, c, f, h, w = x.shape
        device = x.device
        x = self._frame_input(x, frames, mask)
        c = x.shape[1]

        # focus on the present (upstream semantics): all True -> values pass through the temporal
        # attentions; some True -> those samples attend only to their own frame; none -> plain attention
        values_only, blocked = False, None
        if not exists(focus_present_mask) and prob_focus_present > 0:
            focus_present_mask = prob_mask_like((b,), prob_focus_present, device=device)
        if exists(focus_present_mask):
            if bool(focus_present_mask.all()):
                values_only = True
            elif bool(focus_present_mask.any()):
                off_diag = ~torch.eye(f, device=device, dtype=torch.bool)
                blocked = focus_present_mask.reshape(b, 1, 1, 1, 1) & off_diag  # (b, 1, 1, f, f)

        if not exists(tables):
            tables = self.position_tables(f, device=device)
        if not torch.jit.is_tracing():  # a traced shape is a tensor; the export fixes f anyway
            assert tables["pos_bias"].shape[-1] == f, "position tables were built for another frame count"
        dtype = self.init_conv.weight.dtype
        pos_bias = tables["pos_bias"].to(dtype)
        rotary = (tables["rotary_cos"].to(dtype), tables["rotary_sin"].to(dtype))
        attn_kw = dict(frames=f, pos_bias=pos_bias, rotary=rotary)

        # (b, c, f, h, w) -> (b*f, c, h, w): every conv of this network is spatial
        x = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        x = _conv(self.init_conv, x)
        if self.frame_position:
            x = x + tables["frame_pos"].to(dtype).repeat(b, 1)[:, :, None, None]
        x = self.init_temporal_attn(x, **attn_kw)  # upstream passes no focus mask here
        r = x

        t = self.time_mlp[1:](self.time_mlp[0](time).to(dtype))
        drop_rows = None  # which rows get the null conditioning: None (none), True (all) or a (b,) bool mask
        if self.has_cond:
            if null_cond_prob >= 1:
                cond = self.null_cond_emb.expand(b, -1)
                drop_rows = True
            elif null_cond_prob > 0 or (self.training and torch.is_grad_enabled()):
                # training keeps null_cond_emb in the graph even at probability 0 (zero gradient, as
                # upstream), so that DDP and optimizers see the same parameters every step
                drop = prob_mask_like((b,), null_cond_prob, device=device)
                cond = torch.where(drop[:, None], self.null_cond_emb, cond)
                drop_rows = drop
            t = torch.cat((t, cond.to(t.dtype)), dim=-1)
        if self.frame_film:  # (b, f, D): each frame's conditioning vector, the caption and the frame index mixed
            index = tables["frame_index"].to(t.dtype)
            mixed = torch.cat((t[:, None].expand(-1, f, -1), index[None].expand(b, -1, -1)), dim=-1)
            t = t[:, None] + self.frame_film_mlp(mixed)
        text_kw = None
        if self.text_cross_attention:
            text_kw = dict(frames=f, **self.text_context(text_tokens, text_mask, drop=drop_rows, batch=b))
        elif exists(text_tokens) or exists(text_mask):
            raise ValueError("this Unet3D was built without text_cross_attention: it takes no text_tokens or "
                             "text_mask (build it with text_cross_attention=True, and train it so)")
        cross_attns = iter(self.text_cross_attns) if exists(text_kw) else None

        attn_kw.update(blocked=blocked, values_only=values_only)
        hs = []
        for block1, block2, spatial_attn, temporal_attn, downsample in self.downs:
            x = block1(x, f, t)
            x = block2(x, f, t)
            x = spatial_attn(x)
            if exists(cross_attns):
                x = next(cross_attns)(x, **text_kw)
            x = temporal_attn(x, **attn_kw)
            hs.append(x)
            if isinstance(downsample, nn.Conv3d):
                x = _conv(downsample, x)

        x = self.mid_block1(x, f, t)
        x = self.mid_spatial_attn(x)
        if exists(cross_attns):
            x = next(cross_attns)(x, **text_kw)
        x = self.mid_temporal_attn(x, **attn_kw)
        x = self.mid_block2(x, f, t)

        for block1, block2, spatial_attn, temporal_attn, upsample in self.ups:
            x = torch.cat((x, hs.pop()), dim=1)
            x = block1(x, f, t)
            x = block2(x, f, t)
            x = spatial_attn(x)
            if exists(cross_attns):
                x = next(cross_attns)(x, **text_kw)
            x = temporal_attn(x, **attn_kw)
            if isinstance(upsample, nn.ConvTranspose3d):
                x = _conv_transpose(upsample, x)

        x = torch.cat((x, r), dim=1)
        x = self.final_conv[0](x, f)
        x = _conv(self.final_conv[1], x)
        return x.reshape(b, f, -1, h, w).permute(0, 2, 1, 3, 4).contiguous()
