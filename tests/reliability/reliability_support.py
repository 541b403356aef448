"""Fault injection, fuzzing and hostile files (issue 11): shared fixtures and the CI/full-mode counts.

CI mode (the default) keeps the whole folder to about a minute on 2 cores; ``pytest tests/reliability
--reliability-full`` runs the same tests with the full-mode counts below (the option is declared in
tests/conftest.py). Not a conftest.py: a second module named ``conftest`` would replace tests/conftest.py
in ``sys.modules``, which other test helpers import by that name. Test modules import the fixtures.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# what each test does in CI and in full mode (the README's Reliability table quotes these)
COUNTS = {
    "kills": (5, 20),
    "gif_reader": (300, 3000),
    "caption_reader": (200, 2000),
    "config_resolve": (400, 4000),
    "config_files": (100, 1000),
    "config_builds": (15, 150),
    # the runtime half (test_fuzz_runtime.py, test_load.py)
    "manifest_json": (300, 3000),
    "pipeline_call": (120, 1200),  # per model: unconditioned and conditioned
    "load_calls": (40, 200),  # calls on one Pipeline from 8 threads
}

# the kill test's model: tiny enough that a step and its checkpoint take ~0.1 s
KILL_CONFIG = {"dim": 8, "dim_mults": [1, 2], "attn_heads": 2, "attn_dim_head": 8, "image_size": 16,
               "num_frames": 4, "timesteps": 10, "use_sparse_linear_attn": False}


@pytest.fixture(scope="session")
def full_mode(request) -> bool:
    return bool(request.config.getoption("--reliability-full"))


def count(name: str, full: bool) -> int:
    ci, full_count = COUNTS[name]
    return full_count if full else ci


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """4 synthetic captioned clips, 4 frames of 16 px."""
    from vdeploy.data import synth_dataset

    folder = tmp_path_factory.mktemp("reliability-data")
    synth_dataset(folder, num=4, frames=4, size=16, seed=0)
    return folder


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reliability-config") / "tiny.json"
    path.write_text(json.dumps(KILL_CONFIG))
    return path


def cli_env(**extra: str) -> dict:
    """The environment for a ``python -m vdeploy.cli`` subprocess: one thread, no progress colours."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "vdeploy.cli", *args]
