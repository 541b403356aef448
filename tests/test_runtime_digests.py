"""runtime.digests: a file's sha256 is kept by its stat identity, so an unchanged file is not re-read on every
load, and any change to the file (in place, same size, mtime set back) is hashed again and refused."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from vdeploy.runtime import digests
from vdeploy.runtime.manifest import ManifestError, verify_files


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """Every sha256_file call counted; the user cache in tmp_path; files settle after 0.05 s (not 2 s)."""
    monkeypatch.setenv("VDEPLOY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VDEPLOY_REHASH", raising=False)
    monkeypatch.setattr(digests, "SETTLED_S", 0.05)
    calls = []
    real = digests.sha256_file

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(digests, "sha256_file", counting)
    return calls


def settled_file(path, data: bytes):
    path.write_bytes(data)
    time.sleep(0.1)  # older than SETTLED_S, and past the coarse clock tick of the write (a few ms)
    return path


def test_an_unchanged_file_is_hashed_once(counted, tmp_path):
    f = settled_file(tmp_path / "graph.onnx", os.urandom(4096))
    expected = hashlib.sha256(f.read_bytes()).hexdigest()
    assert digests.file_sha256(f) == expected and len(counted) == 1
    assert digests.file_sha256(f) == expected and len(counted) == 1  # kept: not read again
    verify_files(tmp_path, {"graph.onnx": expected})
    assert len(counted) == 1
    data, digest = digests.read_with_sha256(f)  # the OpenVINO blob's path: bytes read, digest kept
    assert data == f.read_bytes() and digest == expected


def test_a_file_changed_in_place_is_hashed_again_and_refused(counted, tmp_path):
    f = settled_file(tmp_path / "graph.onnx", os.urandom(4096))
    expected = digests.file_sha256(f)
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[100] ^= 0x01  # same size, one bit
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime set back: the ctime still moves
    assert f.stat().st_mtime_ns == st.st_mtime_ns and f.stat().st_size == st.st_size
    with pytest.raises(ManifestError, match="does not match the sha256"):
        verify_files(tmp_path, {"graph.onnx": expected})
    assert len(counted) == 2
    assert digests.read_with_sha256(f)[1] == hashlib.sha256(bytes(data)).hexdigest() != expected


def test_a_replaced_file_is_hashed_again(counted, tmp_path):
    f = settled_file(tmp_path / "graph.onnx", b"a" * 1000)
    digests.file_sha256(f)
    other = settled_file(tmp_path / "other", b"b" * 1000)
    os.replace(other, f)  # a new inode under the same name
    assert digests.file_sha256(f) == hashlib.sha256(b"b" * 1000).hexdigest() and len(counted) == 2


def test_a_fresh_file_gets_no_kept_digest_and_rehash_turns_keeping_off(counted, tmp_path, monkeypatch):
    monkeypatch.setattr(digests, "SETTLED_S", 60.0)
    f = tmp_path / "graph.onnx"
    f.write_bytes(b"just written")  # a write in the same clock tick could keep the identity: never trusted
    digests.file_sha256(f)
    digests.file_sha256(f)
    assert len(counted) == 2
    monkeypatch.setattr(digests, "SETTLED_S", 0.05)
    time.sleep(0.1)
    monkeypatch.setenv("VDEPLOY_REHASH", "1")
    digests.file_sha256(f)
    digests.file_sha256(f)
    assert len(counted) == 4 and not (tmp_path / "cache" / "digests").exists()


def test_an_unchanged_graph_is_not_scanned_for_external_data_again_and_a_changed_one_is(counted, tmp_path,
                                                                                        monkeypatch):
    """The external-data scan (it reads the whole graph) is kept beside the kept digest: a later process
    (here: the in-process memo cleared) gets the kept locations without reading the file; a file rewritten
    since is scanned again, so a location added to it is seen and refused."""
    import onnx
    from onnx import TensorProto, helper

    from vdeploy.runtime import onnx_external

    def graph(location: str | None):
        w = helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])
        if location is not None:
            w.data_location = TensorProto.EXTERNAL
            w.ClearField("float_data")
            w.external_data.add(key="location", value=location)
        g = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], initializer=[w])
        return onnx.helper.make_model(g).SerializeToString()

    f = settled_file(tmp_path / "graph.onnx", graph(None))
    assert digests.file_sha256(f)  # the manifest check keeps the digest first, as a load does
    scans = []
    real_scan = onnx_external._scan
    monkeypatch.setattr(onnx_external, "_scan", lambda p: scans.append(p) or real_scan(p))
    monkeypatch.setattr(onnx_external, "_SCANNED", {})
    assert onnx_external.external_locations(f) == [] and len(scans) == 1
    monkeypatch.setattr(onnx_external, "_SCANNED", {})  # a new process
    assert onnx_external.external_locations(f) == [] and len(scans) == 1  # kept: not read again
    assert digests.kept_fact(f, os.stat(f), onnx_external._FACT) == []

    settled_file(f, graph("../secret.bin"))  # rewritten: a new ctime, so neither digest nor scan is kept
    monkeypatch.setattr(onnx_external, "_SCANNED", {})
    assert onnx_external.external_locations(f) == ["../secret.bin"] and len(scans) == 2
    with pytest.raises(ManifestError, match="relative path inside the model directory"):
        onnx_external.check_external_data(tmp_path, "graph.onnx", {"graph.onnx": "0" * 64})
