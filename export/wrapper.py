"""Thin torch modules that are what gets traced: one denoiser contract, no training-only arguments.

``Denoiser.forward(x, t[, cond][, text_tokens, text_mask][, frames, mask])`` is ``unet(x, t, cond, frames=, mask=,
text_tokens=, text_mask=)`` for a fixed frame count with the temporal position tables (relative position bias,
rotary cos/sin) held as buffers, so the trace turns them into graph constants; ``frames``/``mask`` exist for a
model trained with frame conditioning, ``text_tokens``/``text_mask`` for one with ``text_cross_attention``.
``CfgDenoiser`` adds ``cond_scale`` and runs the conditional and the null prediction as one batch of 2b.
``PooledTextEncoder`` is a local HF BERT plus the seed's ``bert_embed`` pooling (and, for a token model, the
token embeddings).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Denoiser(nn.Module):
    """``eps = unet(x, t, cond)`` with the position tables for ``num_frames`` frames as buffers.

    Args:
        unet: a ``vdeploy.model.Unet3D`` (or any module with the same ``forward``; one without
            ``position_tables``, such as the reference package's, computes its tables in the graph).
        num_frames: the frame count the graph is fixed to.
    """

    def __init__(self, unet: nn.Module, num_frames: int):
        super().__init__()
        self.unet = unet
        self.num_frames = num_frames
        self.has_cond = bool(getattr(unet, "has_cond", False))
        self.frame_conditioning = bool(getattr(unet, "frame_conditioning", False))
        self.text_tokens = bool(getattr(unet, "text_cross_attention", False))
        self._table_names: list[str] = []
        if hasattr(unet, "position_tables"):
            with torch.no_grad():
                for name, table in unet.position_tables(num_frames).items():
                    self.register_buffer(f"table_{name}", table.detach().clone(), persistent=False)
                    self._table_names.append(name)

    def tables(self) -> dict[str, Tensor] | None:
        if not self._table_names:
            return None
        return {name: getattr(self, f"table_{name}") for name in self._table_names}

    def eps(self, x: Tensor, t: Tensor, cond: Tensor | None, frames: Tensor | None = None,
            mask: Tensor | None = None, text_tokens: Tensor | None = None, text_mask: Tensor | None = None) -> Tensor:
        tables = self.tables()
        kwargs = {"tables": tables} if tables is not None else {}
        if self.frame_conditioning:
            kwargs.update(frames=frames, mask=mask)
        if self.text_tokens:
            kwargs.update(text_tokens=text_tokens, text_mask=text_mask)
        return self.unet(x, t, cond=cond, **kwargs)

    def split(self, inputs: tuple, named: dict) -> dict[str, Tensor]:
        """The inputs by role: positional in graph order ``x, t[, cond][, text_tokens, text_mask][, frames, mask]
        [, cond_scale]`` (what the trace passes), or by keyword."""
        roles = (["x", "t"] + (["cond"] if self.has_cond else []) + (["text_tokens", "text_mask"] if self.text_tokens
                                                                     else [])
                 + (["frames", "mask"] if self.frame_conditioning else []) + ["cond_scale"])
        return {**dict(zip(roles, inputs)), **named}

    def forward(self, *inputs: Tensor, **named: Tensor) -> Tensor:
        named = self.split(inputs, named)
        return self.eps(named["x"], named["t"], named.get("cond"), named.get("frames"), named.get("mask"),
                        named.get("text_tokens"), named.get("text_mask"))


class CfgDenoiser(Denoiser):
    """Classifier-free guidance in one call: ``null + (cond_eps - null) * cond_scale``.

    ``x``, ``t`` (and ``frames``, ``mask``) are repeated and ``cond`` is stacked on the learned null embedding (a
    token model's ``text_tokens`` on its null token sequence, ``text_mask`` on ones), so the U-Net runs once on a
    batch of 2b (what upstream's ``forward_with_cond_scale`` computes in two calls).
    """

    def __init__(self, unet: nn.Module, num_frames: int):
        super().__init__(unet, num_frames)
        if not self.has_cond:
            raise ValueError("a CFG graph needs a conditioned model")

    def forward(self, *inputs: Tensor, **named: Tensor) -> Tensor:
        named = self.split(inputs, named)
        x, cond = named["x"], named["cond"]
        null = self.unet.null_cond_emb.expand(x.shape[0], -1)
        frames, mask = named.get("frames"), named.get("mask")
        twice = (lambda v: None if v is None else torch.cat((v, v)))  # noqa: E731
        tokens = text_mask = None
        if self.text_tokens:
            tokens, text_mask = named["text_tokens"], named["text_mask"]
            null_tokens = self.unet.null_text_tokens.to(tokens.dtype).expand(x.shape[0], -1, -1)
            tokens = torch.cat((tokens, null_tokens))
            text_mask = torch.cat((text_mask, torch.ones_like(text_mask)))
        eps = self.eps(twice(x), twice(named["t"]), torch.cat((cond, null)), twice(frames), twice(mask), tokens,
                       text_mask)
        cond_eps, null_eps = eps.chunk(2)
        return null_eps + (cond_eps - null_eps) * named["cond_scale"]


class PooledTextEncoder(nn.Module):
    """A local HF BERT-like encoder and its pooling: ``(input_ids, attention_mask) -> (b, dim)``.

    Pooling as the seed's ``bert_embed`` (``vdeploy.text``): the mean of the last hidden state over the
    unmasked tokens after [CLS], or the [CLS] vector with ``cls_repr`` (``text_use_bert_cls``). With ``tokens``
    (a ``text_cross_attention`` model) it also returns the last hidden state of every token, zero where the
    mask is 0: ``(embedding, tokens (b, n, dim))``.
    """

    def __init__(self, model: nn.Module, cls_repr: bool = False, tokens: bool = False):
        super().__init__()
        self.model = model
        self.cls_repr = cls_repr
        self.tokens = tokens

    def forward(self, input_ids: Tensor, attention_mask: Tensor):
        from vdeploy.text import masked_mean_excluding_cls

        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = hidden[:, 0] if self.cls_repr else masked_mean_excluding_cls(hidden, attention_mask)
        if not self.tokens:
            return pooled.float()
        return pooled.float(), hidden.float() * attention_mask[..., None].to(torch.float32)
