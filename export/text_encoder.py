"""Export of the local text encoder (BERT/MiniLM + the seed's ``bert_embed`` pooling) to ONNX.

Writes ``text_encoder/model.onnx`` (int64 ``input_ids``, ``attention_mask`` ``(b, n)`` -> float32
``embedding`` ``(b, dim)``; for a ``text_cross_attention`` model also ``tokens`` ``(b, n, dim)``, every token's last
hidden state, zero at padding) and ``text_encoder/tokenizer.json``, so the torch-free runtime embeds captions
with the ``tokenizers`` library and onnxruntime. Checked like the denoiser: checker, names, shapes, and
onnxruntime against :class:`vdeploy.text.TextEncoder` on captions of different lengths (padding included).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from .checks import Case, check_graph, check_parity
from .spec import ExportError, text_encoder_spec

log = logging.getLogger("vdeploy.export")

PARITY_CAPTIONS = (
    ["a red circle moving left"],
    ["a small blue square moving up and to the right, slowly", "green", "a yellow triangle bouncing"],
)


def export_text_encoder(
    out_dir: str | Path, path: str | Path | None, *, cls_repr: bool = False, cond_dim: int | None = None, opset: int = 17,
    tokens: bool = False, standardize: tuple | None = None,
) -> dict:
    """Export the encoder at ``path`` (default: the embedded MiniLM) into ``out_dir/text_encoder/``.

    Args:
        out_dir: the (staging) model directory.
        path: local HF model directory; None for :func:`vdeploy.text.default_text_encoder_dir`.
        cls_repr: pool as the [CLS] vector (``text_use_bert_cls``) instead of the masked mean.
        cond_dim: the denoiser's conditioning width, which the encoder's width must equal.
        tokens: also output the token embeddings (a ``text_cross_attention`` model), checked like the pooled ones.
        standardize: a ``text_standardize`` model's caption map ``(mode, mean, proj)`` (the U-Net's buffers): the
            graph's ``embedding`` is ``(pooled - mean) @ proj``, as ``GaussianDiffusion.embed_text`` gives it, so the
            runtime's prompts reach the denoiser as in training; the tokens are not mapped. None: the pooled vector.

    Returns:
        ``{"dir": "text_encoder", "dim": ..., "max_length": ..., "pooling": ..., "parity": {...},
        "source": ...}`` for the manifest.

    Raises:
        ExportError: the directory does not load, has no ``tokenizer.json``, or its width is not ``cond_dim``.
    """
    import torch

    from vdeploy.text import TextEncoder, TextEncoderError

    from .wrapper import PooledTextEncoder

    try:
        encoder = TextEncoder(path)
    except TextEncoderError as e:
        raise ExportError(str(e)) from None
    tokenizer_json = encoder.path / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise ExportError(f"text encoder directory {encoder.path} has no tokenizer.json (the runtime's tokenizers need it)")
    if cond_dim is not None and encoder.dim != cond_dim:
        raise ExportError(
            f"text encoder {encoder.path} embeds to {encoder.dim} dims but the model's cond_dim is {cond_dim}"
        )
    spec = text_encoder_spec(encoder.dim, opset=opset, tokens=tokens)
    target = Path(out_dir) / "text_encoder"
    target.mkdir()
    onnx_path = Path(out_dir) / spec.file

    module = PooledTextEncoder(_eager_attention(encoder.model), cls_repr=cls_repr, tokens=tokens).eval()
    if standardize is not None:
        module = _Standardized(module, *standardize[1:]).eval()
    sample = encoder.tokenize(["a trace caption", "a second, longer trace caption with padding"])
    log.info("exporting the text encoder %s (%d dims) to %s", encoder.path, encoder.dim, spec.file)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (sample["input_ids"], sample["attention_mask"]),
            str(onnx_path),
            dynamo=False,
            opset_version=opset,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes,
        )
    _write_tokenizer(tokenizer_json, target / "tokenizer.json", encoder.max_length)
    check_graph(onnx_path, spec)
    errors = check_parity(onnx_path, spec, _cases(encoder, cls_repr, tokens, standardize))
    log.info("text encoder parity vs PyTorch: %s", ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    return {
        "dir": "text_encoder",
        "dim": encoder.dim,
        "max_length": encoder.max_length,
        "pooling": ("cls" if cls_repr else "masked_mean_excluding_cls") + (f"+{standardize[0]}" if standardize else ""),
        "source": str(encoder.path),
        "spec": spec,
        "parity": {"atol": spec.atol, "max_abs_err": errors},
    }


def _write_tokenizer(src: Path, dst: Path, max_length: int) -> None:
    """Copy ``tokenizer.json`` with the padding/truncation :class:`vdeploy.text.TextEncoder` uses (pad to the
    longest caption, cut at ``max_length``), so the runtime's ``tokenizers`` produce the same tokens; some
    tokenizer.json files (MiniLM's) pad every caption to a fixed 128 tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(src))
    padding = tokenizer.padding or {}
    pad_token = padding.get("pad_token", "[PAD]")
    pad_id = padding.get("pad_id", tokenizer.token_to_id(pad_token) or 0)
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)
    tokenizer.enable_truncation(max_length)
    tokenizer.save(str(dst))


def _eager_attention(model):
    """Trace with the plain (eager) attention: the SDPA/mask-builder paths do not trace cleanly."""
    try:
        model.set_attn_implementation("eager")
    except (AttributeError, ValueError):
        if hasattr(model.config, "_attn_implementation"):
            model.config._attn_implementation = "eager"
    return model


def _Standardized(inner, mean, proj):
    """``inner`` (a ``PooledTextEncoder``) with its pooled output through a ``text_standardize`` caption map
    ``(pooled - mean) @ proj`` (tokens unchanged): two constant ops at the end of the graph."""
    import torch
    from torch import nn

    class Standardized(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner
            self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(-1))
            self.register_buffer("proj", torch.as_tensor(proj, dtype=torch.float32))

        def forward(self, input_ids, attention_mask):
            out = self.inner(input_ids, attention_mask)
            pooled, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
            mapped = (pooled - self.mean) @ self.proj
            return (mapped, *rest) if rest else mapped

    return Standardized()


def _cases(encoder, cls_repr: bool, tokens: bool = False, standardize: tuple | None = None) -> list[Case]:
    from vdeploy.text import standardize as apply_map

    cases = []
    for texts in PARITY_CAPTIONS:
        ids = encoder.tokenize(texts)
        feed = {k: v.numpy().astype(np.int64) for k, v in ids.items()}
        ref = encoder(texts, return_cls_repr=cls_repr).cpu()
        if standardize is not None:
            import torch

            ref = apply_map(ref, torch.as_tensor(standardize[1]), torch.as_tensor(standardize[2]))
        ref = ref.numpy()
        cases.append(Case(f"b{len(texts)}", feed, ref))
        if tokens:  # every token, as TextEncoder.encode gives them before cutting to the model's length
            n = feed["input_ids"].shape[1]
            per_token = encoder.encode(texts, n, return_cls_repr=cls_repr)[1].cpu().numpy()
            cases.append(Case(f"b{len(texts)}_tokens", feed, per_token, output="tokens"))
    return cases

