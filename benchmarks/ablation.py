#!/usr/bin/env python
"""The issue-22 ablation: training arms at the demo's recipe and budget, and guidance settings at sampling time,
all measured by ``benchmarks/frame_conditioning.py`` on the same held-out clips and seeds.

    python benchmarks/ablation.py --runs /tmp/abl data                      # make demo's training data
    python benchmarks/ablation.py --runs /tmp/abl train eps_none v_minsnr --jobs 2
    python benchmarks/ablation.py --runs /tmp/abl measure eps_none v_minsnr  # guidance 2, no rescale
    python benchmarks/ablation.py --runs /tmp/abl measure v_minsnr --scales 1,2,4 --rescales 0,0.7 --quick
    python benchmarks/ablation.py --runs /tmp/abl table --md /tmp/abl/ablation.md

* ``data``: ``vdeploy data synth RUNS/data --num 512 --frames 8 --size 16 --seed 0`` (``make demo``'s).
* ``train ARM...``: per arm, ``vdeploy train`` with ``make demo``'s flags (``DEMO_TRAIN``) and the arm's config
  (``ARMS``: ``ARM_BASE`` plus its keys and flags; ``--arm NAME=JSON`` adds one), then ``vdeploy export --cfg``;
  wall time, threads and load average into ``RUNS/ARM/train_time.json``. ``--jobs 2`` trains two arms at once,
  each on ``cores / jobs`` threads (on 2 cores: faster overall than one after another on 2 threads each).
* ``measure ARM...``: ``frame_conditioning.py`` on ``RUNS/ARM/model`` per guidance scale x CFG rescale into
  ``RUNS/ARM/fc_s{scale}_r{rescale}.json`` (the full run: adherence with dpmpp and ddpm, continuation through
  ``vdeploy sample --init`` with every sampler, the methods with ddim; ``--quick``: dpmpp only, no resampling).
* ``cosines``: how alike the pooled vectors of "a red circle moving left/right/up/down" are, raw and through
  each ``text_standardize`` map fitted on ``RUNS/data``'s captions.
* ``probe ARM... [--timesteps 99,60]``: each trained arm's x0 prediction at the first sampling step (or the steps
  given) for four training captions (where its object stands in the first and the last frame, and how far the
  predictions for "left" and "right", "up" and "down" are apart): does the caption's sense of motion reach it?
* ``table``: one JSON per arm (``RUNS/ARM/arm.json``: its config, training time and every measurement) and a
  markdown table over every arm and setting measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
DATA_ARGS = ["--num", "512", "--frames", "8", "--size", "16", "--seed", "0"]
# every arm's training flags (less --config, which the arm gives); make demo's are these plus its arm's
# (DEMO_ARM), and tests/test_ablation.py holds them and the demo preset to the Makefile's
DEMO_TRAIN = ["--frame-conditioning", "--overwrite", "--steps", "3000", "--save-every", "3000", "--batch-size", "8",
              "--lr", "2e-3", "--ema-start", "100", "--ema-every", "1", "--ema-decay", "0.99", "--text-encoder",
              "default", "--cond-scale", "2"]


@dataclass(frozen=True)
class Arm:
    """A training arm: the model-config keys over the ``demo`` preset, and training flags over ``DEMO_TRAIN``."""

    summary: str
    config: dict = field(default_factory=dict)
    flags: tuple = ()


EPS, V = {"prediction_type": "eps"}, {"prediction_type": "v"}
NONE, MIN_SNR = {"loss_weighting": "none"}, {"loss_weighting": "min_snr"}
TOKENS = {"text_cross_attention": True}
STD, WHITEN = {"text_standardize": "std"}, {"text_standardize": "whiten"}
FRAME_POS = {"frame_position": True}
FRAME_FILM = {"frame_film": True}
ARMS: dict[str, Arm] = {
    "eps_none": Arm("eps, plain loss (the seed's; the demo before issue 22)", {**EPS, **NONE}),
    "v_none": Arm("v-prediction, plain loss", {**V, **NONE}),
    "v_minsnr": Arm("v-prediction, Min-SNR-5", {**V, **MIN_SNR}),
    "eps_minsnr": Arm("eps, Min-SNR-5", {**EPS, **MIN_SNR}),
    "v_minsnr_xattn": Arm("v-prediction, Min-SNR-5, token cross-attention", {**V, **MIN_SNR, **TOKENS}),
    "eps_xattn": Arm("eps, plain loss, token cross-attention", {**EPS, **NONE, **TOKENS}),
    "v_minsnr_gen70": Arm("v-prediction, Min-SNR-5, masks 0.7/0.2/0.1 (more text-only generation)",
                          {**V, **MIN_SNR}, ("--mask-probs", "0.7,0.2,0.1")),
    "v_minsnr_whiten": Arm("v-prediction, Min-SNR-5, caption vectors PCA-whitened over the training captions",
                           {**V, **MIN_SNR, **WHITEN}),
    "v_minsnr_std": Arm("v-prediction, Min-SNR-5, caption vectors centred, each dimension scaled to unit spread",
                        {**V, **MIN_SNR, **STD}),
    "v_minsnr_l2": Arm("v-prediction, Min-SNR-5, squared-error loss (the seed's loss_type l1 otherwise)",
                       {**V, **MIN_SNR, "loss_type": "l2"}),
    "v_l2": Arm("v-prediction, plain loss, squared error", {**V, **NONE, "loss_type": "l2"}),
    "v_minsnr_framepos": Arm("v-prediction, Min-SNR-5, each frame's absolute index added to the stem's features",
                             {**V, **MIN_SNR, **FRAME_POS}),
    "v_minsnr_framefilm": Arm("v-prediction, Min-SNR-5, every ResNet block's FiLM per frame (caption x frame index)",
                              {**V, **MIN_SNR, **FRAME_FILM}),
    "v_l2_framefilm": Arm("v-prediction, plain loss, squared error, FiLM per frame", {**V, **NONE, "loss_type": "l2",
                                                                                     **FRAME_FILM}),
    "v_minsnr_hn30": Arm("v-prediction, Min-SNR-5, 30% of the clips caption-only at SNR < 0.01",
                         {**V, **MIN_SNR}, ("--high-noise-share", "0.3")),
    "eps_hn30": Arm("eps, plain loss (the seed's), 30% of the clips caption-only at SNR < 0.01", {**EPS, **NONE},
                    ("--high-noise-share", "0.3")),
    "v_l2_hn30": Arm("v-prediction, plain loss, squared error, 30% of the clips caption-only at SNR < 0.01",
                     {**V, **NONE, "loss_type": "l2"}, ("--high-noise-share", "0.3")),
    "v_l2_std_hn50": Arm("v-prediction, plain loss, squared error, caption vectors standardized, 50% of the clips "
                         "caption-only at SNR < 0.01", {**V, **NONE, "loss_type": "l2", **STD},
                         ("--high-noise-share", "0.5")),
    "v_l2_std_hn50_seed1": Arm("v_l2_std_hn50 with --seed 1 (other weights, data order and noise)",
                               {**V, **NONE, "loss_type": "l2", **STD}, ("--high-noise-share", "0.5", "--seed", "1")),
    "v_l2_std_hn50_seed2": Arm("v_l2_std_hn50 with --seed 2", {**V, **NONE, "loss_type": "l2", **STD},
                               ("--high-noise-share", "0.5", "--seed", "2")),
    "v_l2_hn50": Arm("v-prediction, plain loss, squared error, 50% of the clips caption-only at SNR < 0.01",
                     {**V, **NONE, "loss_type": "l2"}, ("--high-noise-share", "0.5")),
}


DEMO_ARM = "v_l2_std_hn50"  # what make demo trains: the demo preset is arm_config(ARMS[DEMO_ARM])


def arm_config(arm: Arm) -> dict:
    """The arm's model config: tiny at 16 px (the demo's network) plus the arm's keys, the rest at their defaults
    (so an arm means the same whatever the demo preset becomes)."""
    from vdeploy.config import PRESETS

    return {**PRESETS["tiny"], "image_size": 16, **arm.config}


def run(cmd, **kw) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def make_data(runs: Path) -> Path:
    data = runs / "data"
    if len(list(data.glob("*.gif"))) != 512:
        run([BIN / "vdeploy", "data", "synth", data, *DATA_ARGS, "--overwrite"])
    return data


def train(runs: Path, names: list[str], jobs: int, nice: int, steps: int | None) -> None:
    data = make_data(runs)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    recipe = list(DEMO_TRAIN)
    if steps is not None:
        recipe[recipe.index("--steps") + 1] = recipe[recipe.index("--save-every") + 1] = str(steps)
    pending, active = list(names), []
    while pending or active:
        while pending and len(active) < jobs:
            name = pending.pop(0)
            out = runs / name
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(arm_config(ARMS[name])))
            cmd = ["nice", "-n", str(nice), BIN / "vdeploy", "train", "--data", data, "--results", out / "results",
                   "--config", out / "config.json", *recipe, *ARMS[name].flags]
            print("+", " ".join(map(str, cmd)), flush=True)
            log = open(out / "train.log", "w")
            active.append((name, subprocess.Popen([str(c) for c in cmd], env=env, stdout=log, stderr=log),
                           time.time(), log))
        time.sleep(2)
        for item in list(active):
            name, proc, t0, log = item
            if proc.poll() is None:
                continue
            active.remove(item)
            log.close()
            if proc.returncode:
                raise SystemExit(f"training {name} failed (exit {proc.returncode}): see {runs / name / 'train.log'}")
            (runs / name / "train_time.json").write_text(json.dumps({
                "train_seconds": round(time.time() - t0, 1), "threads": threads, "jobs": jobs,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
                "load_at_end": open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else None,
                "recipe": recipe + list(ARMS[name].flags)}))
            shutil.rmtree(runs / name / "model", ignore_errors=True)
            run(["nice", "-n", str(nice), BIN / "vdeploy", "export", "--ckpt", runs / name / "results" / "model-last.pt",
                 "--out", runs / name / "model", "--cfg"], stdout=subprocess.DEVNULL)


def measure(runs: Path, names: list[str], scales: list[float], rescales: list[float], quick: bool,
            threads: int | None) -> None:
    for name in names:
        for scale in scales:
            for rescale in rescales:
                if scale == 1 and rescale:
                    continue  # no guidance: nothing to rescale
                out = runs / name / f"fc_s{scale:g}_r{rescale:g}.json"
                args = ["--model", runs / name / "model", "--cond-scale", scale, "--rescale", rescale,
                        "--sampler", "ddim", "--json", out, "--md", out.with_suffix(".md")]
                args += (["--samplers", "dpmpp", "--init-samplers", "dpmpp", "--resample", "0"] if quick
                         else ["--samplers", "dpmpp,ddpm"])
                if threads:
                    args += ["--threads", threads]
                run([sys.executable, HERE / "frame_conditioning.py", *args], stdout=subprocess.DEVNULL)


def collect(runs: Path) -> list[dict]:
    """One record per arm directory (``arm.json`` written beside its measurements), in ``ARMS`` order."""
    records = []
    known = list(ARMS)
    dirs = sorted((d for d in runs.iterdir() if (d / "model").is_dir() or list(d.glob("fc_*.json"))),
                  key=lambda d: (known.index(d.name) if d.name in known else len(known), d.name))
    for d in dirs:
        config = json.loads((d / "config.json").read_text()) if (d / "config.json").exists() else {}
        timing = json.loads((d / "train_time.json").read_text()) if (d / "train_time.json").exists() else {}
        measures = {p.stem: json.loads(p.read_text()) for p in sorted(d.glob("fc_s*_r*.json"))}
        record = {"arm": d.name, "summary": ARMS[d.name].summary if d.name in ARMS else "", "config": config,
                  "flags": list(ARMS[d.name].flags) if d.name in ARMS else [], "training": timing,
                  "measures": measures}
        (d / "arm.json").write_text(json.dumps(record, indent=1))
        records.append(record)
    return records


COSINE_PAIRS = (("left", "right"), ("up", "down"), ("left", "up"))


def cosines(data: Path) -> str:
    """How alike the pooled caption vectors of "a red circle moving {left, right, up, down}" are (cosine
    similarity) as the U-Net gets them: raw, and through each ``text_standardize`` map fitted on ``data``'s
    captions as training fits it (one row per clip). A markdown table."""
    import torch

    from vdeploy.data import read_caption
    from vdeploy.text import TextEncoder, fit_standardizer, standardize

    encoder = TextEncoder()
    raw = encoder([read_caption(p) for p in sorted(data.glob("*.gif"))])
    probe = encoder([f"a red circle moving {d}" for d in ("left", "right", "up", "down")])
    index = {d: i for i, d in enumerate(("left", "right", "up", "down"))}
    maps = {"none": probe, **{m: standardize(probe, *fit_standardizer(raw, m)) for m in ("std", "whiten")}}
    lines = ["| caption map | " + " | ".join(f"{a} / {b}" for a, b in COSINE_PAIRS) + " |",
             "|---|" + "---|" * len(COSINE_PAIRS)]
    for name, vecs in maps.items():
        cos = [torch.nn.functional.cosine_similarity(vecs[index[a]], vecs[index[b]], dim=0).item()
               for a, b in COSINE_PAIRS]
        lines.append(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cos) + " |")
    return "\n".join(lines)


OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
PROBE_CAPTIONS = [f"a yellow square moving {d}" for d in ("left", "right", "up", "down")]  # not the benchmark's


def probe(runs: Path, names: list[str], n: int = 16, timesteps: list[int] | None = None) -> str:
    """What each arm's trained model predicts at the first sampling step: x0 from pure noise (the last timestep,
    the caption alone, no guidance, plain generation), averaged over ``n`` noises, per caption of
    :data:`PROBE_CAPTIONS`: the brightness centroid along the caption's axis in the first and the last frame (a
    model that knows the sense moves it the caption's way). The centroid of a blank prediction is the frame's
    middle, so two more columns compare the captions directly: ``x0(left) - x0(right)`` (and up - down), its mean
    absolute value and where it sits along the axis in the first and the last frame (its signed moment: ``+`` on
    the right / lower side); the training clips' means give what a model that knows the sense would show.
    ``timesteps``: noisy inputs at these steps instead of the last one (a row per arm and step). A markdown table."""
    import torch

    from vdeploy import config as vconfig
    from vdeploy.checkpoint import load_checkpoint
    from vdeploy.diffusion import GaussianDiffusion
    from vdeploy.model import Unet3D
    from vdeploy.text import TextEncoder

    def along(w, caption: str):  # w: (f, h, w) -> (f, along the caption's axis)
        return w.sum(1) if caption.endswith(("left", "right")) else w.sum(2)

    def centre(w, caption: str) -> str:  # w: (f, h, w) brightness
        profile = along(w, caption)
        pos = (profile * torch.arange(profile.shape[-1]).float()).sum(-1) / profile.sum(-1)
        return f"{pos[0]:.1f} -> {pos[-1]:.1f}"

    def apart(a, b, caption: str) -> str:  # a, b: (f, h, w) the two captions' predictions
        profile = along(a - b, caption)
        offset = torch.arange(profile.shape[-1]).float() - (profile.shape[-1] - 1) / 2
        pos = (profile * offset).sum(-1) / profile.abs().sum(-1).clamp_min(1e-9)
        return f"{(a - b).abs().mean():.3f}: {pos[0]:+.1f} -> {pos[-1]:+.1f}"

    def cells(pred: list) -> list[str]:  # pred: per caption of PROBE_CAPTIONS, (f, h, w) in [-1, 1]
        bright = [(p + 1) / 2 for p in pred]
        return ([centre(w, c) for w, c in zip(bright, PROBE_CAPTIONS)]
                + [apart(pred[0], pred[1], PROBE_CAPTIONS[0]), apart(pred[2], pred[3], PROBE_CAPTIONS[2])])

    encoder = TextEncoder()
    lines = ["| arm | step | " + " | ".join(c.split()[-1] + ": first -> last frame (px)" for c in PROBE_CAPTIONS) +
             " | left - right: mean abs; moment first -> last (px) | up - down: the same |",
             "|---|---|" + "---|" * (len(PROBE_CAPTIONS) + 2)]
    from vdeploy.data import Dataset

    ds = Dataset(make_data(runs), 16, channels=3, num_frames=8)
    clips = torch.stack([ds[i] for i in range(len(ds))]) * 2 - 1  # (n, c, f, h, w) in [-1, 1], as x0
    truth = [clips[[c.endswith(p.split()[-1]) for c in ds.captions]].mean(0).mean(0) for p in PROBE_CAPTIONS]
    lines.append("| the training clips of that direction, averaged (what the prediction would be at best) | – | " +
                 " | ".join(cells(truth)) + " |")
    for name in names:
        ckpt = load_checkpoint(runs / name / "results" / "model-last.pt")
        config = vconfig.resolve(dict(ckpt["config"]))
        diffusion = GaussianDiffusion(Unet3D(**vconfig.unet_kwargs(config)), **vconfig.diffusion_kwargs(config),
                                      text_encoder=encoder)
        diffusion.load_state_dict(ckpt["ema"])
        diffusion.eval()
        f, size = config["num_frames"], config["image_size"]
        for step in timesteps or [diffusion.num_timesteps - 1]:
            pred = []
            for caption in PROBE_CAPTIONS:
                x = torch.randn(n, config["channels"], f, size, size, generator=torch.Generator().manual_seed(1))
                t = torch.full((n,), step, dtype=torch.long)
                kw = {"frames": torch.zeros_like(x), "mask": torch.zeros(n, f)} if config["frame_conditioning"] else {}
                cond, text_kw = diffusion.text_inputs([caption] * n)  # a token model's tokens too
                with torch.no_grad():
                    out = diffusion.denoise_fn.forward_with_cond_scale(x, t, cond=cond, cond_scale=1.0, **kw,
                                                                       **text_kw)
                    x0 = diffusion.predict_start_from_output(x, t, out).clamp(-1, 1)
                pred.append(x0.mean(0).mean(0))  # mean over the noises and the channels: (f, h, w)
            lines.append(f"| {name} | {step} | " + " | ".join(cells(pred)) + " |")
    return "\n".join(lines)


def _opposite(adh: dict) -> float | None:
    """The fraction of samples that moved against the prompt's direction (the right axis, the wrong sense)."""
    if not adh.get("pairs") or "failures" not in adh:
        return None
    flipped = [r for r in adh["failures"] if r.get("direction") == OPPOSITE.get(r["prompt"].split()[-1])]
    return len(flipped) / adh["pairs"]


