"""Thin torch modules that are what gets traced: one denoiser contract, no training-only arguments.

``Denoiser.forward(x, t[, cond])`` is ``unet(x, t, cond)`` for a fixed frame count with the temporal
position tables (relative position bias, rotary cos/sin) held as buffers, so the trace turns them into
graph constants. ``CfgDenoiser`` adds ``cond_scale`` and runs the conditional and the null prediction
as one batch of 2b. ``PooledTextEncoder`` is a local HF BERT plus the seed's ``bert_embed`` pooling.
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

    def eps(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        tables = self.tables()
        kwargs = {"tables": tables} if tables is not None else {}
        return self.unet(x, t, cond=cond, **kwargs)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.eps(x, t, cond)


class CfgDenoiser(Denoiser):
    """Classifier-free guidance in one call: ``null + (cond_eps - null) * cond_scale``.

    ``x``, ``t`` are repeated and ``cond`` is stacked on the learned null embedding, so the U-Net runs
    once on a batch of 2b (what upstream's ``forward_with_cond_scale`` computes in two calls).
    """

    def __init__(self, unet: nn.Module, num_frames: int):
        super().__init__(unet, num_frames)
        if not self.has_cond:
            raise ValueError("a CFG graph needs a conditioned model")

    def forward(self, x: Tensor, t: Tensor, cond: Tensor, cond_scale: Tensor) -> Tensor:  # type: ignore[override]
        null = self.unet.null_cond_emb.expand(x.shape[0], -1)
        eps = self.eps(torch.cat((x, x)), torch.cat((t, t)), torch.cat((cond, null)))
        cond_eps, null_eps = eps.chunk(2)
        return null_eps + (cond_eps - null_eps) * cond_scale


class PooledTextEncoder(nn.Module):
    """A local HF BERT-like encoder and its pooling: ``(input_ids, attention_mask) -> (b, dim)``.

    Pooling as the seed's ``bert_embed`` (``vdeploy.text``): the mean of the last hidden state over the
    unmasked tokens after [CLS], or the [CLS] vector with ``cls_repr`` (``text_use_bert_cls``).
    """

    def __init__(self, model: nn.Module, cls_repr: bool = False):
        super().__init__()
        self.model = model
        self.cls_repr = cls_repr

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        from vdeploy.text import masked_mean_excluding_cls

        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.cls_repr:
            return hidden[:, 0].float()
        return masked_mean_excluding_cls(hidden, attention_mask).float()
