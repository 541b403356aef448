"""ONNX external data, checked without ``onnx``: every tensor whose bytes live in another file.

A graph may keep its weights outside the ``.onnx`` file: a tensor then carries ``data_location = EXTERNAL``
and ``external_data`` entries whose ``location`` is a path relative to the graph's folder. onnxruntime
opens that path when it loads the graph. In a model directory from a stranger, that path could name any
file on the machine (``../../home/me/.ssh/id_rsa``, an absolute path, a symlink out, or onnxruntime's
in-memory marker ``*/_ORT_MEM_ADDR_/*``). The runtime therefore reads every location before onnxruntime
sees the graph and accepts a location only when it is a relative, normalized path that stays inside the
model directory (symlinks resolved) **and** is listed in the manifest's ``files`` (so its sha256 is
checked like every other file). ``vdeploy export`` hashes every file it writes, so a graph it saved with
external data passes.

The runtime must not need the ``onnx`` package, so this module reads the protobuf wire format itself,
walking only the messages that can hold tensors (numbers from ``onnx.proto``)::

    ModelProto        graph 7, training_info 20, functions 25
    TrainingInfoProto initialization 1, algorithm 2                  (GraphProto)
    GraphProto        node 1, initializer 5, sparse_initializer 15
    FunctionProto     node 7, attribute_proto 11
    NodeProto         attribute 5
    AttributeProto    t 5, g 6, tensors 10, graphs 11, sparse_tensor 22, sparse_tensors 23
    SparseTensorProto values 1, indices 2                            (TensorProto)
    TensorProto       external_data 13 (StringStringEntryProto key 1, value 2), data_location 14

A file without the bytes ``location`` anywhere names no external file (onnxruntime reads only that key) and
is passed after one ``find`` over the mapped file; otherwise every message is walked, weights (``raw_data``
and the like) skipped by their length (a 4,500-node U-Net: 0.08 s). Malformed bytes are a
:class:`ManifestError` naming the file.
"""

from __future__ import annotations

import hashlib
import mmap
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from . import digests
from .manifest import ManifestError

MAX_DEPTH = 64  # nested subgraphs (If/Loop bodies); real graphs nest a few levels

# message -> {field number: message kind it holds}
_MESSAGES = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node", 11: "attribute"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
_EXTERNAL_DATA, _DATA_LOCATION, _EXTERNAL = 13, 14, 1


