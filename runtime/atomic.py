"""Atomic file writes: a temporary file in the target's directory, fsync, ``os.replace``.

A failure at any moment (a full disk, an encoder error, a kill) leaves the previous file byte for
byte as it was, and no half-written file under the target's name. Torch-free: the runtime's video
writers, the export stage and the trainer's checkpoints all write through here.
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def temp_name(path: Path) -> Path:
    """A fresh hidden name beside ``path`` that keeps its suffix (encoders pick the format by it)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")


def stale_temps(path: str | os.PathLike) -> list[Path]:
    """Temporary files that an interrupted write of ``path`` (a killed process) left behind."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*.tmp{path.suffix}"))


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that wants a file name (pillow, ffmpeg).

    When the block ends normally the temporary file is fsynced and renamed over ``path``; when it
    raises (or the writer left no file) the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = temp_name(path)
    # created here, so that the umask applies (mkstemp would make it 0600) and the name is ours
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """``open(path, mode)`` for writing, atomically: the data lands under ``path`` only if the block succeeds."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=encoding if "b" not in mode else None) as f:
            yield f  # closed (flushed) here; atomic_path fsyncs before the rename


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


def unwritable(path: str | os.PathLike, *, directory: bool = False) -> str | None:
    """Why ``path`` (a file, or a folder with ``directory``) cannot be written, or None where it can.

    Checked without creating anything: ``path`` itself (an existing folder where a file is wanted, or
    the reverse) and its nearest existing ancestor (a folder, writable). For validating an output
    option before a long run.
    """
    path = Path(path)
    if path.exists():
        if directory and not path.is_dir():
            return f"{path} exists and is not a directory"
        if not directory and path.is_dir():
            return f"{path} is a directory"
        target = path if directory else path.parent
        return None if os.access(target, os.W_OK | os.X_OK) else f"{target} is not writable"
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable"
    return None


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable (best effort: some file systems refuse directory fsync)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
