"""The export spec of one graph: its names, roles, dynamic axes and tolerance.

:func:`denoiser_spec` derives a denoiser graph's from a resolved model config; the graph variants that
use it are declared in ``variants.py``. Tensor specs are the manifest's own
(``vdeploy.runtime.manifest.TensorSpec``), so what export checks is what the runtime reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from vdeploy.runtime.manifest import Graph, TensorSpec

DEFAULT_OPSET = 17
FP32_ATOL = 1e-4  # optimum's tolerance for exported U-Nets
# fp16 graph (fp32 I/O) against fp32 PyTorch: float16 has an 11-bit mantissa (eps 9.8e-4) and the
# error grows through ~20 normalised blocks (the README's parity table has the measured errors).
FP16_ATOL = 5e-2


class ExportError(ValueError):
    """Bad input to the export (checkpoint, config, output directory): one line, exit code 2."""


class ValidationError(RuntimeError):
    """The exported graph does not compute what PyTorch computes; the message lists every number."""


@dataclass(frozen=True)
class ExportSpec:
    """What one exported graph looks like and how it is checked.

    Args:
        name: the graph's key in the manifest (``denoiser``, ``denoiser_cfg``, ``text_encoder``).
        file: file name inside the model directory.
        inputs / outputs: tensor specs in graph order.
        opset: ONNX opset of the default domain.
        atol: max abs error against PyTorch that the export accepts (fp32).
        guidance: the graph takes ``cond_scale`` and returns the guided eps (cond and null in one batch).
    """

    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int = DEFAULT_OPSET
    atol: float = FP32_ATOL
    guidance: bool = False

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``torch.onnx.export``'s form: ``{"x": {0: "batch", 3: "height"}, ...}`` (the manifest graph's)."""
        return self.graph().dynamic_axes

    def graph(self, precision: str = "fp32", file: str | None = None, optimization: dict | None = None) -> Graph:
        """The graph's typed manifest entry."""
        return Graph(file=file or self.file, inputs=self.inputs, outputs=self.outputs, precision=precision,
                     guidance=self.guidance, optimization=optimization or {})


def denoiser_spec(
    config: dict, cond_dim: int | None, *, guidance: bool = False, name: str | None = None, file: str | None = None,
    dynamic_size: bool = True, opset: int = DEFAULT_OPSET, atol: float = FP32_ATOL,
) -> ExportSpec:
    """The spec of ``eps = denoiser(x, t[, cond][, text_tokens, text_mask][, frames, mask][, cond_scale])`` for a
    resolved model config (``text_tokens``/``text_mask``: a ``text_cross_attention`` model's, ``(batch, L, cond_dim)``
    and ``(batch, L)`` for its ``text_max_tokens`` L, padding marked 0 in the mask).

    Batch is always dynamic; height and width are dynamic when ``dynamic_size`` (any multiple of
    ``2 ** (len(dim_mults) - 1)``); frames are static: the temporal position tables are folded in.

    Args:
        config: resolved flat config (``vdeploy.config.resolve``).
        cond_dim: width of the conditioning (the model's ``null_cond_emb``), None if unconditioned.
        guidance: the fused classifier-free-guidance graph (needs a conditioned model).
        name, file: the graph's manifest key and file (default ``denoiser[_cfg]``, ``denoiser[_cfg].onnx``).
        dynamic_size: make height and width dynamic axes.
    """
    c, f, s = config["channels"], config["num_frames"], config["image_size"]
    out_c = config.get("out_dim") or c
    h, w = ("height", "width") if dynamic_size else (s, s)
    inputs = [TensorSpec("x", "float32", ("batch", c, f, h, w), "x"), TensorSpec("t", "int64", ("batch",), "t")]
    if cond_dim is not None:
        inputs.append(TensorSpec("cond", "float32", ("batch", cond_dim), "cond"))
    if config.get("text_cross_attention"):
        if cond_dim is None:
            raise ExportError("text_cross_attention needs a conditioned model (cond_dim); this one has none")
        length = config["text_max_tokens"]
        inputs.append(TensorSpec("text_tokens", "float32", ("batch", length, cond_dim), "text_tokens"))
        inputs.append(TensorSpec("text_mask", "float32", ("batch", length), "text_mask"))
    if config.get("frame_conditioning"):  # known frames (model space, zeros where unknown) and 1 = known
        inputs.append(TensorSpec("frames", "float32", ("batch", c, f, h, w), "frames"))
        inputs.append(TensorSpec("mask", "float32", ("batch", f), "mask"))
    if guidance:
        if cond_dim is None:
            raise ExportError("--cfg needs a conditioned model (cond_dim or use_bert_text_cond); this one has none")
        inputs.append(TensorSpec("cond_scale", "float32", (1,), "cond_scale"))
    default = "denoiser_cfg" if guidance else "denoiser"
    return ExportSpec(
        name=name or default,
        file=file or f"{name or default}.onnx",
        inputs=tuple(inputs),
        outputs=(TensorSpec("eps", "float32", ("batch", out_c, f, h, w)),),
        opset=opset,
        atol=atol,
        guidance=guidance,
    )


def text_encoder_spec(dim: int, opset: int = DEFAULT_OPSET, atol: float = FP32_ATOL,
                      tokens: bool = False) -> ExportSpec:
    """The spec of ``embedding = text_encoder(input_ids, attention_mask)`` (pooled, ``(b, dim)``); with ``tokens``
    also ``tokens`` ``(b, n, dim)``, the last hidden state of every token (zero where the mask is 0), for a
    ``text_cross_attention`` model."""
    outputs = (TensorSpec("embedding", "float32", ("batch", dim)),)
    if tokens:
        outputs += (TensorSpec("tokens", "float32", ("batch", "tokens", dim)),)
    return ExportSpec(
        name="text_encoder",
        file="text_encoder/model.onnx",
        inputs=(
            TensorSpec("input_ids", "int64", ("batch", "tokens")),
            TensorSpec("attention_mask", "int64", ("batch", "tokens")),
        ),
        outputs=outputs,
        opset=opset,
        atol=atol,
    )

