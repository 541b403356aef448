"""runtime.manifest: the typed model-directory contract — round trip, roles, versions, hostile values."""

import json
from dataclasses import replace

import numpy as np
import pytest

from vdeploy.runtime import manifest
from vdeploy.runtime.manifest import Conditioning, Graph, Manifest, ManifestError, Schedule, TensorSpec

CONFIG = {"dim": 8, "channels": 3, "num_frames": 4, "image_size": 8, "timesteps": 10}


def tiny_manifest(cond_dim=None, **changes) -> Manifest:
    inputs = (TensorSpec("x", "float32", ("batch", 3, 4, 8, 8), "x"), TensorSpec("t", "int64", ("batch",), "t"))
    if cond_dim:
        inputs += (TensorSpec("cond", "float32", ("batch", cond_dim), "cond"),)
    graph = Graph("denoiser.onnx", inputs, (TensorSpec("eps", "float32", ("batch", 3, 4, 8, 8)),))
    return replace(Manifest(
        config={**CONFIG, "cond_dim": cond_dim},
        graphs={"denoiser": graph},
        schedule=Schedule(10, tuple(np.linspace(1e-4, 0.02, 10).tolist())),
        conditioning=Conditioning(cond_dim=cond_dim),
    ), **changes)


def written(tmp_path, m: Manifest | None = None) -> Manifest:
    (tmp_path / "denoiser.onnx").write_bytes(b"graph bytes")
    return (m or tiny_manifest()).write(tmp_path)


def edit(folder, change):
    data = json.loads((folder / "vdeploy.json").read_text())
    change(data)
    (folder / "vdeploy.json").write_text(json.dumps(data))


def test_round_trip_and_lookup_by_role(tmp_path):
    m = written(tmp_path)
    loaded = manifest.load(tmp_path)
    assert loaded == m
    assert loaded.graphs["denoiser"].input("t").name == "t"
    assert loaded.graphs["denoiser"].input("cond") is None
    assert loaded.schedule.beta_schedule == "cosine" and loaded.schedule.prediction_type == "eps"
    assert loaded.files == {"denoiser.onnx": manifest.sha256_file(tmp_path / "denoiser.onnx")}
    assert loaded.video_shape == (3, 4, 8, 8)
    assert loaded.graphs["denoiser"].dynamic_axes == {"x": {0: "batch"}, "t": {0: "batch"}, "eps": {0: "batch"}}


def test_roles_not_positions(tmp_path):
    """A graph whose inputs come in another order (and under other names) is fed by role."""
    m = tiny_manifest()
    graph = m.graphs["denoiser"]
    renamed = replace(graph, inputs=(TensorSpec("timestep", "int64", ("batch",), "t"),
                                     TensorSpec("sample", "float32", ("batch", 3, 4, 8, 8), "x")))
    loaded = written(tmp_path, replace(m, graphs={"denoiser": renamed}))
    assert manifest.load(tmp_path).graphs["denoiser"].input("x").name == "sample"
    assert loaded.graphs["denoiser"].roles == ("t", "x")


