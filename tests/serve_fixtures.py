"""Session fixtures of the serving tests: the tiny conditioned runtime model with a fused ``--cfg`` graph.

    from serve_fixtures import fused_model_dir  # noqa: F401  (a pytest fixture)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime_fixtures import COND_DIM, config, tiny_unet, torch_threads, write_model_dir


@pytest.fixture(scope="session")
def fused_model_dir(tmp_path_factory) -> Path:
    """``runtime_fixtures.model_dir("cond")``'s model (text encoder, null embedding) plus ``denoiser_cfg.onnx``."""
    with torch_threads(1):
        return write_model_dir(tmp_path_factory.mktemp("fused") / "m", tiny_unet(COND_DIM), config(COND_DIM),
                               fused_cfg=True, text_encoder=True)
