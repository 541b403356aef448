"""Text conditioning without torch: a ``tokenizers`` tokenizer and an ONNX text encoder.

The model directory's ``conditioning.text_encoder`` names a subdirectory holding ``tokenizer.json`` and
``model.onnx`` (int64 ``input_ids``/``attention_mask`` ``(b, n)`` -> float32 ``embedding`` ``(b, D)``,
already pooled; for a model with token-level text conditioning also ``tokens`` ``(b, n, D)``), written by the
export stage.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from .cond_row import pad_tokens
from .manifest import ManifestError
from .ort import OrtBackend
from .platform import BackendUnavailable


class TextEncoder:
    """Prompts -> float32 embeddings ``(b, D)``.

    Args:
        folder: the text encoder directory (``tokenizer.json``, ``model.onnx``).
        kind: the onnxruntime kind to run it on (``"cpu"`` or ``"cuda"``).
        max_length: the token cap when the tokenizer has no truncation of its own (default 512).
        threads: CPU intra-op threads.
        onnx_sha256: the sha256 of ``model.onnx`` (from the manifest), which keys its optimized-graph cache.
    """

    def __init__(self, folder: str | Path, kind: str = "cpu", *, max_length: int | None = None, threads=None,
                 onnx_sha256: str | None = None):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise BackendUnavailable("tokenizers is not installed: pip install 'vdeploy[cpu]'") from None
        folder = Path(folder)
        try:
            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception for every parse error
            message = " ".join(str(e).split())[:300]
            raise ManifestError(f"cannot read the tokenizer {folder / 'tokenizer.json'} ({message}): a corrupt "
                                "file or not a tokenizers JSON; re-export the model directory") from None
        if max_length is not None or self.tokenizer.truncation is None:
            self.tokenizer.enable_truncation(max_length or 512)
        if self.tokenizer.padding is None:
            pad_token = "[PAD]" if self.tokenizer.token_to_id("[PAD]") is not None else None
            pad_id = self.tokenizer.token_to_id(pad_token) if pad_token else 0
            self.tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token or "[PAD]")
        self.backend = OrtBackend(folder / "model.onnx", kind, threads=threads, onnx_sha256=onnx_sha256)
        self._lock = threading.Lock()  # tokenizer settings are shared state; encoding is cheap

    def close(self) -> None:
        """Let go of the encoder's onnxruntime session."""
        self.backend.close()

    def __call__(self, texts: list[str]) -> np.ndarray:
        """Prompts -> pooled embeddings ``(b, D)``."""
        return self._run(texts)[0]

    def encode(self, texts: list[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Prompts -> ``(pooled (b, D), tokens (b, max_tokens, D), mask (b, max_tokens))`` float32 for a model with
        token-level text conditioning: the tokens cut or zero-padded to its length, mask 1 for a real token."""
        pooled, mask, outputs = self._run(texts, tokens=True)
        tokens, mask = pad_tokens(outputs, mask, max_tokens)
        return pooled, tokens, mask

    def _run(self, texts: list[str], tokens: bool = False):
        with self._lock:
            encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        columns = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        feeds = {spec.name: columns[spec.name] for spec in self.backend.inputs if spec.name in columns}
        missing = [spec.name for spec in self.backend.inputs if spec.name not in columns]
        if missing:
            raise ValueError(f"text encoder {self.backend.path} has unknown input(s): {', '.join(missing)}")
        outputs = self.backend.run(feeds)
        pooled = np.asarray(outputs[0], dtype=np.float32)
        if not tokens:
            return pooled, mask
        names = [spec.name for spec in self.backend.outputs]
        if "tokens" not in names:
            raise ManifestError(f"text encoder {self.backend.path} has no 'tokens' output (outputs: {', '.join(names)}): "
                                "re-export the model directory")
        return pooled, mask, np.asarray(outputs[names.index("tokens")], dtype=np.float32)
