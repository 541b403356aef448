"""Smoke test of benchmarks/latency.py: it runs end to end on a tiny exported model and writes the JSON schema.

Speed is never asserted here (the build machines are shared and noisy): performance lives in the benchmark's
own report. Cold start (fresh processes importing torch) is left out to keep this to seconds.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from export_fixtures import exported_model  # noqa: F401  (pytest fixture)

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "latency.py"


def load_latency():
    spec = importlib.util.spec_from_file_location("vdeploy_bench_latency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def positive_timings(per_call: dict) -> bool:
    return bool(per_call) and all(t["median"] > 0 and 0 < t["min"] <= t["median"] for t in per_call.values())


@pytest.mark.slow
def test_bench_schema(exported_model, tmp_path):  # noqa: F811
    latency = load_latency()
    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    argv = [
        "--model-dir", str(exported_model.dir), "--work", str(tmp_path / "work"),
        "--backends", "torch-seed,torch,ort,ort-cfg,ort-guided",
        "--batches", "1,2", "--repeats", "2", "--warmup", "1", "--threads", "1",
        "--loop-steps", "2", "--sampling-rounds", "1", "--dpmpp-steps", "4",
        "--quality-steps", "2,4", "--skip", "coldstart,profile",
        "--json", str(out), "--plot", str(png), "-q",
    ]
    assert latency.main(argv) == 0
    report = json.loads(out.read_text())

    for key in ("machine", "config", "results", "ort_speedup_vs_torch", "loop_overhead_pct"):
        assert key in report, key
    assert report["machine"]["threads"] == 1
    assert report["config"]["model"]["num_frames"] == exported_model.config["num_frames"]

    results = report["results"]
    assert set(results) == {"torch-seed", "torch", "ort", "ort-cfg", "ort-guided"}
    for name, entry in results.items():
        assert entry["status"] == "ok", (name, entry.get("error"))
        assert set(entry["per_call_ms"]) == {"1", "2"}, name
        assert positive_timings(entry["per_call_ms"]), (name, entry["per_call_ms"])
    assert results["ort-cfg"]["denoiser_evals_per_call"] == 2

    assert report["ort_speedup_vs_torch"] > 0
    assert 0 <= report["loop_overhead_pct"] < 100
    sampling = report["sampling"]
    assert sampling["measured_steps"] == 2 and sampling["extrapolated"] is True
    for run in ("seed_ddpm", "runtime_ddpm", "runtime_dpmpp"):
        assert sampling[run]["total_s"] > 0 and sampling[run]["per_step_ms"] > 0
    assert report["flops"]["per_call"]["1"] > 0
    assert report["flops"]["matmul_peak"]["peak_gflops"] > 0

    quality = report["quality"]
    assert [(r["sampler"], r["steps"]) for r in quality["rows"]] == [("dpmpp", 2), ("dpmpp", 4), ("ddim", 2), ("ddim", 4)]
    assert all(r["max_abs_err"] >= 0 and r["rmse"] >= 0 for r in quality["rows"])
    assert report["cold_start"] is None  # skipped
    assert set(report["targets"]) == {"ort_speedup_vs_torch", "loop_overhead_pct", "dpmpp25_speedup_vs_seed1000",
                                      "cold_start_speedup"}
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.stat().st_size > 0


def test_bench_bad_input(tmp_path, capsys):
    latency = load_latency()
    assert latency.main(["--config", str(tmp_path / "missing.json"), "-q"]) == 2
    assert "neither a preset" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        latency.main(["--backends", "torch,nope"])
    assert e.value.code == 2
