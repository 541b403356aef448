"""The conditioning row of a model with token-level text conditioning (config ``text_cross_attention``).

The samplers, guidance (``steps.guided``), the serving batcher and parity carry a run's conditioning as one float32
row per video, ``cond`` ``(b, width)``. For a token model that row packs the pooled embedding, the caption's token
embeddings and their mask::

    [ pooled (D) | tokens (L * D) | mask (L) ]        width = D + L * D + L

and the denoiser's feeds split it into the graph's ``cond``, ``text_tokens`` and ``text_mask`` inputs (found by
role). Its null row is the learned null embedding, the learned null token sequence and an all-ones mask, so the
unconditional branch of guidance is null for both, as the torch model's ``null_cond_prob=1``. Everything that
moves, repeats or broadcasts rows (guidance's null rows, the batcher's concatenation across requests) works on
it unchanged. Numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TokenLayout:
    """Where the pooled embedding (``cond_dim`` D), the tokens (``max_tokens`` L) and the mask sit in a row."""

    cond_dim: int
    max_tokens: int

    @property
    def width(self) -> int:
        return self.cond_dim + self.max_tokens * self.cond_dim + self.max_tokens

    def pack(self, pooled: np.ndarray, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """``(b, D)``, ``(b, L, D)``, ``(b, L)`` -> rows ``(b, width)`` float32."""
        b = pooled.shape[0]
        parts = (np.asarray(pooled, np.float32).reshape(b, self.cond_dim),
                 np.asarray(tokens, np.float32).reshape(b, self.max_tokens * self.cond_dim),
                 np.asarray(mask, np.float32).reshape(b, self.max_tokens))
        return np.concatenate(parts, axis=1)

    def split(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows ``(b, width)`` -> ``(pooled (b, D), tokens (b, L, D), mask (b, L))`` (contiguous float32 copies)."""
        rows = np.asarray(rows, np.float32)
        d, n = self.cond_dim, self.max_tokens
        b = rows.shape[0]
        pooled = np.ascontiguousarray(rows[:, :d])
        tokens = np.ascontiguousarray(rows[:, d : d + n * d]).reshape(b, n, d)
        return pooled, tokens, np.ascontiguousarray(rows[:, d + n * d :])

    def null_row(self, null_cond: np.ndarray, null_tokens: np.ndarray) -> np.ndarray:
        """The unconditional row ``(1, width)``: the null embedding, the null token sequence, every token kept."""
        return self.pack(np.reshape(null_cond, (1, -1)), np.reshape(null_tokens, (1, self.max_tokens, -1)),
                         np.ones((1, self.max_tokens), np.float32))


def pad_tokens(tokens: np.ndarray, mask: np.ndarray, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Token embeddings ``(b, n, D)`` and mask ``(b, n)`` cut or zero-padded to ``max_tokens``, padding zeroed (as
    ``vdeploy.text.pad_tokens`` does in torch)."""
    tokens, mask = np.asarray(tokens, np.float32), np.asarray(mask, np.float32)
    n = tokens.shape[1]
    if n >= max_tokens:
        tokens, mask = tokens[:, :max_tokens], mask[:, :max_tokens]
    else:
        tokens = np.pad(tokens, ((0, 0), (0, max_tokens - n), (0, 0)))
        mask = np.pad(mask, ((0, 0), (0, max_tokens - n)))
    return tokens * mask[..., None], mask
