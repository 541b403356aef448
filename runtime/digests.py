"""The sha256 of a file, remembered by the file's identity so that an unchanged file is not re-read wholesale.

Every load checks the sha256 of each file of the model directory and of the cached optimized graphs; for a
55 MB graph that is most of a cached start's CPU time. ``file_sha256`` hashes a file once and keeps its
digest in ``cache_dir()/digests/`` under the file's resolved path and stat identity (device, inode, size,
mtime and ctime in nanoseconds, as git's index does). A later call whose stat identity matches returns the
kept digest; any write to the file changes its ctime (which no user-space call can set back), so a
modified, replaced or truncated file is hashed again. A digest is kept only for a file that had not changed
for ``SETTLED_S`` before it was hashed: a write in the same clock tick as the hashing could otherwise leave
the identity unchanged (git's "racy" entries).

Trust: the kept digests live in the user's cache folder beside the compiled-model caches, which a start
already trusts the same way (whoever can write there can replace a cached graph). ``VDEPLOY_REHASH=1``
hashes every file every time.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from .atomic import write_text
from .manifest_types import sha256_file
from .platform import cache_dir

SETTLED_S = 2.0  # a file written less than this long before it is hashed gets no kept digest


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _entry(path: Path) -> Path:
    return cache_dir() / "digests" / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json"


def _kept_entry(path: Path, st: os.stat_result) -> dict | None:
    """The entry kept for ``path`` at the stat identity ``st`` (its digest and facts), if any."""
    if os.environ.get("VDEPLOY_REHASH") == "1":
        return None
    try:
        kept = json.loads(_entry(path).read_text())
        if kept["path"] == str(path) and kept["stat"] == _identity(st) and isinstance(kept["sha256"], str):
            return kept
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _kept(path: Path, st: os.stat_result) -> str | None:
    """The digest kept for ``path`` at the stat identity ``st``, if any."""
    kept = _kept_entry(path, st)
    return None if kept is None else kept["sha256"]


def _keep(path: Path, st: os.stat_result, digest: str, started_ns: int) -> None:
    """Keep ``digest`` for ``path`` at ``st`` where the file had settled when hashing started and is unchanged."""
    settled = started_ns - max(st.st_mtime_ns, st.st_ctime_ns) >= SETTLED_S * 1e9
    if not settled or os.environ.get("VDEPLOY_REHASH") == "1":
        return
    try:
        if _identity(os.stat(path)) != _identity(st):
            return
        entry = _entry(path)
        entry.parent.mkdir(parents=True, exist_ok=True)
        write_text(entry, json.dumps({"path": str(path), "stat": _identity(st), "sha256": digest}))
    except OSError:  # an unwritable cache only costs the next start a re-hash
        pass


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of ``path``: the kept digest when the file's stat identity is the one it was hashed
    with, else hashed now (and kept where the file had settled).

    Raises:
        OSError: the file cannot be read.
    """
    path = Path(path).resolve()
    st = os.stat(path)
    digest = _kept(path, st)
    if digest is None:
        started = time.time_ns()
        digest = sha256_file(path)
        _keep(path, st, digest, started)
    return digest


def read_with_sha256(path: str | os.PathLike) -> tuple[bytes, str]:
    """``path``'s bytes and their hex sha256 (the kept digest when the open file's stat identity is the one it
    was hashed with, else hashed from the bytes read).

    Raises:
        OSError: the file cannot be read.
    """
    path = Path(path).resolve()
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        started = time.time_ns()
        data = f.read()
    digest = _kept(path, st)
    if digest is None:
        digest = hashlib.sha256(data).hexdigest()
        _keep(path, st, digest, started)
    return data, digest


def kept_fact(path: str | os.PathLike, st: os.stat_result, name: str):
    """What ``keep_fact`` kept as ``name`` for ``path`` at the stat identity ``st`` (the caller's stat of the file
    now: unchanged since the digest beside it was kept), or None. A fact is something read from the file's bytes
    (for example the external-data locations of an ONNX graph), so it is exactly as trusted as the kept digest."""
    kept = _kept_entry(Path(path).resolve(), st)
    facts = None if kept is None else kept.get("facts")
    return facts.get(name) if isinstance(facts, dict) else None


def keep_fact(path: str | os.PathLike, st: os.stat_result, name: str, value) -> None:
    """Keep ``value`` (JSON) as ``name`` beside ``path``'s kept digest, where that digest was kept at the stat
    identity ``st`` (taken before the fact was read from the file) and the file still has it; otherwise keep
    nothing (a file with no kept digest, or one that changed meanwhile, is read again next time)."""
    path = Path(path).resolve()
    try:
        kept = _kept_entry(path, st)
        if kept is None or _identity(os.stat(path)) != _identity(st):
            return
        facts = kept.get("facts") if isinstance(kept.get("facts"), dict) else {}
        write_text(_entry(path), json.dumps({**kept, "facts": {**facts, name: value}}))
    except OSError:  # an unwritable cache only costs the next start a re-read
        pass
