"""Smoke tests of the benchmark (``vdeploy.bench``, ``benchmarks/latency.py``, ``vdeploy bench``): it runs end
to end on a tiny exported model and writes the JSON schema; its entry points work without the checkout's
``benchmarks/`` folder; its cold-start child is a real module that never imports torch on the runtime side.

Speed is never asserted here (the build machines are shared and noisy): performance lives in the benchmark's
own report. The cold-start section (fresh processes importing torch) is left out of the end-to-end run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from export_fixtures import exported_model  # noqa: F401  (pytest fixture)

from vdeploy.bench import main
from vdeploy.runtime.samplers import SAMPLERS
from vdeploy.runtime.schedule import SPACINGS

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "latency.py"
ROWS = {"torch-seed", "torch", "ort", "ort-fp16", "ort-cfg", "ort-guided"}


def positive_timings(per_call: dict) -> bool:
    return bool(per_call) and all(t["median"] > 0 and 0 < t["min"] <= t["median"] for t in per_call.values())


@pytest.mark.slow
def test_bench_schema(exported_model, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    argv = [
        "--model-dir", str(exported_model.dir), "--work", str(tmp_path / "work"),
        "--backends", ",".join(sorted(ROWS)),
        "--batches", "1,2", "--repeats", "1", "--warmup", "1", "--threads", "1",
        "--loop-steps", "2", "--sampling-rounds", "1", "--dpmpp-steps", "4",
        "--quality-steps", "2,4", "--skip", "coldstart,profile",
        "--json", str(out), "--plot", str(png), "-q",
    ]
    assert main(argv) == 0
    markdown = capsys.readouterr().out
    report = json.loads(out.read_text())

    for key in ("machine", "config", "results", "ort_speedup_vs_torch", "loop_overhead_pct"):
        assert key in report, key
    assert report["machine"]["threads"] == 1
    assert report["config"]["model"]["num_frames"] == exported_model.config["num_frames"]

    results = report["results"]
    assert set(results) == ROWS
    for name, entry in results.items():
        assert entry["status"] == "ok", (name, entry.get("error"))
        assert set(entry["per_call_ms"]) == {"1", "2"}, name
        assert positive_timings(entry["per_call_ms"]), (name, entry["per_call_ms"])
        # every row is checked against torch fp32 on the same input: fp32 ones to round-off (the guided ones
        # against torch's guided eps), the fp16 graph within fp16's error, and the figure is printed
        limit = 5e-2 if entry["precision"] == "fp16" else 1e-4
        assert 0 <= entry["max_abs_err_vs_torch"] < limit, (name, entry["max_abs_err_vs_torch"])
    assert results["ort-cfg"]["denoiser_evals_per_call"] == 2
    assert results["ort"]["backend"] == "cpu" and results["ort-fp16"]["precision"] == "fp16"
    fp16_line = next(line for line in markdown.splitlines() if line.startswith("| ort-fp16 |"))
    assert f"{results['ort-fp16']['max_abs_err_vs_torch']:.2g}" in fp16_line and "fp16" in fp16_line.split("|")[-2]
    assert set(report["export"]["derived_graph_max_abs_err_vs_plain"]) == {"ort-fp16"}

    assert report["ort_speedup_vs_torch"] > 0
    assert 0 <= report["loop_overhead_pct"] < 100
    sampling = report["sampling"]
    assert sampling["measured_steps"] == 2 and sampling["extrapolated"] is True
    for run in ("seed_ddpm", "runtime_ddpm", "runtime_dpmpp"):
        assert sampling[run]["total_s"] > 0 and sampling[run]["per_step_ms"] > 0
    assert report["flops"]["per_call"]["1"] > 0
    assert report["flops"]["matmul_peak"]["peak_gflops"] > 0

    # quality: every sampler of the table, at every spacing of the table where it takes one, at every step count
    quality = report["quality"]
    pairs = {(name, spacing) for name, spec in SAMPLERS.items()
             for spacing in (SPACINGS if "spacing" in spec.options else (None,))}
    assert {r["sampler"] for r in quality["rows"]} == set(SAMPLERS)
    assert {(r["sampler"], r["spacing"], r["steps"]) for r in quality["rows"]} == {
        (name, spacing, steps) for name, spacing in pairs for steps in (2, 4)}
    assert {(f["sampler"], f["spacing"]) for f in quality["fewest_steps"]} == pairs
    trailing = [r for r in quality["rows"] if r["spacing"] in ("trailing", None)]
    assert all(r.get("error") is None and r["rmse"] >= 0 and r["max_abs_err"] >= 0 for r in trailing), trailing
    for f in quality["fewest_steps"]:
        psnrs = [r["psnr_db"] for r in quality["rows"]
                 if (r["sampler"], r["spacing"]) == (f["sampler"], f["spacing"]) and r.get("error") is None]
        reached = [p is None or p >= quality["threshold_db"] for p in psnrs]
        assert (f["steps"] is None) == (not any(reached)), f
    for name in SAMPLERS:
        assert f"| {name} |" in markdown, name

    assert report["cold_start"] is None  # skipped
    assert set(report["targets"]) == {"ort_speedup_vs_torch", "loop_overhead_pct", "dpmpp25_speedup_vs_seed1000",
                                      "cold_start_speedup"}
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.stat().st_size > 0


def test_bench_bad_input(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "missing.json"), "-q"]) == 2
    assert "neither a preset" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--backends", "torch,nope"])
    assert e.value.code == 2
    assert "unknown nope" in capsys.readouterr().err


def test_entry_points_need_no_checkout(tmp_path, capsys, monkeypatch):
    """``python -m vdeploy.bench`` from outside the checkout (no benchmarks/ on the path), ``vdeploy bench`` and
    the documented script all reach the installed package."""
    import vdeploy.bench

    assert Path(vdeploy.bench.__file__).parent.parts[-2:] == ("vdeploy", "bench")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import sys, runpy; assert not any('benchmarks' in p for p in sys.path), sys.path; "
            "sys.argv = ['x', '--help']; runpy.run_module('vdeploy.bench', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--quality-steps" in proc.stdout and "python -m vdeploy.bench" in proc.stdout

    from click.testing import CliRunner

    from vdeploy import cli

    result = CliRunner().invoke(cli.main, ["bench", "--help"])
    assert result.exit_code == 0, result.output
    assert "usage: vdeploy bench" in result.output and "--backends" in result.output

    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert e.value.code == 0
    assert "usage: benchmarks/latency.py" in capsys.readouterr().out


@pytest.mark.slow
def test_cold_child_runtime_side(exported_model):  # noqa: F811
    """The runtime cold-start child is a module run with ``python -m``; it loads and calls the model without
    importing torch."""
    from vdeploy.bench.cold_start import child

    timings = child("runtime", [str(exported_model.dir), "cpu", "1"])
    assert timings["torch_imported"] is False
    assert 0 < timings["import_s"] and 0 < timings["load_s"] and 0 < timings["first_call_s"]
    assert timings["to_loaded_s"] < timings["process_s"]
    assert timings["peak_rss_mib"] >= timings["rss_loaded_mib"] > 0
    with pytest.raises(RuntimeError, match="cold-start child runtime failed"):
        child("runtime", [str(exported_model.dir / "missing"), "cpu", "1"])


def test_each_section_table_renders_alone_and_cold_start_has_a_row_per_backend():
    """`make bench` prints each section's table as it finishes: section_table renders one from the report so far
    (None before the section ran); the cold-start table has a cached and a first-load row per CPU backend."""
    from vdeploy.bench.report import section_table

    timing = {"to_loaded_s": 0.3, "import_s": 0.1, "load_s": 0.2, "rss_loaded_mib": 100.0, "first_call_s": 0.1,
              "peak_rss_mib": 150.0, "to_first_call_s": 0.4}
    backends = {name: timing | {"speedup": 5.0, "speedup_to_first_call": 4.0,
                                "first_load": timing | {"speedup": 2.0, "speedup_to_first_call": 1.5}}
                for name in ("cpu", "openvino")}
    report = {"cold_start": {"runtime": timing, "torch": timing | {"to_loaded_s": 1.5}, "speedup": 5.0,
                             "speedup_to_first_call": 4.0, "rss_ratio": 3.0, "repeats": 3, "backends": backends}}
    assert section_table("quality", report) is None and section_table("sampling", report) is None
    table = section_table("cold_start", report)
    for name in ("cpu", "openvino"):
        assert f"| backend {name}: cached (to first call 0.40 s, 4.0x torch's) |" in table
        assert f"| backend {name}: first load (to first call 0.40 s) |" in table
    per_call = section_table("per_call", {"config": {"batches": [1], "repeats": 2, "warmup": 1},
                                          "results": {"ort": {"status": "failed", "error": "boom"}}})
    assert per_call.startswith("Per-call denoiser latency") and "| ort | – |" in per_call and "boom" in per_call


def test_a_per_call_budget_cuts_rounds_from_the_warm_up_estimate_and_says_so(monkeypatch):
    """`make bench` bounds the per-call section: with --per-call-budget a batch size gets --repeats rounds, or as
    many as its share of the budget holds by the warm-up calls' estimate (never fewer than MIN_ROUNDS), and the
    table states the rounds each batch size got. A fake clock: each call takes exactly its stated time."""
    from types import SimpleNamespace

    from vdeploy.bench import latency
    from vdeploy.bench.report import section_table
    from vdeploy.bench.rows import Row

    clock = [0.0]
    monkeypatch.setattr(latency, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    calls = {"slow": 0, "fast": 0}

    def make(name, seconds):
        def at(batch):
            def call():
                calls[name] += 1
                clock[0] += seconds * batch * (3 if calls[name] == 1 else 1)  # the first call is slower
                return [0.0]
            return call
        return at

    rows = [Row("slow", "runtime", "", make("slow", 2 ** -7)), Row("fast", "runtime", "", make("fast", 2 ** -10))]
    rounds = latency.measure_per_call(rows, [1, 2], warmup=2, repeats=80, budget_s=1.0)
    assert rounds == {1: 56, 2: 28}  # a 0.5 s share each: 0.5 / (9 / 1024) and 0.5 / (18 / 1024) rounds, floored
    assert rows[0].times_ms["1"]["n"] == 56 and rows[1].times_ms["2"]["n"] == 28
    assert rows[0].times_ms["2"]["median"] == 15.625  # 2 x 2^-7 s
    assert calls["slow"] == 2 + 56 + 2 + 28  # warm-up calls + timed rounds
    assert latency.measure_per_call(rows, [1], warmup=1, repeats=7, budget_s=None) == {1: 7}
    assert latency.measure_per_call(rows, [4], warmup=1, repeats=40, budget_s=1e-6) == {4: latency.MIN_ROUNDS}
    table = section_table("per_call", {"config": {"batches": [1, 2], "repeats": 40, "warmup": 2,
                                                  "rounds": {"1": 56, "2": 28}}, "results": {}})
    assert "median (min) of 56 at batch 1, 28 at batch 2 interleaved rounds" in table


def test_compiled_rows_time_the_first_compile_batches_and_autocast_rows_need_cuda():
    """`--compile-batches N`: the torch.compile rows compile and time only the first N batch sizes (each size is
    a compile of minutes on CUDA, where the default is 1); the autocast rows (compiled or not) exist on CUDA only.
    torch.compile is lazy, so opening the rows compiles nothing."""
    from vdeploy.bench import common, models, rows
    from vdeploy.bench.cli import parse_args

    config = models.resolve_config("tiny", None)[1]
    unet = models.random_unet(config, 0)
    wanted = {"torch", "torch-compile", "torch-compile-fp16", "torch-fp16"}
    got = {r.name: r for r in rows.torch_rows(wanted, unet, config, common.Inputs(config, 0), "cpu", 2)}
    assert set(got) == {"torch", "torch-compile"}  # no autocast rows off CUDA
    assert got["torch-compile"].max_batches == 2 and got["torch"].max_batches is None
    assert "first 2 batch size(s)" in got["torch-compile"].extra["note"]
    everything = rows.torch_rows({"torch-compile"}, unet, config, common.Inputs(config, 0), "cpu")
    assert everything[0].max_batches is None  # the CPU default: every batch size
    assert parse_args(["--compile-batches", "2"]).compile_batches == 2
    with pytest.raises(SystemExit):
        parse_args(["--compile-batches", "0"])
