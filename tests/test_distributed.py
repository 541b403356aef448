"""Multi-process training: 2 gloo processes on the CPU train what 1 process does with twice the batch.

The launches are the README's ("Training on several GPUs or machines"), word for word but for the
tiny config, the CPU, and 127.0.0.1 with a free port: ``torchrun --standalone`` (one node),
``torchrun --nnodes 2 --rdzv-endpoint`` (two "nodes" on this host), ``accelerate launch --multi_gpu``
(one node) and ``accelerate launch`` with the README's config file (two "machines", bf16). Every launched process carries an audit hook (a
``sitecustomize`` on PYTHONPATH) that records each write, rename, link and delete under the results
folder, so the tests see which process wrote what, how often, and that every file landed whole.

Measured here (2 cores, torch 2.13 CPU): 1 process with batch 2 against 2 processes with batch 1,
both with --grad-accum 2, Adam lr 1e-3, 2 and 4 steps: max abs weight difference 8.8e-7 (weights
~0.1-1, each step moves them ~1e-3); losses agree to 6e-8; resumed across process counts: 1.2e-7.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from vdeploy.cli import main
from vdeploy.data import synth_dataset

# resnet_groups 2: with 8 channels in 8 groups every GroupNorm group is one channel, which cancels
# the conv bias before it exactly; its gradient is then pure round-off, which Adam scales up to
# +-lr per step in either process (measured 8e-4 apart). Two channels a group keep every gradient real.
TINY = {"dim": 8, "dim_mults": [1, 2], "attn_heads": 2, "attn_dim_head": 8, "image_size": 16, "num_frames": 4,
        "timesteps": 10, "resnet_groups": 2}
WEIGHT_ATOL = 1e-5  # float32 round-off through Adam; a different data order or noise moves weights ~1e-3
LOSS_ATOL = 1e-6
STEPS, SAVE_EVERY, GRAD_ACCUM, PER_PROCESS_BATCH = 4, 2, 2, 1
BIN = Path(sys.executable).parent

# The launch commands the README documents, word for word (test_readme_shows_the_tested_commands).
ONE_NODE = "torchrun --standalone --nproc-per-node 2 -m vdeploy.cli train"
NODES = "torchrun --nnodes 2 --nproc-per-node {gpus} --rdzv-backend c10d --rdzv-endpoint {host}:29500 --rdzv-id {run}"
ACCELERATE_ONE_NODE = "accelerate launch --multi_gpu --num_processes 2 -m vdeploy.cli train"
ACCELERATE = "accelerate launch --config_file accelerate.yaml --machine_rank {rank} -m vdeploy.cli train"
README_SECTION = "## Training on several GPUs or machines"

_AUDIT = r'''
import json, os, sys

def _install():
    out, watch = os.environ["VDEPLOY_AUDIT_DIR"], os.path.abspath(os.environ["VDEPLOY_AUDIT_WATCH"])
    fd = os.open(os.path.join(out, f"{os.getpid()}.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    rank = os.environ.get("RANK")
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def name(p):
        if isinstance(p, int):
            return None
        p = os.path.abspath(os.fsdecode(os.fspath(p)))
        return p if p == watch or p.startswith(watch + os.sep) else None

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if not (any(c in mode for c in "wax+") if mode else flags & writing):
                return
            paths = [name(path)]
        elif event in ("os.rename", "os.link"):
            paths = [name(args[0]), name(args[1])]
        elif event in ("os.remove", "os.mkdir"):
            paths = [name(args[0])]
        else:
            return
        if any(paths):
            os.write(fd, (json.dumps({"rank": rank, "event": event, "paths": paths}) + "\n").encode())

    sys.addaudithook(hook)

if os.environ.get("VDEPLOY_AUDIT_DIR"):
    _install()
'''


# ------------------------------------------------------------- helpers ----


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Data (6 clips: 4 steps of 2x2 videos cross two epoch boundaries), the config file, the audit hook."""
    root = tmp_path_factory.mktemp("dist")
    synth_dataset(root / "data", num=6, frames=4, size=16, seed=0)
    (root / "tiny.json").write_text(json.dumps(TINY))
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(_AUDIT)
    return root


@pytest.fixture(scope="module")
def one_process(work):
    """The reference: 1 process, batch 2 (2 x per process), 4 steps, checkpoints at steps 2 and 4."""
    results = work / "one"
    result = CliRunner().invoke(main, ["train", *_args(work, results), "--batch-size", str(2 * PER_PROCESS_BATCH),
                                       "--steps", str(STEPS)])
    assert result.exit_code == 0, result.output
    return results