class _Malformed(Exception):
    pass


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """``(field number, wire type, value or (start, end))`` of one message's bytes."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise _Malformed("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if length > end - pos:
                raise _Malformed("a field runs past the end of its message")
            yield number, wire, (pos, pos + length)
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise _Malformed("truncated fixed-width field")
        else:
            raise _Malformed(f"wire type {wire}")


def _tensor_locations(buf, start: int, end: int) -> list[str | None]:
    """The external location of one TensorProto: ``[]`` (inline), ``[location]``, or ``[None]`` (external
    without a location)."""
    location, external, has_entries = None, False, False
    for number, wire, value in _fields(buf, start, end):
        if number == _DATA_LOCATION and wire == 0:
            external = value == _EXTERNAL
        elif number == _EXTERNAL_DATA and wire == 2:
            has_entries = True
            key = text = None
            for n, w, v in _fields(buf, *value):
                if w == 2 and n in (1, 2):
                    raw = bytes(buf[v[0]:v[1]])
                    try:
                        decoded = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        raise _Malformed("an external_data entry is not UTF-8") from None
                    key, text = (decoded, text) if n == 1 else (key, decoded)
            if key == "location":
                location = text
    if external or has_entries:
        return [location]
    return []


def _walk(buf, kind: str, start: int, end: int, depth: int, out: list) -> None:
    if depth > MAX_DEPTH:
        raise _Malformed(f"subgraphs nested deeper than {MAX_DEPTH}")
    children = _MESSAGES[kind]
    for number, wire, value in _fields(buf, start, end):
        child = children.get(number)
        if child is None or wire != 2:
            continue
        if child == "tensor":
            out.extend(_tensor_locations(buf, *value))
        else:
            _walk(buf, child, *value, depth + 1, out)


_SCANNED: dict[tuple, list] = {}  # (path, inode, size, mtime, ctime) -> locations: one scan per file and load
_FACT = "onnx_external_locations"  # the scan's result, kept beside the file's digest (runtime.digests)


def external_locations(path: str | Path) -> list[str | None]:
    """Every external-data ``location`` in the ONNX file at ``path``, in file order (None: a tensor marked
    external without a location). A file is not scanned again while it is unchanged (same inode, size,
    modification and change times): in this process (a load checks each graph twice: before opening it and
    for its cache key), nor in later ones, where the result is kept beside the file's kept sha256
    (``digests.keep_fact``; the scan reads the whole graph, 55 MB for the small preset).

    Raises:
        ManifestError: the file cannot be read or is not a well-formed protobuf.
    """
    path = Path(path)
    try:
        st = path.stat()
        stamp = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    except OSError:
        st = stamp = None
    if stamp in _SCANNED:
        return list(_SCANNED[stamp])
    kept = digests.kept_fact(path, st, _FACT) if st is not None else None
    if isinstance(kept, list) and all(loc is None or isinstance(loc, str) for loc in kept):
        found = kept
    else:
        found = _scan(path)
        if st is not None:
            digests.keep_fact(path, st, _FACT, found)
    if stamp is not None:
        _SCANNED[stamp] = list(found)
    return list(found)


def _scan(path: Path) -> list[str | None]:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size == 0:
                raise ManifestError(f"{path} is empty: not an ONNX graph")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                if buf.find(b"location") == -1:  # no tensor can name a file: skip the walk (C speed)
                    return []
                out: list = []
                _walk(buf, "model", 0, size, 0, out)  # mmap: buf[i] is an int, slices are bytes
                return out
    except OSError as e:
        raise ManifestError(f"cannot read {path}: {e.strerror or e}") from None
    except _Malformed as e:
        raise ManifestError(f"{path} is not a well-formed ONNX graph ({e}): corrupt or not ONNX") from None
    except ValueError as e:  # mmap of a special file
        raise ManifestError(f"cannot read {path}: {e}") from None


def check_external_data(model_dir: str | Path, graph_file: str, files: Mapping[str, str]) -> list[str]:
    """Refuse a graph whose external data could make onnxruntime read outside the model directory.

    Args:
        model_dir: the model directory.
        graph_file: the graph's path inside it (as the manifest names it).
        files: the manifest's ``files`` (relative path -> sha256).

    Returns:
        The external-data files the graph reads, as paths inside the model directory.

    Raises:
        ManifestError: a location that is absolute, not normalized, leaves the directory (also through a
            symlink), or is not listed in ``files``; naming the graph and the location.
    """
    model_dir = Path(model_dir)
    graph_path = model_dir / graph_file
    root = model_dir.resolve()
    used = []
    for location in dict.fromkeys(external_locations(graph_path)):
        where = f"{graph_path}: external data location {location!r}"
        if not location:
            raise ManifestError(f"{graph_path}: a tensor is marked as external data but names no location")
        p = PurePosixPath(location)
        if ("\\" in location or "\x00" in location or p.is_absolute() or ".." in p.parts
                or p.as_posix() != location or location.startswith("./")):
            raise ManifestError(f"{where} must be a relative path inside the model directory")
        name = (PurePosixPath(graph_file).parent / p).as_posix()
        target = (model_dir / name).resolve()
        if root not in target.parents:
            raise ManifestError(f"{where} resolves to {target}, outside the model directory")
        if name not in files:
            raise ManifestError(f"{where}: {name} is not listed with a sha256 in the manifest's files")
        used.append(name)
    return used


def graph_digest(model_dir: str | Path, graph_file: str, files: Mapping[str, str]) -> str | None:
    """What identifies a graph's contents for the caches keyed by it (onnxruntime's optimized graph, TensorRT
    EP engines): its sha256, or where it reads external data, a sha256 over its own and every external file's
    (new weights in an unchanged ``.onnx`` are a different graph). None when the graph is not listed."""
    digest = files.get(graph_file)
    if digest is None:
        return None
    used = check_external_data(model_dir, graph_file, files)
    if not used:
        return digest
    parts = [digest] + [f"{name}:{files[name]}" for name in sorted(used)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()
