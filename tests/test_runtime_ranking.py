"""runtime.ranking: ``auto`` orders the CPU backends (onnxruntime, OpenVINO) by a measured warm-up, cached per
graph sha256, CPU and versions, and logs the choice and why.

The suite runs with ``VDEPLOY_AUTO_MEASURE=0`` (tests/conftest.py: no timing decides another test); these tests
turn it on. One test measures for real (no speed is asserted: whichever is faster must be the one chosen);
the others give ``measure`` fixed numbers so the order they check does not depend on this machine's load.
"""

from __future__ import annotations

import json
import logging

import pytest
from export_fixtures import exported_model  # noqa: F401  (pytest fixture)

from vdeploy.runtime import Pipeline, ranking
from vdeploy.runtime.backends import BackendOptions, auto_order
from vdeploy.runtime.manifest import load as load_manifest

NAMES = {"cpu": "onnxruntime-cpu", "openvino": "openvino-cpu"}


@pytest.fixture
def measuring(tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    monkeypatch.setenv("VDEPLOY_AUTO_MEASURE", "1")
    monkeypatch.setenv("VDEPLOY_CACHE", str(tmp_path))
    return tmp_path


def decisions(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "first among the CPU backends" in r.getMessage()]


def test_auto_measures_once_picks_the_faster_and_reads_the_cache_after(exported_model, measuring, caplog,
                                                                       monkeypatch):
    with caplog.at_level(logging.INFO, logger="vdeploy.runtime"):
        pipe = Pipeline.from_dir(exported_model.dir, threads=1)
    (why,) = decisions(caplog)
    (cached,) = (measuring / "ranking").glob("*.json")
    data = json.loads(cached.read_text())
    ms = data["ms"]
    assert set(ms) == {"cpu", "openvino"} and all(isinstance(v, float) and v > 0 for v in ms.values()), ms
    fastest = min(ms, key=ms.get)
    assert pipe.backend_name == NAMES[fastest]
    assert why.startswith(f"auto: {fastest} first") and "measured now" in why and str(cached) in why
    assert data["key"]["graph_sha256"] == load_manifest(exported_model.dir).files["denoiser.onnx"]
    assert data["key"]["threads"] == 1 and data["key"]["versions"]["openvino"]
    pipe.close()

    # the next load reads the cache: no measurement, same choice, said so
    monkeypatch.setattr(ranking, "measure", lambda *a, **k: pytest.fail("measured again"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vdeploy.runtime"):
        again = Pipeline.from_dir(exported_model.dir, threads=1)
    assert again.backend_name == NAMES[fastest]
    assert "(cached " in decisions(caplog)[0]
    again.close()


@pytest.mark.parametrize("ms,first", [({"cpu": 5.0, "openvino": 2.0}, "openvino"),
                                      ({"cpu": 2.0, "openvino": 5.0}, "cpu"),
                                      ({"cpu": "RuntimeError: boom", "openvino": 9.0}, "openvino")])
def test_order_follows_the_numbers_and_a_failed_backend_goes_last(exported_model, measuring, monkeypatch, ms, first):
    monkeypatch.setattr(ranking, "measure", lambda *a, **k: dict(ms))
    manifest = load_manifest(exported_model.dir, verify=False)
    candidates, _ = auto_order(manifest, BackendOptions(threads=1), exported_model.dir)
    assert candidates[0] == first and set(candidates) == {"cpu", "openvino"}


def test_the_key_covers_graph_threads_versions_and_a_bad_cache_file_is_measured_again(exported_model, measuring,
                                                                                     monkeypatch):
    calls = []
    monkeypatch.setattr(ranking, "measure", lambda names, *a, **k: calls.append(1) or {"cpu": 1.0, "openvino": 2.0})
    manifest = load_manifest(exported_model.dir, verify=False)
    order = lambda **kw: auto_order(manifest, BackendOptions(**kw), exported_model.dir)[0]  # noqa: E731
    assert order(threads=1)[0] == "cpu" and len(calls) == 1
    order(threads=1)
    assert len(calls) == 1  # cached
    order(threads=2)
    assert len(calls) == 2  # another thread count: another entry
    real = ranking.library_versions
    monkeypatch.setattr(ranking, "library_versions", lambda names: {**real(names), "openvino": "0.0-other"})
    order(threads=1)
    assert len(calls) == 3  # another OpenVINO version: measured again
    monkeypatch.setattr(ranking, "library_versions", real)
    for path in (measuring / "ranking").glob("*.json"):
        path.write_text("{not json")
    order(threads=1)
    assert len(calls) == 4  # unreadable: measured again, and rewritten
    order(threads=1)
    assert len(calls) == 4


def test_no_measurement_when_turned_off_or_a_single_cpu_candidate(exported_model, measuring, monkeypatch, caplog):
    monkeypatch.setattr(ranking, "measure", lambda *a, **k: pytest.fail("measured"))
    manifest = load_manifest(exported_model.dir, verify=False)
    with caplog.at_level(logging.INFO, logger="vdeploy.runtime"):
        # fp16 runs on onnxruntime alone, bf16 on OpenVINO alone: nothing to compare
        assert auto_order(manifest, BackendOptions(precision="fp16"), exported_model.dir)[0][-1] == "cpu"
        monkeypatch.setenv("VDEPLOY_AUTO_MEASURE", "0")
        candidates, _ = auto_order(manifest, BackendOptions(), exported_model.dir)
    assert candidates.index("cpu") < candidates.index("openvino")  # the table's order
    assert not decisions(caplog) and not (measuring / "ranking").exists()


def test_warmup_feeds_are_batch_one_at_the_model_size(exported_model):
    manifest = load_manifest(exported_model.dir, verify=False)
    feeds = ranking.warmup_feeds(manifest.graphs["denoiser"], manifest.video_shape)
    assert {k: (v.shape, v.dtype.name) for k, v in feeds.items()} == {
        "x": ((1, 3, 4, 16, 16), "float32"), "t": ((1,), "int64"), "cond": ((1, 6), "float32")}
