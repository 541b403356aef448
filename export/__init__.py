"""vdeploy.export: torch -> ONNX -> TensorRT, graph checks and parity (the stage that sees both sides)."""
