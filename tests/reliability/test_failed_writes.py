"""Failed writes: a full disk (every write to the file fails with ENOSPC after a few bytes) or a failing encoder
while a checkpoint, a sampled video or a JSON report is written leaves the previous file byte for byte as it
was, leaves no temporary file behind, and is reported in one line."""

from __future__ import annotations

import builtins
import errno
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from reliability_support import tiny_config, tiny_data  # noqa: F401 (fixtures)

from vdeploy import checkpoint as ckpt_io
from vdeploy.cli import main
from vdeploy.runtime import atomic, save_gif

_open = builtins.open


class _FullDisk:
    """A file whose writes fail with ENOSPC once ``budget`` bytes are written (the first ones do land)."""

    def __init__(self, f, budget: int):
        self._f, self._left = f, budget

    def write(self, data) -> int:
        data = bytes(data) if not isinstance(data, str) else data
        if len(data) > self._left:
            self._f.write(data[: self._left])
            self._left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._left -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk("model-2.pt")``: from now on, files whose path contains that text fill the disk when written."""

    def arm(fragment: str, budget: int = 64):
        def fake_open(file, mode="r", *args, **kwargs):
            f = _open(file, mode, *args, **kwargs)
            if fragment in str(file) and any(c in mode for c in "wax+"):
                return _FullDisk(f, budget)
            return f

        monkeypatch.setattr(builtins, "open", fake_open)

    return arm


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_full_disk_during_a_checkpoint_save_keeps_the_previous_one(tmp_path, full_disk):
    path = tmp_path / "model-last.pt"
    ckpt_io.save_checkpoint({"step": 1, "model": {"w": torch.ones(1000)}}, path)
    before = path.read_bytes()
    full_disk("model-last.pt")
    with pytest.raises(ckpt_io.CheckpointWriteError) as e:
        ckpt_io.save_checkpoint({"step": 2, "model": {"w": torch.zeros(1000)}}, path)
    assert str(e.value) == (f"cannot write checkpoint {path}: No space left on device; "
                            "the previous model-last.pt is unchanged")
    assert isinstance(e.value, OSError)
    assert path.read_bytes() == before and _leftovers(tmp_path) == []


def test_a_full_disk_during_training_stops_in_one_line_and_resumes_later(tiny_data, tiny_config, tmp_path,  # noqa: F811
                                                                         full_disk, monkeypatch):
    results = tmp_path / "r"
    args = ["train", "--data", str(tiny_data), "--results", str(results), "--config", str(tiny_config),
            "--save-every", "1", "--batch-size", "2", "--sample-rows", "1", "--quiet"]
    assert CliRunner().invoke(main, [*args, "--steps", "1"]).exit_code == 0
    before = (results / "model-last.pt").read_bytes()
    full_disk("model-2.pt")
    result = CliRunner().invoke(main, [*args, "--steps", "3", "--resume"])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: cannot write checkpoint {results / 'model-2.pt'}: No space left on device; "
                      "nothing was written"], result.output
    assert (results / "model-last.pt").read_bytes() == before and not (results / "model-2.pt").exists()
    assert _leftovers(results) == []
    monkeypatch.setattr(builtins, "open", _open)  # space again: the run resumes from step 1
    again = CliRunner().invoke(main, [*args, "--steps", "3", "--resume"])
    assert again.exit_code == 0 and "steps 1 -> 3" in again.output, again.output


def _video(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((3, 4, 8, 8), dtype=np.float32)


def test_a_failing_gif_encoder_keeps_the_previous_file(tmp_path, monkeypatch):
    out = save_gif(_video(0), tmp_path / "sample.gif")
    before = out.read_bytes()

    def broken(im, fp, filename, save_all=False):
        fp.write(b"GIF89a half a file")
        raise OSError("encoder failed")

    monkeypatch.setitem(Image.SAVE_ALL, "GIF", broken)  # what GIF save_all calls
    with pytest.raises(OSError, match="encoder failed"):
        save_gif(_video(1), out)
    assert out.read_bytes() == before and _leftovers(tmp_path) == []


def test_a_full_disk_while_writing_a_gif_keeps_the_previous_file(tmp_path, full_disk):
    out = save_gif(_video(0), tmp_path / "sample.gif")
    before = out.read_bytes()
    full_disk("sample.gif")
    with pytest.raises(OSError) as e:
        save_gif(_video(1), out)
    assert e.value.errno == errno.ENOSPC
    assert out.read_bytes() == before and _leftovers(tmp_path) == []


def test_a_full_disk_while_writing_json_keeps_the_previous_file(tmp_path, full_disk):
    report = tmp_path / "parity.json"
    atomic.write_text(report, '{"ok": true}\n')
    full_disk("parity.json", budget=4)
    with pytest.raises(OSError):
        atomic.write_text(report, '{"ok": false, "long": "' + "x" * 100 + '"}\n')
    assert report.read_text() == '{"ok": true}\n' and _leftovers(tmp_path) == []


def test_vdeploy_sample_whose_encoding_fails_keeps_the_previous_out(tmp_path, monkeypatch):
    from runtime_fixtures import model_dir

    model = model_dir("uncond")
    out = tmp_path / "sample.gif"
    argv = ["sample", "--model", str(model), "--out", str(out), "--steps", "2", "--seed", "0", "--quiet",
            "--backend", "cpu"]
    assert CliRunner().invoke(main, argv).exit_code == 0
    before = out.read_bytes()

    def broken(im, fp, filename, save_all=False):
        fp.write(b"GIF89a half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setitem(Image.SAVE_ALL, "GIF", broken)  # what GIF save_all calls
    result = CliRunner().invoke(main, [*argv, "--seed", "1"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"Error: cannot write {out}: No space left on device; the earlier file there is unchanged"]
    assert out.read_bytes() == before and _leftovers(tmp_path) == []
