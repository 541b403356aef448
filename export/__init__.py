"""vdeploy.export: torch -> ONNX -> TensorRT, graph checks and parity (the stage that sees both sides).

Public API (imported on first use, so ``import vdeploy.export`` stays cheap)::

    export_onnx(ckpt, out, *, config=None, ema=True, opset=17, cfg=False, fp16=False, optimize="auto",
                text_encoder=None, tensorrt=None, dynamic_size=True, atol=1e-4) -> Manifest
    export_unet(unet, config, out, **same options)    # an in-memory Unet3D
    load_unet(ckpt, config=None, ema=True) -> (unet, config, step)
    ExportSpec, denoiser_spec                          # the spec of one graph (names, roles, axes, atol)
    VARIANTS, GraphVariant                             # the exported graph variants table
    ExportError (bad input, exit 2), ValidationError (a graph failed its checks)
    TensorRTOptions, parse_shapes                      # --tensorrt
    run_parity(...)                                    # vdeploy parity
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "export_onnx": "exporter",
    "export_unet": "exporter",
    "load_unet": "exporter",
    "ExportSpec": "spec",
    "VARIANTS": "variants",
    "GraphVariant": "variants",
    "denoiser_spec": "spec",
    "ExportError": "spec",
    "ValidationError": "spec",
    "TensorRTOptions": "tensorrt",
    "TensorRTUnavailable": "tensorrt",
    "parse_shapes": "tensorrt",
    "run_parity": "parity",
    "ParityError": "parity",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
