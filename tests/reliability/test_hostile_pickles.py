"""Hostile checkpoints: a pickle that would create a marker file when unpickled is refused, the refusal names
the global it asked for and never advises ``weights_only=False``, and the marker never appears — through
the Python API and through every command that loads a checkpoint."""

from __future__ import annotations

import os
import pathlib
import pickle
import subprocess

import pytest
import torch
from reliability_support import cli_command, cli_env, tiny_config, tiny_data  # noqa: F401 (fixtures)

from vdeploy.checkpoint import CheckpointError, load_checkpoint, load_denoiser_state


class _Payload:
    """Unpickling this calls ``func(*args)``: each variant would create the marker file."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: pathlib.Path) -> dict:
    """name -> (payload, the global as the pickle names it: what torch refuses and vdeploy reports)."""
    return {
        "os.system": (_Payload(os.system, f"touch {marker}"), "posix.system"),
        "builtins.exec": (_Payload(exec, f"open({str(marker)!r}, 'w').close()"), "global exec"),
        "builtins.eval": (_Payload(eval, f"open({str(marker)!r}, 'w')"), "global eval"),
        # protocol 2 writes subprocess.call under its Python 2 name, commands.call
        "subprocess.call": (_Payload(subprocess.call, ["touch", str(marker)]), "commands.call"),
        # an unbound method pickles as getattr(pathlib.Path, "touch")
        "pathlib.touch": (_Payload(pathlib.Path.touch, marker), "global getattr"),
    }


def _write(path: pathlib.Path, payload, container: str) -> None:
    """The payload inside what a checkpoint looks like: torch's zip format (tensors beside it) or a legacy
    raw pickle (no tensors: their own global, torch.storage._load_from_bytes, would be refused first)."""
    if container == "zip":
        torch.save({"format": "vdeploy-checkpoint", "format_version": 1, "step": 1,
                    "model": {"denoise_fn.init_conv.weight": torch.zeros(2)}, "ema": payload}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"format": "vdeploy-checkpoint", "step": 1, "model": payload}, f, protocol=2)


def _assert_refusal(message: str, path, global_name: str) -> None:
    assert str(path) in message
    assert global_name in message, message
    assert "could run code" in message and "was not loaded" in message, message
    assert "weights_only" not in message and "trusted source" not in message, message


@pytest.mark.parametrize("container", ["zip", "legacy"])
@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "builtins.eval", "subprocess.call", "pathlib.touch"])
def test_hostile_checkpoint_is_refused_and_runs_nothing(tmp_path, kind, container):
    marker = tmp_path / "MARKER"
    payload, global_name = _payloads(marker)[kind]
    path = tmp_path / "model-1.pt"
    _write(path, payload, container)
    assert not marker.exists()  # writing it ran nothing
    for load in (load_checkpoint, load_denoiser_state):
        with pytest.raises(CheckpointError) as e:
            load(path)
        _assert_refusal(str(e.value), path, global_name)
    assert not marker.exists()


def test_the_payload_is_real(tmp_path):
    """The same file, loaded the unsafe way torch's message suggests, does create the marker: the test above
    would notice a loader that runs code."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    _write(path, _payloads(marker)["pathlib.touch"][0], "zip")
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_every_command_that_loads_a_checkpoint_refuses_it(tmp_path, tiny_data, tiny_config):  # noqa: F811
    marker = tmp_path / "MARKER"
    results = tmp_path / "results"
    results.mkdir()
    evil = results / "model-last.pt"
    _write(evil, _payloads(marker)["os.system"][0], "zip")
    model = tmp_path / "model"
    runs = {
        "export": ["export", "--ckpt", str(evil), "--out", str(model)],
        "train --resume": ["train", "--data", str(tiny_data), "--results", str(results), "--resume", "--quiet"],
    }
    for name, args in runs.items():
        proc = subprocess.run(cli_command(*args), capture_output=True, text=True, env=cli_env(), timeout=300)
        lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("[")]
        assert proc.returncode == 2, (name, proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("Error: "), (name, proc.stderr)
        _assert_refusal(lines[0], evil, "posix.system")
        assert "Traceback" not in proc.stderr
    assert not marker.exists()
    assert not model.exists()
