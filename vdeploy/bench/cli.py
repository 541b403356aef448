"""The command line (``vdeploy bench``, ``python -m vdeploy.bench``, ``benchmarks/latency.py``) and the run
that calls each section in turn."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .common import log, progress


@dataclass
class Bench:
    """What the sections of one run share: the arguments, the model and its timed rows, the report so far.

    ``by`` holds the timed rows that ran (batch 1 measured), ``fastest`` the fastest shipped runtime row (None:
    none ran), ``baseline`` torch eager's row name, ``backend`` the runtime backend later sections use.
    """

    args: argparse.Namespace
    out: dict
    config: dict
    unet: object
    model: object
    work: Path
    inputs: object
    timed: list
    device: str
    threads: int
    mark: Callable[[str], None]
    by: dict = field(default_factory=dict)
    fastest: object = None
    baseline: str | None = None
    backend: str = "cpu"


@dataclass(frozen=True)
class Section:
    """One entry of the benchmark's sections table: ``run(bench)`` measures and returns the section's JSON entry
    (None where it does not apply here), stored at ``out[key]``; ``--skip NAME`` leaves it out."""

    run: Callable[[Bench], object]
    key: str
    summary: str


def _flops(b: Bench):
    from . import flops

    progress("counting FLOPs and measuring the matmul peak")
    fl = flops.count_flops(b.unet.cpu(), b.config, b.inputs, b.args.batches)
    b.unet.to(b.device)
    fl["matmul_peak"] = flops.matmul_peak(b.device, b.threads, repeats=max(1, min(5, b.args.repeats)))
    return fl


def _sampling(b: Bench):
    from . import sampling

    if not b.fastest:
        return None
    torch_ref = b.by[b.baseline] if b.baseline else b.fastest
    per_call_s = max(torch_ref.times_ms["1"]["median"], b.fastest.times_ms["1"]["median"]) / 1e3
    b.mark("sampling")
    result = sampling.measure_sampling(b.args, b.config, b.unet, b.fastest, per_call_s, b.device)
    b.mark("sampling")
    b.out["loop_overhead_pct"] = result["runtime_dpmpp"]["loop_overhead_pct"]
    return result


def _cold_start(b: Bench):
    from . import cold_start, models

    ckpt = b.model.manifest.source.get("checkpoint")
    if b.args.model_dir is None or not ckpt or not Path(ckpt).is_file():
        ckpt = models.write_checkpoint(b.unet.cpu(), b.config, b.work / "model.pt")
        b.unet.to(b.device)
    b.mark("cold_start")
    result = cold_start.measure_cold_start(b.model.path, Path(ckpt), b.args.cold_repeats, b.threads, b.backend,
                                           b.device, cold_start.other_cpu_backends(b.backend))
    b.mark("cold_start")
    return result


def _profile(b: Bench):
    from . import flops

    cpu_ort = [r for r in b.by.values() if r.backend == "cpu" and r.shipped]  # the fastest onnxruntime CPU graph
    if not cpu_ort:
        return None
    row = min(cpu_ort, key=lambda r: r.times_ms["1"]["median"])
    progress(f"onnxruntime profile of {row.name}")
    return flops.ort_profile(row, b.inputs, b.threads, runs=max(5, min(b.args.repeats, 10)))


def _quality(b: Bench):
    from . import models, quality

    q_dir, q_what, q_config = models.quality_model(b.args.ckpt, b.model, b.config, b.work)
    b.mark("quality")
    result = quality.measure_quality(b.args, q_dir, q_what, q_config, b.threads, b.backend)
    b.mark("quality")
    return result


# the sections after the per-call latency, in run order (a new one: one entry here and its function)
SECTIONS: dict[str, Section] = {
    "flops": Section(_flops, "flops", "FLOPs per call and the matmul peak (GFLOP/s and % of peak per row)"),
    "sampling": Section(_sampling, "sampling", "whole sampling runs: torch vs the fastest runtime row, loop overhead"),
    "coldstart": Section(_cold_start, "cold_start", "fresh processes: import, load, first video"),
    "profile": Section(_profile, "profile", "onnxruntime's per-operator profile of the fastest CPU graph"),
    "quality": Section(_quality, "quality", "fewer steps against a many-step reference, every sampler and spacing"),
}


def run_sections(bench: Bench, skip: set[str]) -> None:
    """Every section of ``SECTIONS`` not in ``skip``, in table order; each result at ``bench.out[key]`` (None
    for a skipped one)."""
    from .report import section_table

    for name, section in SECTIONS.items():
        bench.out[section.key] = None if name in skip else section.run(bench)
        table = None if bench.args.quiet else section_table(section.key, bench.out)
        if table:  # each table as its section finishes (the whole report again at the end)
            print(table, flush=True)


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    from .rows import row_names

    names = row_names()
    p = argparse.ArgumentParser(
        prog=prog or "benchmarks/latency.py",
        description="PyTorch vs the exported vdeploy runtime: per-call latency, sampling, loop overhead, "
        "cold start, FLOPs and quality at fewer steps.",
    )
    p.add_argument("--config", default=None, help="preset (tiny|small|base) or JSON config file [small]")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="benchmark this exported model dir instead of exporting --config (torch side: the "
                   "checkpoint its manifest names, else random weights of its config)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--plot", type=Path, default=None, help="write a bar chart PNG here (needs matplotlib)")
    p.add_argument("--backends", default="all",
                   help=f"comma list from {', '.join(names)}; 'all' = every one that applies here [all]")
    p.add_argument("--ckpt", type=Path, default=None,
                   help="trained model for the quality section: a checkpoint, a results folder or an exported "
                   "model dir (default: the random benchmark model, noted)")
    p.add_argument("--cond-dim", type=int, default=None,
                   help="benchmark a conditioned variant of the config (enables the CFG comparison)")
    p.add_argument("--batches", default="1,4", help="batch sizes for per-call latency [1,4]")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds per batch size [15]")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per backend and batch [3]")
    p.add_argument("--per-call-budget", type=float, default=None,
                   help="seconds of timed per-call rounds, all batch sizes together: fewer rounds than --repeats "
                   "(at least 5) where the warm-up calls estimate more [no budget]")
    p.add_argument("--compile-batches", type=int, default=None,
                   help="batch sizes (the first N of --batches) the torch.compile rows compile and time [all on "
                   "the CPU; 1 on CUDA, where each takes minutes]")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for torch and onnxruntime "
                   "[physical cores]")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the torch backends run; cuda also enables the GPU runtime backends [auto]")
    p.add_argument("--loop-steps", type=int, default=None,
                   help="steps timed of each 1000-step loop (extrapolated per step); default: all when that "
                   "fits ~8 s per loop, else enough for ~8 s")
    p.add_argument("--sampling-rounds", type=int, default=3, help="interleaved rounds of the sampling runs [3]")
    p.add_argument("--dpmpp-steps", type=int, default=25, help="steps of the fast sampler run [25]")
    p.add_argument("--quality-steps", default="5,8,10,15,25",
                   help="steps of every sampler and spacing compared with the reference [5,8,10,15,25]")
    p.add_argument("--quality-ref-steps", type=int, default=None,
                   help="steps of the reference DDIM (eta 0) solution [all training timesteps]")
    p.add_argument("--quality-budget", type=float, default=900.0,
                   help="skip the quality section (with a note) when its estimated time exceeds this many "
                   "seconds [900]")
    p.add_argument("--cold-repeats", type=int, default=3, help="fresh processes per side for cold start [3]")
    p.add_argument("--skip", default="", help="comma list of sections to skip: " + "; ".join(
        f"{name} ({section.summary})" for name, section in SECTIONS.items()).replace("%", "%%"))
    p.add_argument("--work", type=Path, default=None, help="folder for exports and checkpoints (kept); "
                   "default: a temporary folder, removed")
    p.add_argument("--seed", type=int, default=0, help="seeds weights, inputs and noise [0]")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
        args.quality_steps = [int(s) for s in args.quality_steps.split(",") if s.strip()]
    except ValueError as e:
        p.error(f"--batches/--quality-steps: comma lists of integers ({e})")
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = args.skip - set(SECTIONS)
    if unknown:
        p.error(f"--skip: unknown section(s) {', '.join(sorted(unknown))}")
    if args.backends == "all":
        args.backend_list = None
    else:
        args.backend_list = [b.strip() for b in args.backends.split(",") if b.strip()]
        bad = [b for b in args.backend_list if b not in names]
        if bad:
            p.error(f"--backends: unknown {', '.join(bad)} (choose from {', '.join(names)})")
    if args.model_dir is not None and (args.config is not None or args.cond_dim is not None):
        p.error("--model-dir takes its config from the model dir: leave out --config/--cond-dim")
    if args.model_dir is None and args.config is None:
        args.config = "small"
    if args.repeats < 1 or args.warmup < 0 or not args.batches or min(args.batches) < 1:
        p.error("--repeats must be >= 1, --warmup >= 0, --batches positive")
    if args.compile_batches is not None and args.compile_batches < 1:
        p.error("--compile-batches must be >= 1")
    if args.per_call_budget is not None and not args.per_call_budget > 0:
        p.error("--per-call-budget must be a positive number of seconds")
    if any(s < 1 for s in args.quality_steps):
        p.error("--quality-steps must be positive")
    return args


def run(args: argparse.Namespace) -> dict:
    import torch

    from vdeploy.runtime.platform import physical_cores

    from . import common, latency, models, report, rows

    threads = args.threads or physical_cores()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    torch.set_num_threads(threads)
    unet = None
    if args.model_dir is not None:
        from vdeploy.runtime import manifest as vmanifest

        config = dict(vmanifest.load(args.model_dir).config)
        name = args.model_dir.name
        unet, weights = models.model_dir_unet(args.model_dir, config, args.seed)
    else:
        name, config = models.resolve_config(args.config, args.cond_dim)
        weights = f"random (seed {args.seed})"
    out: dict = {"machine": common.machine_info(threads, device), "notes": []}
    out["config"] = {
        "name": name, "spec": args.config, "model": config, "batches": args.batches, "repeats": args.repeats,
        "warmup": args.warmup, "threads": threads, "device": device, "weights": weights,
        "command": shlex.join(["python", "benchmarks/latency.py", *args.argv]),
    }
    load = out["machine"]["load_average_start"]
    if load and load[0] >= 1.0:
        out["notes"].append(f"load average {load[0]} at start (>= 1 on {os.cpu_count()} CPUs): other work was "
                            "running; absolute times are inflated and ratios noisier")
    loads: dict[str, list] = {}
    out["load_1min"] = loads

    def mark(section: str) -> None:  # the 1-minute load average as a section starts and ends
        value = common.load_average()
        loads.setdefault(section, []).append(value[0] if value else None)

    wanted = set(args.backend_list or rows.row_names())
    owns_work = args.work is None
    work = Path(tempfile.mkdtemp(prefix="vdeploy-bench-")) if owns_work else args.work
    work.mkdir(parents=True, exist_ok=True)
    try:
        if unet is None:
            progress(f"{name}: exporting the benchmark model to {work}")
            unet = models.random_unet(config, args.seed)
        model, export_s = models.export_model(unet, config, work, cfg="ort-cfg" in wanted,
                                              fp16=any(n.endswith("-fp16") for n in wanted),
                                              device=device, seed=args.seed, model_dir=args.model_dir)
        models.derive_graphs(model, work, {f for f in models.DERIVED if rows.row_name("cpu", flavour=f) in wanted})
        out["notes"] += model.notes
        inputs = common.Inputs(config, args.seed)
        refs = {}
        if weights.startswith("random") and args.model_dir is not None:
            out["notes"].append("the model dir's checkpoint is not here: torch runs other (random) weights, so "
                                "no row's error against torch is measured")
        else:
            refs = rows.references(unet.cpu(), config, inputs, args.batches[0], rows.null_embedding(model))
        unet = unet.to(device)
        timed = rows.torch_rows(wanted, unet, config, inputs, device, args.compile_batches)
        runtime, skipped = rows.runtime_rows(wanted, model, inputs, threads)
        timed += runtime
        if args.backend_list is not None:
            timed += skipped  # asked for by name: listed with the reason
        elif skipped:
            out["notes"].append("not timed here: " + "; ".join(f"{r.name} ({r.error})" for r in skipped))
        for r in timed:
            if r.status != "ok":
                progress(f"{r.name}: {r.status} ({r.error})")
        mark("per_call")
        out["config"]["rounds"] = latency.measure_per_call(timed, args.batches, args.warmup, args.repeats,
                                                           args.per_call_budget)
        mark("per_call")
        out["export"] = {"seconds": round(export_s, 1),
                         "derived_graph_max_abs_err_vs_plain": latency.record_errors(timed, refs, args.batches[0]),
                         "parity_vs_torch": dict(model.manifest.parity)}

        # the row every later section uses: the fastest shipped runtime row on this device
        by = {r.name: r for r in timed if r.status == "ok" and "1" in r.times_ms}
        shipped = [r for r in by.values() if r.shipped and (device == "cuda") == (r.device == "cuda")]
        shipped = shipped or [r for r in by.values() if r.shipped]  # e.g. --device cuda, CPU-only onnxruntime
        fastest = min(shipped, key=lambda r: r.times_ms["1"]["median"]) if shipped else None
        if not args.quiet:  # the per-call table now, before the slower sections
            from .report import section_table

            results = report.summarize(timed, None, None)[0]
            print(section_table("per_call", {"config": out["config"], "results": results}), flush=True)
        out["loop_overhead_pct"] = None
        bench = Bench(args, out, config, unet, model, work, inputs, timed, device, threads, mark, by, fastest,
                      report.summarize(timed, None, None)[2], fastest.backend if fastest else "cpu")
        run_sections(bench, args.skip)
        fl = out["flops"]
        results, speedups, _, _ = report.summarize(timed, fl, fl and fl["matmul_peak"])
        out["results"] = results
        out["ort_speedup_vs_torch"] = speedups.get("b1")
        out["ort_speedup_detail"] = speedups

        out["targets"] = report.evaluate_targets(out)
        if device == "cuda":
            out["notes"].append("the targets are defined for the CPU; on a GPU they are shown for reference")
        out["machine"]["load_average_end"] = common.load_average()
        # this benchmark's own busy threads count in the load average (about `threads` while it measures)
        busy = [k for k, v in loads.items() if any(x is not None and x > threads + 1.0 for x in v)]
        if busy:
            out["notes"].append(
                f"other work ran during: {', '.join(busy)} (1-minute load above {threads + 1} = this benchmark's "
                f"{threads} threads + 1; see load_1min). torch's OpenMP threads degrade far more under CPU "
                "contention than onnxruntime's non-spinning pool (a torch step can take 10-50x its quiet time), so "
                "torch-side figures from those sections overstate the runtime's advantage: rerun on a quiet machine")
    finally:
        if owns_work:
            shutil.rmtree(work, ignore_errors=True)
    return out


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the benchmark; ``argv`` as on the command line. Returns the exit code (2: bad input)."""
    from vdeploy.config import ConfigError
    from vdeploy.export import ExportError
    from vdeploy.runtime import ManifestError
    from vdeploy.runtime.atomic import unwritable, write_text

    from .report import markdown, plot

    args = parse_args(argv, prog)
    for option, path in (("--json", args.json), ("--plot", args.plot)):  # found now, not after the whole run
        why = path is not None and unwritable(path)
        if why:
            print(f"error: {option} {path}: cannot write there ({why})", file=sys.stderr)
            return 2
    if not args.quiet:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    logging.getLogger("vdeploy.export").setLevel(logging.WARNING)
    try:
        report = run(args)
    except (ConfigError, ExportError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if not args.quiet:
            log.removeHandler(handler)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.json, json.dumps(report, indent=2, default=str) + "\n")
    if args.plot:
        why = plot(report, args.plot)
        if why:
            report["notes"].append(why)
            print(f"note: {why}", file=sys.stderr)
    print(markdown(report))
    if args.json:
        print(f"JSON: {args.json}", file=sys.stderr)
    return 0
