"""Kill -9 during training: a ``vdeploy train`` subprocess is SIGKILLed at random moments, about half of them
while a checkpoint is being written (a temporary checkpoint file is on disk). After every kill each
checkpoint on disk loads, ``--resume`` continues from the newest complete one, and the run's final weights,
EMA and optimizer state equal an uninterrupted run's bit for bit. 5 kills in CI, 20 with --reliability-full."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import torch
from reliability_support import cli_command, cli_env, count, tiny_config, tiny_data  # noqa: F401 (fixtures)

from vdeploy.checkpoint import latest_checkpoint, load_checkpoint


def _train_args(data: Path, config: Path, results: Path, steps: int) -> list[str]:
    return ["train", "--data", str(data), "--results", str(results), "--config", str(config), "--steps", str(steps),
            "--save-every", "1", "--batch-size", "2", "--sample-rows", "1", "--ema-start", "0", "--ema-every", "1",
            "--lr", "1e-3", "--seed", "3", "--quiet"]


def _log_steps(results: Path) -> int:
    try:
        return (results / "log.jsonl").read_text().count("\n")
    except FileNotFoundError:
        return 0


def _writing(results: Path) -> bool:
    """A checkpoint (or model-last.pt's link) is being written: its temporary file exists."""
    try:
        return any(name.startswith(".model-") for name in os.listdir(results))
    except FileNotFoundError:
        return False


def _check_every_checkpoint_loads(results: Path) -> int:
    """Every model-*.pt loads; returns the newest complete checkpoint's step."""
    for path in sorted(results.glob("model-*.pt")):
        ckpt = load_checkpoint(path)  # raises CheckpointError on a torn file
        assert ckpt["step"] >= 1 and torch.isfinite(next(iter(ckpt["model"].values()))).all()
    newest = latest_checkpoint(results)
    return 0 if newest is None else load_checkpoint(newest)["step"]


def _run_and_kill(args: list[str], results: Path, rng: random.Random, in_write: bool) -> tuple[bool, str]:
    """Start training, wait for one more logged step, then SIGKILL it: at once when a checkpoint write is
    seen (``in_write``), else after a random delay. Returns (a write was in progress at the kill, stdout)."""
    before = _log_steps(results)
    proc = subprocess.Popen(cli_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env())
    deadline = time.monotonic() + 120
    try:
        while _log_steps(results) <= before:
            assert proc.poll() is None, f"training ended before it was killed: {proc.communicate()}"
            assert time.monotonic() < deadline, "no training step within 120 s"
            time.sleep(0.005)
        if in_write:
            until = time.monotonic() + 5
            while not _writing(results) and time.monotonic() < until and proc.poll() is None:
                time.sleep(0.0005)
        else:
            time.sleep(rng.uniform(0.0, 0.4))
        writing = _writing(results)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return writing and proc.returncode == -signal.SIGKILL, out


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(  # noqa: F811 (fixtures)
        tmp_path, tiny_data, tiny_config, request):
    kills = count("kills", request.config.getoption("--reliability-full"))
    steps = kills + 3  # every run is killed after at least one more step: the last kill leaves two to do
    rng = random.Random(11)

    # the uninterrupted run, alongside (2 cores: it mostly overlaps the killed runs' start-up)
    reference = tmp_path / "reference"
    uninterrupted = subprocess.Popen(cli_command(*_train_args(tiny_data, tiny_config, reference, steps)),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())

    results = tmp_path / "killed"
    in_writes, resumed_from = 0, []
    for k in range(kills):
        args = _train_args(tiny_data, tiny_config, results, steps)
        if latest_checkpoint(results) is not None:
            args.append("--resume")
        writing, out = _run_and_kill(args, results, rng, in_write=k % 2 == 0)
        in_writes += writing
        if "--resume" in args:  # it started from the newest complete checkpoint
            assert f"steps {resumed_from[-1]} -> {steps}" in out, out
        resumed_from.append(_check_every_checkpoint_loads(results))
        assert resumed_from[-1] >= 1
    final = subprocess.run(cli_command(*_train_args(tiny_data, tiny_config, results, steps), "--resume"),
                           capture_output=True, text=True, env=cli_env(), timeout=600)
    assert final.returncode == 0, final.stderr
    assert f"steps {resumed_from[-1]} -> {steps}" in final.stdout
    assert in_writes >= 1, "no kill landed inside a checkpoint write"
    print(f"\n{kills} kills, {in_writes} inside a checkpoint write; resumed from steps {resumed_from}")

    _, err = uninterrupted.communicate(timeout=600)
    assert uninterrupted.returncode == 0, err

    ours, theirs = (load_checkpoint(r / "model-last.pt") for r in (results, reference))
    assert ours["step"] == theirs["step"] == steps
    for key in ("model", "ema"):
        assert ours[key].keys() == theirs[key].keys()
        for name, tensor in ours[key].items():
            assert torch.equal(tensor, theirs[key][name]), f"{key}/{name} differs from the uninterrupted run"
    for a, b in zip(ours["optimizer"]["state"].values(), theirs["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a), "Adam's state differs from the uninterrupted run"
    assert _check_every_checkpoint_loads(results) == steps
    assert not _writing(results), "a killed write's temporary checkpoint was left behind"  # later saves clean up
    # the milestone numbering survived the kills: one checkpoint per step, as in the uninterrupted run
    names = (re.match(r"model-(\d+)\.pt", p.name) for p in results.glob("model-*.pt"))
    numbered = sorted(int(m.group(1)) for m in names if m)
    assert numbered == list(range(1, steps + 1))
