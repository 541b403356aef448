"""Model directories from strangers: corrupt-but-hashed files, ONNX external data pointing anywhere, path
escapes through every path field and symlinks (a FIFO proves nothing outside is opened), newer format
versions, and sessions released when tampering is found after they opened. Each ends in a ManifestError
naming the file from the API and one ``Error:`` line with exit code 2 from ``vdeploy sample``."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from reliability_support import cli_env
from runtime_fixtures import model_dir

from vdeploy.cli import main
from vdeploy.runtime import Pipeline, ort
from vdeploy.runtime import manifest as manifest_lib
from vdeploy.runtime.manifest import ManifestError
from vdeploy.runtime.onnx_external import check_external_data, external_locations

onnx = pytest.importorskip("onnx")


def edit(folder: Path, change) -> None:
    data = json.loads((folder / "vdeploy.json").read_text())
    change(data)
    (folder / "vdeploy.json").write_text(json.dumps(data))


def rehash(folder: Path, *extra: str) -> None:
    """Record the files' sha256s as they are now (and list ``extra`` files): a corrupt file that the
    sha256 check alone would let through."""
    def change(data):
        for name in [*data["files"], *extra]:
            data["files"][name] = manifest_lib.sha256_file(folder / name)
    edit(folder, change)


def sample_cli(folder: Path, tmp_path: Path, *args: str):
    return CliRunner().invoke(main, ["sample", "--model", str(folder), "--out", str(tmp_path / "out.gif"),
                                     "--steps", "2", "--backend", "cpu", "--quiet", *args])


def one_line_exit_2(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def refused(folder: Path, tmp_path: Path, *fragments: str) -> str:
    """The API raises ManifestError naming ``fragments``; the CLI says it in one line, exit 2, no output."""
    with pytest.raises(ManifestError) as info:
        Pipeline.from_dir(folder, backend="cpu")
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    one_line_exit_2(sample_cli(folder, tmp_path), *fragments)
    assert not (tmp_path / "out.gif").exists()
    return str(info.value)


# ------------------------------------------------------------------------ corrupt but hashed files --


def _npy_header_only(shape) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue() + b"\0" * 16


CORRUPT = {
    "onnx-random": ("denoiser.onnx", lambda b: np.random.default_rng(0).bytes(4096), "onnxruntime cannot load"),
    "onnx-truncated": ("denoiser.onnx", lambda b: b[: len(b) // 2], "denoiser.onnx"),
    "onnx-empty": ("denoiser.onnx", lambda b: b"", "is empty: not an ONNX graph"),
    "text-onnx-garbage": ("text_encoder/model.onnx", lambda b: b"\x08\x07" + b"garbage" * 50, "model.onnx"),
    "tokenizer-truncated": ("text_encoder/tokenizer.json", lambda b: b[: len(b) // 2], "cannot read the tokenizer"),
    "tokenizer-wrong-json": ("text_encoder/tokenizer.json", lambda b: b'{"model": 1}', "cannot read the tokenizer"),
    "tokenizer-not-utf8": ("text_encoder/tokenizer.json", lambda b: b"\xff\xfe" * 40, "cannot read the tokenizer"),
    "null-pickle": ("null_cond_emb.npy", lambda b: pickle.dumps(np.zeros(6)), "loading a pickle could run code"),
    "null-object-npy": ("null_cond_emb.npy", None, "loading a pickle could run code"),
    "null-int": ("null_cond_emb.npy", None, "has shape (6,) (int64)"),
    "null-wrong-size": ("null_cond_emb.npy", None, "has shape (7,)"),
    "null-nan": ("null_cond_emb.npy", None, "holds NaN or Inf"),
    "null-terabyte-header": ("null_cond_emb.npy", lambda b: _npy_header_only((10**12,)), "null embedding"),
    "null-npz": ("null_cond_emb.npy", None, "is an .npz archive"),
}


def _write_npy_case(path: Path, case: str) -> None:
    if case == "null-object-npy":
        np.save(path, np.array([{"a": 1}] * 6, dtype=object), allow_pickle=True)
    elif case == "null-int":
        np.save(path, np.arange(6))
    elif case == "null-wrong-size":
        np.save(path, np.zeros(7, np.float32))
    elif case == "null-nan":
        np.save(path, np.full(6, np.nan, np.float32))
    elif case == "null-npz":
        with open(path, "wb") as f:
            np.savez(f, a=np.zeros(6, np.float32))


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_but_hashed_files_are_manifest_errors_naming_the_file(tmp_path, case):
    name, corrupt, fragment = CORRUPT[case]
    folder = model_dir("cond")
    path = folder / name
    if corrupt is None:
        _write_npy_case(path, case)
    else:
        path.write_bytes(corrupt(path.read_bytes()))
    rehash(folder)
    manifest_lib.load(folder)  # the sha256s match: only parsing the file can find it
    message = refused(folder, tmp_path, fragment)
    assert str(path) in message


# ------------------------------------------------------------------------------------ external data --


def _to_external(folder: Path, graph: str = "denoiser.onnx", location: str = "denoiser.data",
                 size_threshold: int = 0) -> Path:
    """Re-save a graph with its weights in ``location`` (relative to the graph) and rewrite the manifest."""
    model = onnx.load(str(folder / graph))
    onnx.save(model, str(folder / graph), save_as_external_data=True, all_tensors_to_one_file=True,
              location=location, size_threshold=size_threshold)
    manifest_lib.load(folder, verify=False).write(folder)
    return folder / Path(graph).parent / location


def _set_locations(graph_path: Path, location: str) -> None:
    model = onnx.load(str(graph_path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(graph_path))


def test_external_data_inside_and_hashed_runs_and_matches(tmp_path):
    plain = model_dir("cond")
    reference = Pipeline.from_dir(plain, backend="cpu")(steps=2, seed=3, sampler="ddim")
    folder = model_dir("cond")
    data = _to_external(folder)
    assert external_locations(folder / "denoiser.onnx") and set(external_locations(folder / "denoiser.onnx")) == {
        "denoiser.data"}
    assert "denoiser.data" in manifest_lib.load(folder).files and data.stat().st_size > 1000
    video = Pipeline.from_dir(folder, backend="cpu")(steps=2, seed=3, sampler="ddim")
    np.testing.assert_array_equal(video, reference)


def test_the_graph_cache_hits_and_is_keyed_by_external_weights_too(tmp_path, monkeypatch):
    """The second open of a graph reads onnxruntime's cached optimized copy (no rebuild); new weights in the
    external data file behind an unchanged .onnx are a different graph, not a stale cache hit."""
    import logging

    monkeypatch.setenv("VDEPLOY_CACHE", str(tmp_path / "cache"))
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("vdeploy.runtime")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        folder = model_dir("uncond")
        data = _to_external(folder)
        first = Pipeline.from_dir(folder, backend="cpu")(steps=2, seed=0, sampler="ddim")
        assert any("cached the optimized graph" in m for m in messages), messages
        messages.clear()
        again = Pipeline.from_dir(folder, backend="cpu")(steps=2, seed=0, sampler="ddim")
        assert not any("optimized graph" in m for m in messages), messages  # a hit: nothing rebuilt
        np.testing.assert_array_equal(again, first)

        graph_bytes = (folder / "denoiser.onnx").read_bytes()
        data.write_bytes((np.frombuffer(data.read_bytes(), np.float32) * 1.5).tobytes())
        rehash(folder)
        assert (folder / "denoiser.onnx").read_bytes() == graph_bytes
        changed = Pipeline.from_dir(folder, backend="cpu")(steps=2, seed=0, sampler="ddim")
        uncached = Pipeline.from_dir(folder, backend="cpu", cache=False)(steps=2, seed=0, sampler="ddim")
        np.testing.assert_array_equal(changed, uncached)
        assert not np.array_equal(changed, first)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _opens_recorded(monkeypatch) -> list:
    """Every onnxruntime session the runtime starts, by path (none may start for a refused directory)."""
    import onnxruntime

    opened = []
    real = onnxruntime.InferenceSession

    def recording(path, *args, **kwargs):
        opened.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording)
    return opened


@pytest.mark.parametrize("where,location,fragment", [
    ("outside", "../outside.data", "must be a relative path inside the model directory"),
    ("outside-missing", "../no-such-file.data", "must be a relative path inside the model directory"),
    ("absolute", "{outside}", "must be a relative path inside the model directory"),
    ("nested", "sub/../../outside.data", "must be a relative path inside the model directory"),
    ("symlink", "link.data", "outside the model directory"),
    ("unlisted", "unlisted.data", "is not listed with a sha256"),
    ("ort-memory", "*/_ORT_MEM_ADDR_/*", "is not listed with a sha256"),
])
def test_external_data_outside_the_directory_is_refused_before_onnxruntime_opens(tmp_path, monkeypatch, where,
                                                                                 location, fragment):
    root = tmp_path / "root"
    root.mkdir()
    folder = model_dir("cond")
    data = _to_external(folder)
    outside = folder.parent / "outside.data"
    outside.write_bytes(data.read_bytes())  # a file that would load: only the check can refuse it
    if where == "symlink":
        os.symlink(outside, folder / "link.data")
    if where == "unlisted":
        (folder / "unlisted.data").write_bytes(data.read_bytes())
    _set_locations(folder / "denoiser.onnx", location.format(outside=outside))
    rehash(folder)
    opened = _opens_recorded(monkeypatch)
    message = refused(folder, tmp_path, "external data location", fragment)
    assert str(folder / "denoiser.onnx") in message
    assert opened == [], f"onnxruntime opened {opened} before the check"


def test_text_encoder_external_data_is_checked_too(tmp_path):
    folder = model_dir("cond")
    # the embedding table only: onnxruntime wants the small shape constants inline
    _to_external(folder, "text_encoder/model.onnx", "model.data", size_threshold=128)
    Pipeline.from_dir(folder, backend="cpu").encode_text("a red ball")  # inside and listed: fine
    _set_locations(folder / "text_encoder/model.onnx", "../../elsewhere.data")
    rehash(folder)
    refused(folder, tmp_path, "text_encoder/model.onnx", "external data location '../../elsewhere.data'")


def test_the_parser_finds_what_onnx_finds_in_subgraphs_and_attributes(tmp_path):
    """Tensors in an If branch and in a Constant node's attribute, saved external by onnx, are found."""
    from onnx import TensorProto, helper, numpy_helper

    const = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(300, np.float32), "cv"))
    branch = helper.make_graph([helper.make_node("Identity", ["w"], ["out"])], "branch", [],
                               [helper.make_tensor_value_info("out", TensorProto.FLOAT, [300])],
                               initializer=[numpy_helper.from_array(np.arange(300, dtype=np.float32), "w")])
    node = helper.make_node("If", ["flag"], ["y"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph([const, node], "g", [helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [300])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    saved = onnx.load(str(path), load_external_data=False)
    value = saved.graph.node[0].attribute[0].t  # the Constant's tensor: external by hand
    value.ClearField("raw_data")
    value.data_location = onnx.TensorProto.EXTERNAL
    value.external_data.add(key="location", value="const.bin")
    onnx.save(saved, str(path))
    expected = sorted(entry.value for tensor in onnx.external_data_helper._get_all_tensors(
        onnx.load(str(path), load_external_data=False)) for entry in tensor.external_data if entry.key == "location")
    assert "const.bin" in expected and expected.count("w") == 2  # both If branches
    assert sorted(external_locations(path)) == expected
    expected = sorted(set(expected))
    files = {name: "0" * 64 for name in expected}
    assert sorted(check_external_data(tmp_path, "g.onnx", files)) == expected
    with pytest.raises(ManifestError, match="is not listed with a sha256"):
        check_external_data(tmp_path, "g.onnx", dict(list(files.items())[:1]))


@pytest.mark.parametrize("data", [b"\x0a\xff\xff\xff\xff\x0f", b"\x3a\x05abc", b"\x0b" * 10, b"\x80" * 20,
                                  b"\x3a\x02\x2a\x7f"])
def test_malformed_protobuf_is_a_manifest_error(tmp_path, data):
    path = tmp_path / "g.onnx"
    path.write_bytes(data + b"location")  # the marker bytes force the full walk
    with pytest.raises(ManifestError, match="not a well-formed ONNX graph"):
        external_locations(path)


# ------------------------------------------------------------------------------------- path escapes --


def _point(field: str, value: str):
    def change(data):
        if field == "graph":
            data["graphs"]["denoiser"]["file"] = value
        elif field == "null_embedding":
            data["conditioning"]["null_embedding"] = value
        elif field == "text_encoder":
            data["conditioning"]["text_encoder"] = value
        elif field == "engine":
            data["engines"] = [{"file": value, "graph": "denoiser", "gpu": "x", "tensorrt_version": "10",
                                "precision": "fp32"}]
        data["files"][value if field != "text_encoder" else f"{value}/model.onnx"] = "0" * 64
        if field == "text_encoder":
            data["files"][f"{value}/tokenizer.json"] = "0" * 64
    return change


@pytest.mark.parametrize("field", ["graph", "null_embedding", "text_encoder", "engine", "files"])
@pytest.mark.parametrize("target", ["exists", "missing", "absolute"])
def test_path_escapes_through_every_field_are_one_line(tmp_path, field, target):
    """The message names the escape whether or not the outside file exists: nothing was read first."""
    folder = model_dir("cond")
    (folder.parent / "secret.onnx").write_bytes((folder / "denoiser.onnx").read_bytes())
    value = {"exists": "../secret.onnx", "missing": "../no-such-secret.onnx",
             "absolute": str(folder.parent / "secret.onnx")}[target]
    edit(folder, _point(field, value))
    refused(folder, tmp_path, "must be a relative path inside the model directory", value)


@pytest.mark.parametrize("name", ["denoiser.onnx", "null_cond_emb.npy", "text_encoder/tokenizer.json",
                                  "text_encoder"])
@pytest.mark.parametrize("target", ["exists", "dangling"])
def test_symlinks_out_are_refused(tmp_path, name, target):
    folder = model_dir("cond")
    outside = folder.parent / f"outside-{name.replace('/', '-')}"
    if target == "exists":
        src = folder / name
        if src.is_dir():
            shutil.copytree(src, outside)
        else:
            outside.write_bytes(src.read_bytes())
    link = folder / name
    if link.is_dir():
        shutil.rmtree(link)
    else:
        link.unlink()
    os.symlink(outside, link)
    refused(folder, tmp_path, "outside the model directory", str(outside))


def test_a_fifo_outside_is_never_opened(tmp_path):
    """A symlink to a FIFO outside and a FIFO inside listed as a file: opening either for reading would
    block forever, so a bounded subprocess proves the runtime refuses both without opening them."""
    for inside in (False, True):
        folder = model_dir("cond")
        fifo = (folder / "null_cond_emb.npy") if inside else (folder.parent / f"fifo-{folder.name}")
        (folder / "null_cond_emb.npy").unlink()
        os.mkfifo(fifo)
        if not inside:
            os.symlink(fifo, folder / "null_cond_emb.npy")
        proc = subprocess.run(
            [sys.executable, "-m", "vdeploy.cli", "sample", "--model", str(folder), "--out",
             str(tmp_path / "x.gif"), "--backend", "cpu", "--quiet", "--steps", "1"],
            capture_output=True, text=True, timeout=120, env=cli_env(),
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
        assert ("is not a regular file" if inside else "outside the model directory") in lines[0]


@pytest.mark.parametrize("version,fragment", [
    (3, "format version 3; this vdeploy reads versions 1, 2; upgrade vdeploy"),
    (10**6, "upgrade vdeploy"),
    (0, "re-export it"),
    ("2", "re-export it"),
    (None, "format version None"),
])
def test_other_format_versions_are_one_line(tmp_path, version, fragment):
    folder = model_dir("uncond")
    edit(folder, lambda d: d.update(format_version=version))
    refused(folder, tmp_path, fragment)


# --------------------------------------------------------------------- sessions let go of on refusal --


def _sessions(monkeypatch) -> list:
    backends = []
    real = ort.OrtBackend.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        backends.append(self)

    monkeypatch.setattr(ort.OrtBackend, "__init__", init)
    return backends


def test_tampering_found_after_the_sessions_opened_releases_them(monkeypatch):
    """A listed file the runtime never opens has the wrong sha256: the check finishes after the graphs and
    the text encoder opened; every session is let go of before the ManifestError."""
    folder = model_dir("cond")
    (folder / "notes.txt").write_text("hello")
    rehash(folder, "notes.txt")
    (folder / "notes.txt").write_text("tampered")
    backends = _sessions(monkeypatch)
    with pytest.raises(ManifestError, match="notes.txt does not match the sha256"):
        Pipeline.from_dir(folder, backend="cpu")
    assert len(backends) == 2  # denoiser and text encoder opened
    assert all(b.session is None for b in backends)


def test_a_corrupt_text_encoder_releases_the_denoiser(monkeypatch):
    folder = model_dir("cond")
    (folder / "text_encoder/tokenizer.json").write_text("{broken")
    rehash(folder)
    backends = _sessions(monkeypatch)
    with pytest.raises(ManifestError, match="cannot read the tokenizer"):
        Pipeline.from_dir(folder, backend="cpu")
    assert len(backends) == 1 and backends[0].session is None