def _pct(x) -> str:
    return "–" if x is None else f"{x:.0%}"


def _px(row) -> str:
    return "–" if not row else f"{row['centroid_error_px']:.2f} / {row['one_object']:.0%}"


def _flag(flags: list, name: str, default: str) -> str:
    return flags[flags.index(name) + 1] if name in flags else default


def table(records: list[dict]) -> str:
    from vdeploy.runtime.pipeline import DEFAULT_SAMPLER

    lines = ["| arm | objective | loss weighting | loss | token cross-attention | caption map | high-noise share | "
             "guidance | CFG rescale | adherence | colour ok | direction ok | direction opposite | background clean | "
             "continuation, `--init` " +
             DEFAULT_SAMPLER + " (px / one object) | interpolation, trained (px / one object) | training (min) |",
             "|" + "---|" * 17]
    samplers, methods = [], []
    for r in records:
        minutes = r["training"].get("train_seconds")
        for key, m in sorted(r["measures"].items(), key=lambda kv: (kv[1]["args"]["cond_scale"],
                                                                    kv[1]["args"].get("rescale", 0))):
            a = m["args"]
            adh = m["adherence"].get(DEFAULT_SAMPLER, {})
            interp = m.get("interpolation", {})
            lines.append(
                f"| {r['arm']} | {r['config'].get('prediction_type', 'eps')} | "
                f"{r['config'].get('loss_weighting', 'none')} | {r['config'].get('loss_type', 'l1')} | "
                f"{'yes' if r['config'].get('text_cross_attention') else 'no'} | "
                f"{r['config'].get('text_standardize', 'none')} | "
                f"{_flag(r.get('flags', []), '--high-noise-share', '0')} | {a['cond_scale']:g} | "
                f"{a.get('rescale', 0):g} | "
                f"{_pct(adh.get('adherence'))} | {_pct(adh.get('color_ok'))} | {_pct(adh.get('direction_ok'))} | "
                f"{_pct(_opposite(adh))} | "
                f"{adh.get('clean', float('nan')):.2f} | {_px(m.get('init_path', {}).get(DEFAULT_SAMPLER))} | "
                f"{_px(interp.get('trained (masked conditioning)'))} | "
                f"{'–' if minutes is None else f'{minutes / 60:.1f}'} |")
    out = "\n".join(lines) + "\n"
    full = [(r, k, m) for r in records for k, m in r["measures"].items() if len(m.get("init_path", {})) > 2]
    for _, _, m in full:
        samplers += [s for s in m["init_path"] if s not in samplers]
        methods += [s for s in m["interpolation"] if s not in methods]
    if full:
        out += ("\nContinuation through `vdeploy sample --init` per sampler (px / frames showing one object), "
                "and interpolation per method, on the full runs:\n\n| arm | guidance | " +
                " | ".join([f"`--init` {s}" for s in samplers] + [f"interpolation: {m}" for m in methods]) + " |\n|" + "---|" * (2 + len(samplers) + len(methods)) + "\n")
        for r, _, m in full:
            cells = [_px(m["init_path"].get(s)) for s in samplers] + [_px(m["interpolation"].get(s)) for s in methods]
            out += f"| {r['arm']} | {m['args']['cond_scale']:g} | " + " | ".join(cells) + " |\n"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/ablation.py", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=Path, required=True, help="output folder (one sub-folder per arm)")
    p.add_argument("--arm", action="append", default=[], metavar="NAME=JSON",
                   help="an extra arm: its config keys over the demo preset, e.g. 'x={\"prediction_type\": \"v\"}'")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("data")
    t = sub.add_parser("train")
    t.add_argument("arms", nargs="+")
    t.add_argument("--jobs", type=int, default=1, help="arms trained at once (threads: cores / jobs each)")
    t.add_argument("--nice", type=int, default=5)
    t.add_argument("--steps", type=int, default=None, help="override the recipe's 3000 steps (smoke runs)")
    m = sub.add_parser("measure")
    m.add_argument("arms", nargs="+")
    m.add_argument("--scales", default="2")
    m.add_argument("--rescales", default="0")
    m.add_argument("--quick", action="store_true", help="dpmpp only (adherence and --init), no resampling rows")
    m.add_argument("--threads", type=int, default=None)
    tb = sub.add_parser("table")
    tb.add_argument("--md", type=Path)
    sub.add_parser("cosines")
    pr = sub.add_parser("probe")
    pr.add_argument("arms", nargs="+")
    pr.add_argument("--timesteps", default=None, help="comma-separated steps to probe (default: the last one)")
    a = p.parse_args(argv)
    for spec in a.arm:
        name, _, keys = spec.partition("=")
        try:
            ARMS[name] = Arm(f"extra: {keys}", json.loads(keys))
        except json.JSONDecodeError as e:
            p.error(f"--arm {spec!r}: the keys must be a JSON object ({e})")
    a.runs.mkdir(parents=True, exist_ok=True)
    if a.command == "data":
        make_data(a.runs)
    elif a.command == "train":
        unknown = [n for n in a.arms if n not in ARMS]
        if unknown:
            p.error(f"unknown arm(s) {', '.join(unknown)}; known: {', '.join(ARMS)} (or add one with --arm)")
        train(a.runs, a.arms, a.jobs, a.nice, a.steps)
    elif a.command == "measure":
        measure(a.runs, a.arms, [float(s) for s in a.scales.split(",")], [float(r) for r in a.rescales.split(",")],
                a.quick, a.threads)
    elif a.command == "cosines":
        print(cosines(make_data(a.runs)))
    elif a.command == "probe":
        print(probe(a.runs, a.arms, timesteps=[int(v) for v in a.timesteps.split(",")] if a.timesteps else None))
    else:
        text = table(collect(a.runs))
        print(text)
        if a.md:
            a.md.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
