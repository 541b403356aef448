"""The report: JSON entries per row and the headline ratios, the targets, the markdown, the plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TARGETS = {  # issue 5, CPU, small preset, batch 1
    "ort_speedup_vs_torch": (">=", 1.5),
    "loop_overhead_pct": ("<", 1.0),
    "dpmpp25_speedup_vs_seed1000": (">=", 40.0),
    "cold_start_speedup": (">=", 5.0),
}


def _fastest(by: dict, names) -> str | None:
    present = [n for n in names if n in by]
    return min(present, key=lambda n: by[n].times_ms["1"]["median"]) if present else None


def summarize(rows, flops: dict | None, peak: dict | None) -> tuple[dict, dict, str | None, str | None]:
    """``(results, speedups, torch baseline, fastest shipped CPU row)``: the JSON entry of every row and
    the headline: torch eager against the fastest shipped runtime row on the same device."""
    by = {r.name: r for r in rows if r.status == "ok" and "1" in r.times_ms}
    baseline = next((n for n in ("torch-seed", "torch") if n in by), None)
    results = {}
    for r in rows:
        entry = {
            "family": r.family,
            "description": r.description,
            "backend": r.backend,
            "precision": r.precision,
            "device": r.device,
            "status": r.status,
            "per_call_ms": r.times_ms,
            "setup_s": round(r.setup_s, 3),
            "first_call_s": r.first_call_s,
            "denoiser_evals_per_call": r.work_factor,
        }
        if r.flavour:
            entry["flavour"] = r.flavour
        if r.error:
            entry["error"] = r.error
        entry.update(r.extra)
        if r.status == "ok" and baseline and "1" in r.times_ms:
            entry["speedup_vs_torch_eager_b1"] = round(
                by[baseline].times_ms["1"]["median"] * r.work_factor / r.times_ms["1"]["median"], 3)
        if flops and r.times_ms:
            entry["gflops_per_s"] = {
                batch: round(flops["per_call"][batch] * r.work_factor / (t["median"] / 1e3) / 1e9, 2)
                for batch, t in r.times_ms.items() if batch in flops["per_call"]
            }
            if peak:
                entry["pct_of_matmul_peak"] = {
                    batch: round(100 * g / peak["peak_gflops"], 1) for batch, g in entry["gflops_per_s"].items()
                }
        results[r.name] = entry
    shipped = [n for n, r in by.items() if r.shipped]
    best_cpu = _fastest(by, [n for n in shipped if by[n].device == "cpu"])
    on_gpu = baseline is not None and by[baseline].device == "cuda"
    best = _fastest(by, [n for n in shipped if by[n].device == "cuda"]) if on_gpu else best_cpu
    speedups = {}
    if baseline and best:
        speedups = {
            "baseline": baseline,
            "runtime": best,
            "b1": round(by[baseline].times_ms["1"]["median"] / by[best].times_ms["1"]["median"], 3),
        }
        if "4" in by[baseline].times_ms and "4" in by[best].times_ms:
            speedups["b4"] = round(by[baseline].times_ms["4"]["median"] / by[best].times_ms["4"]["median"], 3)
        if "torch" in by and baseline != "torch":
            speedups["vs_vdeploy_torch_b1"] = round(
                by["torch"].times_ms["1"]["median"] / by[best].times_ms["1"]["median"], 3)
    return results, speedups, baseline, best_cpu


def evaluate_targets(report: dict) -> dict:
    measured = {
        "ort_speedup_vs_torch": report.get("ort_speedup_vs_torch"),
        "loop_overhead_pct": report.get("loop_overhead_pct"),
        "dpmpp25_speedup_vs_seed1000": (report.get("sampling") or {}).get("dpmpp_speedup_vs_seed_1000"),
        "cold_start_speedup": (report.get("cold_start") or {}).get("speedup"),
    }
    out = {}
    for key, (op, target) in TARGETS.items():
        value = measured[key]
        met = None if value is None else (value >= target if op == ">=" else value < target)
        out[key] = {"target": f"{op} {target:g}", "measured": value, "met": met}
    return out


# ---------------------------------------------------------------------------------------- markdown --


def _psnr(value) -> str:
    return "inf" if value is None else f"{value:.1f}"


def fmt_ms(entry: dict | None) -> str:
    return "–" if not entry else f"{entry['median']:.1f} ({entry['min']:.1f})"


def _per_call(report: dict) -> list[str]:
    c = report["config"]
    batches = [str(b) for b in c["batches"]]
    rounds = c.get("rounds") or {}
    counts = sorted({int(n) for n in rounds.values()}) or [c["repeats"]]
    if len(counts) == 1:
        of = f"{counts[0]}"
    else:
        of = ", ".join(f"{rounds.get(b, rounds.get(int(b)))} at batch {b}" for b in batches)
    lines = [f"Per-call denoiser latency, ms: median (min) of {of} interleaved rounds after "
             f"{c['warmup']} warm-up calls; error: max abs difference from torch fp32 eager on the same input.",
             "", "| backend | " + " | ".join(f"batch {b}" for b in batches)
             + " | vs torch eager (b1) | GFLOP/s (b1) | max abs err | notes |",
             "| --- | " + " | ".join("---" for _ in batches) + " | --- | --- | --- | --- |"]
    peak = (report.get("flops") or {}).get("matmul_peak", {}).get("peak_gflops")
    for name, r in report["results"].items():
        if r["status"] != "ok":
            lines.append(f"| {name} | " + " | ".join("–" for _ in batches)
                         + f" | – | – | – | {r['status']}: {r.get('error', '')} |")
            continue
        g = (r.get("gflops_per_s") or {}).get("1")
        gtxt = "–" if g is None else (f"{g:.1f}" + (f" ({100 * g / peak:.0f}%)" if peak else ""))
        sp = r.get("speedup_vs_torch_eager_b1")
        err = r.get("max_abs_err_vs_torch")
        notes = [] if r["precision"] == "fp32" else [r["precision"]]
        if r["denoiser_evals_per_call"] > 1:
            notes.append(f"{r['denoiser_evals_per_call']} evals/call")
        if name.startswith("torch-compile") and r["first_call_s"]:
            first = next(iter(r["first_call_s"].values()))
            notes.append(f"compile + first call {first:.0f} s (inductor cache may be warm)")
        lines.append(f"| {name} | " + " | ".join(fmt_ms(r["per_call_ms"].get(b)) for b in batches)
                     + f" | {'–' if sp is None else f'{sp:.2f}x'} | {gtxt} | {'–' if err is None else f'{err:.2g}'}"
                     f" | {'; '.join(notes)} |")
    return lines


def _sampling(s: dict) -> list[str]:
    star = "*" if s["extrapolated"] else ""
    return [
        "", f"Sampling, batch 1 ({s['note']}; median of {s['rounds']} interleaved rounds; runtime backend "
            f"{s['runtime_backend']}):", "",
        "| run | steps | total s | per step ms | outside the denoiser |",
        "| --- | --- | --- | --- | --- |",
        f"| seed p_sample_loop (torch) | {s['timesteps']} | {s['seed_ddpm']['total_s']:.1f}{star} | "
        f"{s['seed_ddpm']['per_step_ms']:.1f} | – |",
        f"| runtime ddpm | {s['timesteps']} | {s['runtime_ddpm']['total_s']:.1f}{star} | "
        f"{s['runtime_ddpm']['per_step_ms']:.1f} | {s['runtime_ddpm']['loop_overhead_pct']:.2f}% |",
        f"| runtime dpmpp | {s['runtime_dpmpp']['steps']} | {s['runtime_dpmpp']['total_s']:.2f} | "
        f"{s['runtime_dpmpp']['per_step_ms']:.1f} | {s['runtime_dpmpp']['loop_overhead_pct']:.2f}% |",
        "",
        (f"\\* extrapolated from {s['measured_steps']} measured steps. " if s["extrapolated"] else "")
        + f"ddpm at equal steps: runtime {s['ddpm_speedup_equal_steps']:.2f}x faster; dpmpp "
          f"{s['runtime_dpmpp']['steps']} steps vs the seed's {s['timesteps']}-step sampler: "
          f"{s['dpmpp_speedup_vs_seed_1000']:.1f}x.",
    ]


def _cold_start(cs: dict) -> list[str]:
    def line(label, r):
        return (f"| {label} | {r['to_loaded_s']:.2f} | {r['import_s']:.2f} | {r['load_s']:.2f} | "
                f"{r['rss_loaded_mib']:.0f} | {r['first_call_s']:.2f} | {r['peak_rss_mib']:.0f} |")

    first = cs.get("runtime_first_load")
    lines = ["", f"Cold start (fresh process, median of {cs['repeats']}):", "",
             "| process | spawn → loaded s | import s | load s | RSS at load MiB | + first call s | peak RSS MiB |",
             "| --- | --- | --- | --- | --- | --- | --- |",
             line("runtime: import vdeploy.runtime + Pipeline.from_dir", cs["runtime"]),
             line("torch: import torch + load checkpoint", cs["torch"])]
    if first:
        lines.append(line("runtime, first load on this machine (graph cache empty)", first))
    for name, r in (cs.get("backends") or {}).items():  # every CPU backend, cached and first load
        lines.append(line(f"backend {name}: cached (to first call {r['to_first_call_s']:.2f} s, "
                          f"{r['speedup_to_first_call']:.1f}x torch's)", r))
        if r.get("first_load"):
            f = r["first_load"]
            lines.append(line(f"backend {name}: first load (to first call {f['to_first_call_s']:.2f} s)", f))
    lines += ["", f"Runtime cold start {cs['speedup']:.1f}x faster than torch, {cs['rss_ratio']:.1f}x less memory "
                  f"at load" + (f"; its first load on a machine {first['speedup']:.1f}x." if first else ".")]
    return lines


def _quality(q: dict) -> list[str]:
    cond = q.get("conditioning")
    cond = ", ".join(f"{k} {v!r}" for k, v in cond.items()) if isinstance(cond, dict) else cond
    lines = ["", f"Quality at fewer steps: PSNR dB against {q['reference']} from the same noise ({q['model']}; "
                 f"{cond}):", ""]
    if q.get("skipped"):
        return lines + [f"skipped: {q['skipped']}"]
    steps = q["steps"]
    psnr = {(r["sampler"], r["spacing"], r["steps"]): r for r in q["rows"]}
    fewest = {(f["sampler"], f["spacing"]): f["steps"] for f in q["fewest_steps"]}
    lines += ["| sampler | spacing | " + " | ".join(f"{s} steps" for s in steps)
              + f" | fewest steps ≥ {q['threshold_db']:g} dB |",
              "| --- | --- | " + " | ".join("---" for _ in steps) + " | --- |"]
    for (sampler, spacing), n in fewest.items():
        cells = []
        for s in steps:
            r = psnr.get((sampler, spacing, s))
            cells.append("–" if r is None else ("error" if r.get("error") else _psnr(r["psnr_db"])))
        lines.append(f"| {sampler} | {spacing or '–'} | " + " | ".join(cells)
                     + f" | {n if n is not None else f'> {max(steps)}' if steps else '–'} |")
    errors = sorted({r["error"] for r in q["rows"] if r.get("error")})
    if errors:
        lines.append("\nerrors: " + "; ".join(errors))
    lines.append(f"\nreference run: {q['reference_s']:.1f} s; samplers that draw noise ran with seed "
                 f"{q['noise_seed'] - 7} (ddpm is stochastic: it is not expected to reach the deterministic solution).")
    return lines


def section_table(key: str, report: dict) -> str | None:
    """The markdown of one section as soon as it has run (``key``: ``per_call`` or a section's JSON key), for
    printing while the later sections still run; None where it has no table."""
    render = {"per_call": _per_call, "sampling": lambda r: _sampling(r["sampling"]),
              "cold_start": lambda r: _cold_start(r["cold_start"]), "quality": lambda r: _quality(r["quality"])}
    if key not in render or (key != "per_call" and not report.get(key)):
        return None
    return "\n".join(render[key](report)).strip("\n") + "\n"


def markdown(report: dict) -> str:
    m, c = report["machine"], report["config"]
    model = c["model"]
    lines = [
        f"## vdeploy latency: {c['name']} (dim {model['dim']}, mults {model['dim_mults']}, {model['num_frames']} "
        f"frames, {model['image_size']} px{', cond ' + str(model['cond_dim']) if model.get('cond_dim') else ''})",
        "",
        f"{m['cpu']}, {m['physical_cores']} cores, {m['threads']} threads" + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + f"; torch {m['torch']}, onnxruntime {m['onnxruntime']}; load average {m['load_average_start']} at start, "
        f"{m.get('load_average_end')} at end.",
        "",
        "1-minute load as each section started/ended (this benchmark's own threads count): "
        + ", ".join(f"{k} {'/'.join(str(x) for x in v)}" for k, v in (report.get("load_1min") or {}).items()) + ".",
        "",
    ]
    lines += _per_call(report)
    fl = report.get("flops")
    if fl:
        peak = fl["matmul_peak"]["peak_gflops"]
        lines += ["", f"FLOPs per call: {fl['per_call'].get('1', 0) / 1e9:.2f} GFLOP at batch 1 (matmul/conv); "
                      f"this machine's measured fp32 matmul peak {peak} GFLOP/s ({fl['matmul_peak']['peak_source']}; "
                      + ", ".join(f"{k} {v}" for k, v in fl["matmul_peak"]["gflops"].items()) + ")."]
    sp = report.get("ort_speedup_detail") or {}
    if sp:
        lines += ["", f"runtime ({sp['runtime']}) vs torch eager ({sp['baseline']}): {sp['b1']:.2f}x at batch 1"
                      + (f", {sp['b4']:.2f}x at batch 4" if "b4" in sp else "")
                      + (f"; vs vdeploy's torch model {sp['vs_vdeploy_torch_b1']:.2f}x" if "vs_vdeploy_torch_b1" in sp
                         else "") + "."]
    if report.get("sampling"):
        lines += _sampling(report["sampling"])
    if report.get("cold_start"):
        lines += _cold_start(report["cold_start"])
    if report.get("quality"):
        lines += _quality(report["quality"])
    tg = report.get("targets")
    if tg:
        lines += ["", "| target (CPU, small, batch 1) | wanted | measured | |", "| --- | --- | --- | --- |"]
        for key, t in tg.items():
            mark = "–" if t["met"] is None else ("met" if t["met"] else "MISSED")
            lines.append(f"| {key} | {t['target']} | {'–' if t['measured'] is None else t['measured']} | {mark} |")
    prof = report.get("profile")
    if prof:
        lines += ["", f"onnxruntime profile of {prof['graph']} ({prof['row']}, batch 1): by op "
                      + ", ".join(f"{k} {100 * v:.0f}%" for k, v in list(prof["by_op"].items())[:8])
                      + "; by part " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in prof["by_part"].items()) + "."]
    for note in report.get("notes", []):
        lines.append(f"\nNote: {note}")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------- plot --


def plot(report: dict, path: Path) -> str | None:
    """A bar chart of per-call latency (and the sampling runs); returns why not when it cannot be drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'vdeploy[dev]'): no plot written"
    ok = {n: r for n, r in report["results"].items() if r["status"] == "ok" and r["per_call_ms"]}
    s = report.get("sampling")
    fig, axes = plt.subplots(1, 2 if s else 1, figsize=(13 if s else 8, 4.8), squeeze=False)
    ax = axes[0][0]
    names = list(ok)
    batches = sorted({b for r in ok.values() for b in r["per_call_ms"]}, key=int)
    width = 0.8 / max(len(batches), 1)
    for i, batch in enumerate(batches):
        vals = [ok[n]["per_call_ms"].get(batch, {}).get("median", 0) for n in names]
        ax.bar(np.arange(len(names)) + i * width, vals, width, label=f"batch {batch}")
    ax.set_xticks(np.arange(len(names)) + width * (len(batches) - 1) / 2)
    ax.set_xticklabels(names, rotation=35, ha="right")
    ax.set_ylabel("ms per denoiser call (median)")
    ax.set_title(f"{report['config']['name']}: per-call latency")
    ax.legend()
    if s:
        ax = axes[0][1]
        labels = [f"seed ddpm {s['timesteps']}", f"runtime ddpm {s['timesteps']}",
                  f"runtime dpmpp {s['runtime_dpmpp']['steps']}"]
        vals = [s["seed_ddpm"]["total_s"], s["runtime_ddpm"]["total_s"], s["runtime_dpmpp"]["total_s"]]
        ax.bar(labels, vals, color=["tab:gray", "tab:blue", "tab:green"])
        ax.set_yscale("log")
        ax.set_ylabel("seconds per video (log)" + (" *extrapolated" if s["extrapolated"] else ""))
        ax.set_title("sampling, batch 1")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
