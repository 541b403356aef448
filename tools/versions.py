"""Print, on one line, the versions of the packages the test suite exercises (``make test`` runs it first)."""
from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = ("torch", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "diffusers", "transformers",
            "tokenizers", "starlette", "uvicorn", "ray", "av", "hypothesis", "pytest")


def versions() -> str:
    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return f"tested with: python {platform.python_version()}, " + ", ".join(found)


if __name__ == "__main__":
    print(versions())