def _args(work: Path, results: Path) -> list[str]:
    return ["--data", str(work / "data"), "--results", str(results), "--config", str(work / "tiny.json"),
            "--save-every", str(SAVE_EVERY), "--grad-accum", str(GRAD_ACCUM), "--lr", "1e-3", "--ema-start", "1",
            "--ema-every", "1", "--sample-rows", "1", "--quiet", "--cpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(work: Path, results: Path, *commands: list[str], timeout: float = 180) -> list[str]:
    """Run the launcher command(s) at once (one per "node"), audited; their outputs once all succeeded."""
    exe = commands[0][0]
    if not (BIN / exe).is_file():
        pytest.skip(f"{exe} is not installed beside {sys.executable}")
    env = _audited_env(work, results)
    procs = [subprocess.Popen([str(BIN / c[0]), *c[1:]], cwd=work, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for c in commands]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def _audited_env(work: Path, results: Path) -> dict:
    audit = results.parent / f"{results.name}-audit"
    audit.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VDEPLOY_AUDIT_DIR": str(audit), "VDEPLOY_AUDIT_WATCH": str(results),
           "PYTHONPATH": os.pathsep.join([str(work / "site"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _audit(results: Path) -> list[dict]:
    events = []
    for f in sorted((results.parent / f"{results.name}-audit").glob("*.jsonl")):
        events += [json.loads(line) for line in f.read_text().splitlines()]
    return events


def _check_files(results: Path, milestones: list[int], last: bool, steps: list[int]) -> None:
    """Only rank 0 wrote; every file landed once (the -last pointers once per save) and whole."""
    from PIL import Image

    from vdeploy.checkpoint import load_checkpoint

    events = _audit(results)
    assert events, "the audit hook recorded nothing: the launch did not load it"
    assert {e["rank"] for e in events} == {"0"}, [e for e in events if e["rank"] != "0"][:5]
    landed: dict[str, list[str]] = {}  # final file name -> how each write reached it
    for e in events:
        if e["event"] == "open" and not Path(e["paths"][0]).name.startswith("."):
            landed.setdefault(Path(e["paths"][0]).name, []).append("open")
        elif e["event"] == "os.rename":
            landed.setdefault(Path(e["paths"][1]).name, []).append("rename")
    saves = len(milestones) + last
    log = landed.pop("log.jsonl", [])  # opened once for appending, after (or without) an atomic rewrite
    assert log.count("open") == 1 and log.count("rename") <= 1 and log[-1] == "open", log
    expected = {"model-last.pt": ["rename"] * saves, "sample-last.gif": ["rename"] * len(milestones)}
    expected.update({f"model-{m}.pt": ["rename"] for m in milestones})
    expected.update({f"{m}.gif": ["rename"] for m in milestones})
    assert landed == expected, landed

    names = sorted(p.name for p in results.iterdir())
    assert not [n for n in names if n.startswith(".")], f"temporary files left: {names}"
    for name in [*expected, "log.jsonl"]:
        path = results / name
        if name.endswith(".pt"):
            assert load_checkpoint(path)["step"] in [m * SAVE_EVERY for m in milestones] + [steps[-1]]
        elif name.endswith(".gif"):
            with Image.open(path) as im:
                assert im.n_frames == TINY["num_frames"]
                for i in range(im.n_frames):
                    im.seek(i)
                    im.load()
    logged = [json.loads(line)["step"] for line in (results / "log.jsonl").read_text().splitlines()]
    assert logged == steps


def _ckpt(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _assert_same_run(a: Path, b: Path, what: str) -> None:
    """Checkpoints ``a`` and ``b`` hold the same step, data position and (to round-off) weights."""
    ca, cb = _ckpt(a), _ckpt(b)
    assert ca["step"] == cb["step"] and ca["data"] == cb["data"], (ca["step"], cb["step"], ca["data"], cb["data"])
    for key in ("model", "ema"):
        diff = _max_diff(ca[key], cb[key])
        print(f"{what}: {key} max abs weight difference {diff:.2e} at step {ca['step']}")
        assert diff < WEIGHT_ATOL, (what, key, diff)


def _losses(results: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (results / "log.jsonl").read_text().splitlines())}


# --------------------------------------------------------------- tests ----


def test_two_processes_train_what_one_does_and_one_resumes_them(work, one_process):
    two = work / "two"
    _launch(work, two, [*ONE_NODE.split(), *_args(work, two), "--batch-size", str(PER_PROCESS_BATCH),
                        "--steps", str(SAVE_EVERY)])
    _check_files(two, milestones=[1], last=False, steps=[1, 2])
    raw = _ckpt(two / "model-1.pt")
    assert raw["trainer"]["num_processes"] == 2 and raw["trainer"]["train_batch_size"] == PER_PROCESS_BATCH
    _assert_same_run(one_process / "model-1.pt", two / "model-1.pt", "1 process x batch 2 vs 2 x 1")
    ref, got = _losses(one_process), _losses(two)
    assert all(abs(ref[s] - got[s]) < LOSS_ATOL for s in got), (ref, got)
    # the weights did move: the agreement above is not that of two untrained models
    assert _max_diff(_ckpt(one_process / "model-1.pt")["model"], _ckpt(one_process / "model-2.pt")["model"]) > 1e-4

    # one process resumes the two-process run: batch 2 keeps the global batch, steps and data continue
    result = CliRunner().invoke(main, ["train", "--data", str(work / "data"), "--results", str(two), "--resume",
                                       "--steps", str(STEPS), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "resuming a 2-process run on 1: --batch-size 2 per process keeps its global batch of 2" in result.output
    assert "steps 2 -> 4" in result.output
    _assert_same_run(one_process / "model-2.pt", two / "model-2.pt", "2 processes resumed in 1 vs 1 throughout")
    assert _ckpt(two / "model-2.pt")["data"]["consumed"] == STEPS * GRAD_ACCUM * 2 * PER_PROCESS_BATCH
    assert sorted(_losses(two)) == [1, 2, 3, 4]


def test_two_nodes_resume_a_one_process_run(work, one_process):
    """``torchrun --nnodes 2 --rdzv-endpoint``: two agents on this host, one process each."""
    nodes = work / "nodes"
    nodes.mkdir()
    shutil.copy(one_process / "model-1.pt", nodes)  # the 1-process run as it stood at step 2
    port = _free_port()
    launch = NODES.format(gpus=1, host="127.0.0.1", run="vdeploy-test").replace(":29500", f":{port}").split()
    node = [*launch, "--local-addr", "127.0.0.1", "-m", "vdeploy.cli", "train", "--data", str(work / "data"),
            "--results", str(nodes), "--resume", "--steps", str(STEPS), "--quiet", "--cpu"]
    outs = _launch(work, nodes, node, node)
    out = "".join(outs)
    assert out.count("resuming a 1-process run on 2: --batch-size 1 per process keeps its global batch of 2") == 1
    assert out.count("steps 2 -> 4") == 1, out  # one process speaks
    _check_files(nodes, milestones=[2], last=False, steps=[3, 4])
    _assert_same_run(one_process / "model-2.pt", nodes / "model-2.pt", "1 process resumed on 2 nodes vs 1 throughout")
    assert _ckpt(nodes / "model-2.pt")["trainer"]["num_processes"] == 2


def test_accelerate_launch_one_node(work, one_process):
    """``accelerate launch --multi_gpu --num_processes 2``: its processes train what torchrun's do."""
    results = work / "acc1"
    launch = [*ACCELERATE_ONE_NODE.split()[:-3], "--main_process_port", str(_free_port()), "-m", "vdeploy.cli", "train"]
    _launch(work, results, [*launch, *_args(work, results), "--batch-size", str(PER_PROCESS_BATCH),
                            "--steps", str(SAVE_EVERY)])
    _check_files(results, milestones=[1], last=False, steps=[1, 2])
    _assert_same_run(one_process / "model-1.pt", results / "model-1.pt", "accelerate launch 2 x 1 vs 1 x 2")


def test_accelerate_config_file_two_machines_bf16(work, readme_section):
    """The README's accelerate config file (two machines, bf16) as two "machines" of one process each
    on this host: 3 steps of 2 micro-batches in bf16, then one process resumes it (still bf16)."""
    import yaml

    results = work / "acc2"
    config = {**_readme_accelerate_config(readme_section), "num_processes": 2, "main_process_ip": "127.0.0.1",
              "main_process_port": _free_port()}
    assert config["num_machines"] == 2 and config["mixed_precision"] == "bf16", config
    (work / "accelerate.yaml").write_text(yaml.safe_dump(config))
    train = [*_args(work, results), "--batch-size", str(PER_PROCESS_BATCH), "--steps", "3"]
    outs = _launch(work, results, *[[*ACCELERATE.format(rank=r).split(), *train] for r in (0, 1)])
    assert "".join(outs).count("precision bf16") == 1, outs  # set by the config file, through accelerate
    _check_files(results, milestones=[1], last=True, steps=[1, 2, 3])
    losses = _losses(results)
    assert all(0 < loss < 10 for loss in losses.values()), losses  # finite (and sane) in bf16
    raw = _ckpt(results / "model-last.pt")
    assert raw["step"] == 3 and raw["trainer"]["mixed_precision"] == "bf16"
    assert raw["data"]["consumed"] == 3 * GRAD_ACCUM * 2 * PER_PROCESS_BATCH

    result = CliRunner().invoke(main, ["train", "--data", str(work / "data"), "--results", str(results), "--resume",
                                       "--steps", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "precision bf16" in result.output and "steps 3 -> 4" in result.output, result.output
    assert _ckpt(results / "model-last.pt")["step"] == 4 and sorted(_losses(results)) == [1, 2, 3, 4]


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank-1 process through /proc")
def test_ctrl_c_in_one_process_stops_every_process_at_one_step(work):
    """SIGINT to rank 1 alone: both processes stop after the same step and rank 0 saves it (a stop
    decided per process would leave rank 0 in an all-reduce that rank 1 never joins)."""
    import signal
    import time

    results = work / "stop"
    if not (BIN / "torchrun").is_file():
        pytest.skip("torchrun is not installed")
    proc = subprocess.Popen(
        [str(BIN / "torchrun"), *ONE_NODE.split()[1:], *_args(work, results), "--batch-size", "1", "--grad-accum", "1",
         "--steps", "100000", "--save-every", "100000"],
        cwd=work, env=_audited_env(work, results), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, deadline, rank1 = results / "log.jsonl", time.monotonic() + 120, None
        while not (log.exists() and log.read_text().count("\n") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-4000:]
            time.sleep(0.2)
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"VDEPLOY_AUDIT_WATCH={results}".encode() in environ and b"RANK=1" in environ:
                rank1 = int(pid)
        assert rank1 is not None, "no rank-1 process found"
        os.kill(rank1, signal.SIGINT)
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert out.count("continue with --resume") == 1, out[-4000:]  # rank 0 alone speaks
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    raw = _ckpt(results / "model-last.pt")
    assert raw["step"] == steps[-1] >= 2 and steps == list(range(1, steps[-1] + 1))
    assert raw["data"]["consumed"] == 2 * raw["step"]
    assert {e["rank"] for e in _audit(results)} == {"0"}


def test_data_position_counts_trained_batches_with_loader_workers(work, tmp_path):
    """DataLoader workers read the data order ahead; the checkpoint holds where training is."""
    from vdeploy.config import diffusion_kwargs, resolve, unet_kwargs
    from vdeploy.diffusion import GaussianDiffusion
    from vdeploy.model import Unet3D
    from vdeploy.trainer import Trainer

    config = resolve(TINY)
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(Unet3D(**unet_kwargs(config)), **diffusion_kwargs(config))
    trainer = Trainer(diffusion, work / "data", train_batch_size=2, train_num_steps=2, gradient_accumulate_every=1,
                      save_and_sample_every=1000, results_folder=tmp_path, num_sample_rows=1, progress=False,
                      config=config, num_workers=1, cpu=True)
    trainer.train()
    assert trainer.data_order.consumed > 4  # the workers' read-ahead
    assert _ckpt(tmp_path / "model-last.pt")["data"]["consumed"] == 4


def test_fp16_on_the_cpu_is_one_line_error(work, tmp_path):
    runner = CliRunner()
    base = ["train", "--data", str(work / "data"), "--results", str(tmp_path / "r"), "--config", str(work / "tiny.json"),
            "--steps", "1", "--quiet", "--cpu"]
    for extra in (["--amp"], ["--mixed-precision", "fp16"]):
        result = runner.invoke(main, [*base, *extra])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and "fp16 mixed precision" in lines[0] and "--mixed-precision bf16" in lines[0], lines
    result = runner.invoke(main, [*base, "--amp", "--mixed-precision", "bf16"])
    assert result.exit_code == 2 and "contradicts --mixed-precision bf16" in result.output
    assert not (tmp_path / "r" / "model-last.pt").exists()


@pytest.fixture(scope="module")
def readme_section() -> str:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert README_SECTION in readme
    return readme.split(README_SECTION, 1)[1].split("\n## ", 1)[0]


def test_readme_shows_the_tested_commands(readme_section):
    for command in (ONE_NODE, NODES.format(gpus=8, host="$MAIN_HOST", run="$RUN_ID"), ACCELERATE_ONE_NODE,
                    ACCELERATE.format(rank=0), ACCELERATE.format(rank=1)):
        assert command in readme_section, command
    assert _readme_accelerate_config(readme_section), "no accelerate config file (```yaml) in the section"


def _readme_accelerate_config(section: str) -> dict:
    import yaml

    blocks = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    return yaml.safe_load(blocks[0]) if blocks else {}