def test_version_1_directories_keep_loading(tmp_path):
    """The first release wrote no roles, `schedule.name` and `cfg`; its input names were the role names."""
    written(tmp_path)

    def to_v1(data):
        data["format_version"] = 1
        for tensor in data["graphs"]["denoiser"]["inputs"]:
            del tensor["role"]
        schedule = data["schedule"]
        schedule["name"] = schedule.pop("beta_schedule")
        del schedule["prediction_type"]

    edit(tmp_path, to_v1)
    loaded = manifest.load(tmp_path)
    assert loaded.format_version == 1 and loaded.graphs["denoiser"].roles == ("x", "t")
    assert loaded.schedule.beta_schedule == "cosine" and loaded.schedule.prediction_type == "eps"


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d.update(format_version=99), "format version 99; this vdeploy reads versions 1, 2; upgrade vdeploy"),
        (lambda d: d.update(format_version="2"), r"format version '2'.*re-export it with `vdeploy export"),
        (lambda d: d["config"].update(num_frames="4"), "config.num_frames must be a positive integer, got '4'"),
        (lambda d: d.update(graphs=[]), "graphs must be a JSON object, got list"),
        (lambda d: d["graphs"]["denoiser"].update(cfg="yes"), r"graphs.denoiser.cfg must be a JSON boolean"),
        (lambda d: d["graphs"]["denoiser"]["inputs"][0].update(role="frame"), "role is 'frame'; roles the runtime feeds"),
        (lambda d: d["graphs"]["denoiser"]["inputs"][1].update(role="x"), "give the role.s. x more than once"),
        (lambda d: d["graphs"]["denoiser"]["inputs"].pop(1), r"lack the role\(s\) t"),
        (lambda d: d["schedule"].update(prediction_type="x0"),
         "schedule.prediction_type is 'x0'; the runtime's samplers implement: eps, v"),
        (lambda d: d["schedule"].update(beta_schedule="sigmoid", betas=[]),
         "betas are missing and 'sigmoid' is not a schedule the runtime can compute"),
        (lambda d: d["schedule"]["betas"].__setitem__(3, 1.5), r"schedule.betas\[3\] must be a number in \[0, 1\)"),
        (lambda d: d["files"].update({"denoiser.onnx": "abc"}), "must be a hex sha256"),
        (lambda d: d["conditioning"].update(cond_dim=-1), "conditioning.cond_dim must be a positive integer"),
        (lambda d: d.update(engines={}), "engines must be a JSON array"),
    ],
)
def test_malformed_values_name_the_key_and_the_file(tmp_path, change, message):
    written(tmp_path)
    edit(tmp_path, change)
    with pytest.raises(ManifestError, match=message) as info:
        manifest.load(tmp_path)
    assert str(tmp_path / "vdeploy.json") in str(info.value)


@pytest.mark.parametrize("path", ["../outside.onnx", "/etc/passwd", "a/../../b.onnx", "./denoiser.onnx",
                                  "sub\\..\\..\\x.onnx", ""])
def test_paths_must_stay_inside_the_directory(tmp_path, path):
    folder = tmp_path / "model"
    folder.mkdir()
    written(folder)
    edit(folder, lambda d: d["graphs"]["denoiser"].update(file=path))
    with pytest.raises(ManifestError, match="must be a relative path inside the model directory"):
        manifest.load(folder)
    edit(folder, lambda d: d["files"].update({path: "0" * 64}))
    with pytest.raises(ManifestError, match="relative path inside the model directory"):
        manifest.load(folder)


def test_a_symlink_out_of_the_directory_is_refused_before_it_is_read(tmp_path):
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"not yours")
    folder = tmp_path / "model"
    folder.mkdir()
    written(folder)
    (folder / "denoiser.onnx").unlink()
    (folder / "denoiser.onnx").symlink_to(outside)
    edit(folder, lambda d: d["files"].update({"denoiser.onnx": manifest.sha256_file(outside)}))
    with pytest.raises(ManifestError, match="outside the model directory"):
        manifest.load(folder)


def test_referenced_but_unlisted_files_are_refused(tmp_path):
    written(tmp_path)
    edit(tmp_path, lambda d: d["files"].clear())
    with pytest.raises(ManifestError, match="references file.s. without a sha256: denoiser.onnx"):
        manifest.load(tmp_path)


def test_write_refuses_a_manifest_naming_a_missing_file(tmp_path):
    m = tiny_manifest(conditioning=Conditioning(cond_dim=4, null_embedding="null.npy"))
    with pytest.raises(ManifestError, match="references missing file.s.: null.npy"):
        written(tmp_path, m)
    assert not (tmp_path / "vdeploy.json").exists()


def test_the_top_level_precision_must_agree_with_the_graphs(tmp_path):
    """`precision` summarizes the graphs' precisions; a manifest whose summary disagrees is refused."""
    assert written(tmp_path).to_json()["precision"] == ["fp32"]
    edit(tmp_path, lambda d: d.update(precision=["fp16"]))
    with pytest.raises(ManifestError, match=r"precision is \['fp16'\] but the graphs are \['fp32'\]"):
        manifest.load(tmp_path)
