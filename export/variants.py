"""The exported graph variants: what is traced (or derived) from what, its reference, its tolerance.

``VARIANTS`` maps a manifest graph name to a :class:`GraphVariant`. The exporter runs one loop over the
variants an export asks for (in table order): build the graph (trace a wrapper of the U-Net, or derive it
from an earlier variant's file), apply the optimization the plain graph measured, check it
(``onnx.checker``, names, shapes), measure parity against its PyTorch reference, and record it in the
manifest; with ``--tensorrt`` a plan is built from every variant marked ``tensorrt``. Adding a variant is
one entry here plus its wrapper or conversion.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GraphVariant:
    """One exported graph.

    Args:
        file: its file in the model directory.
        option: the export option that asks for it, None: always. It is a keyword of ``export_onnx`` and a flag of
            ``vdeploy export`` (``--<option>``, its help the ``summary``) with no other edit.
        guidance: the graph takes ``cond_scale`` and returns the guided eps (needs a conditioned model).
        precision: what its weights and activations are (I/O stay float32).
        wrapper: ``(unet, num_frames) -> torch module`` traced with ``torch.onnx.export``, or None.
        derive: ``(source variant, convert(src, dst) -> record)``: built from another variant's file.
        reference: the PyTorch side of its parity cases: ``forward`` (cond and null-cond calls) or
            ``forward_with_cond_scale`` (the guided prediction).
        atol_option: the export option holding its tolerance against fp32 PyTorch (``atol``/``fp16_atol``; a new
            one, ``<name>_atol``, is a keyword of ``export_onnx`` too).
        tensorrt: a TensorRT plan is built from it with ``--tensorrt``.
        summary: one line for the docs and ``--help``.
    """

    file: str
    option: str | None
    guidance: bool
    precision: str
    wrapper: Callable | None
    derive: tuple[str, Callable[[Path, Path], dict]] | None
    reference: str
    atol_option: str
    tensorrt: bool
    summary: str


def _plain(unet, num_frames: int):
    from .wrapper import Denoiser

    return Denoiser(unet, num_frames)


def _guided(unet, num_frames: int):
    from .wrapper import CfgDenoiser

    return CfgDenoiser(unet, num_frames)


def _fp16(src: Path, dst: Path) -> dict:
    from .fp16 import convert_fp16

    return {"converted_from": src.name, "fp32_kept": convert_fp16(src, dst)}


VARIANTS: dict[str, GraphVariant] = {
    "denoiser": GraphVariant(
        "denoiser.onnx", None, False, "fp32", _plain, None, "forward", "atol", True,
        "eps = denoiser(x, t[, cond]); onnxslim'd when that measurably runs faster"),
    "denoiser_cfg": GraphVariant(
        "denoiser_cfg.onnx", "cfg", True, "fp32", _guided, None, "forward_with_cond_scale", "atol", True,
        "eps = denoiser_cfg(x, t, cond, cond_scale): cond and null in one call"),
    "denoiser_fp16": GraphVariant(
        "denoiser_fp16.onnx", "fp16", False, "fp16", None, ("denoiser", _fp16), "forward", "fp16_atol", False,
        "float16 weights and activations, fp32 I/O; softmax and norm statistics kept fp32"),
}


def selected(options: dict) -> list[str]:
    """The variants an export with ``options`` (``{"cfg": True, ...}``) builds, in table order."""
    return [name for name, v in VARIANTS.items() if v.option is None or options.get(v.option)]


def variant_options() -> dict[str, str]:
    """The export options that ask for a variant (``export_onnx`` keywords, ``vdeploy export`` flags): option ->
    variant name."""
    return {v.option: name for name, v in VARIANTS.items() if v.option is not None}
