"""Training numerics: a NaN/Inf loss or gradient skips that optimizer step (a warning, a counter in
log.jsonl); ``max_bad_steps`` in a row stop training with the last good checkpoint kept; a checkpoint with
non-finite weights is never written; NaN settings are refused before training."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from click.testing import CliRunner
from reliability_support import KILL_CONFIG, tiny_config, tiny_data  # noqa: F401 (fixtures)

from vdeploy import checkpoint as ckpt_io
from vdeploy.cli import main
from vdeploy.config import diffusion_kwargs, resolve, unet_kwargs
from vdeploy.diffusion import GaussianDiffusion
from vdeploy.model import Unet3D
from vdeploy.trainer import NonFiniteTrainingError, Trainer

CONFIG = resolve(KILL_CONFIG)


def make_trainer(data, results, steps, **kw):
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(Unet3D(**unet_kwargs(CONFIG)), **diffusion_kwargs(CONFIG))
    args = {"train_batch_size": 2, "train_num_steps": steps, "gradient_accumulate_every": 1, "train_lr": 1e-3,
            "save_and_sample_every": steps, "results_folder": results, "num_sample_rows": 1, "progress": False,
            "config": CONFIG, **kw}
    return Trainer(diffusion, data, **args)


def poison_losses(monkeypatch, trainer, bad_calls: set[int] | None = None, from_call: int | None = None):
    """Make the training loss NaN on the given forward calls (counted from 1), or on every call from one on."""
    calls = {"n": 0}
    forward = type(trainer.unwrapped_model).forward

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        loss = forward(self, *args, **kwargs)
        bad = (bad_calls and calls["n"] in bad_calls) or (from_call is not None and calls["n"] >= from_call)
        return loss * float("nan") if bad else loss

    monkeypatch.setattr(type(trainer.unwrapped_model), "forward", poisoned)


def log_lines(results):
    return [json.loads(line) for line in (results / "log.jsonl").read_text().splitlines()]


def count_optimizer_steps(monkeypatch, trainer) -> dict:
    taken = {"n": 0}
    step = trainer.opt.step

    def counted(*args, **kwargs):
        taken["n"] += 1
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer.opt, "step", counted)
    return taken


def test_a_nan_loss_skips_its_step_with_a_warning_and_a_counter(tiny_data, tmp_path, monkeypatch, caplog):  # noqa: F811
    results = tmp_path / "r"
    trainer = make_trainer(tiny_data, results, steps=4)
    poison_losses(monkeypatch, trainer, bad_calls={2, 3})
    taken = count_optimizer_steps(monkeypatch, trainer)
    with caplog.at_level(logging.WARNING, logger="vdeploy.trainer"):
        trainer.train()
    assert trainer.step == 4 and taken["n"] == 4  # the two NaN steps were skipped and made up for
    warnings = [r.getMessage() for r in caplog.records if "skipped this optimizer step" in r.getMessage()]
    assert len(warnings) == 2 and "loss nan" in warnings[0] and "(2 in a row, stopping at 5)" in warnings[1]
    lines = log_lines(results)
    skipped = [line for line in lines if "skipped" in line]
    assert [(s["step"], s["skipped_steps"], s["bad_in_a_row"]) for s in skipped] == [(1, 1, 1), (1, 2, 2)]
    assert lines[-1]["step"] == 4 and lines[-1]["skipped_steps"] == 2 and math.isfinite(lines[-1]["loss"])
    saved = ckpt_io.load_checkpoint(results / "model-last.pt")
    assert all(torch.isfinite(t).all() for t in saved["model"].values())


def test_a_nan_gradient_with_a_finite_loss_skips_its_step(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    results = tmp_path / "r"
    trainer = make_trainer(tiny_data, results, steps=2)
    taken = count_optimizer_steps(monkeypatch, trainer)
    first = next(trainer.unwrapped_model.parameters())
    hooked = {"n": 0}

    def nan_once(grad):
        hooked["n"] += 1
        return grad * float("nan") if hooked["n"] == 1 else grad

    first.register_hook(nan_once)
    before = {k: v.clone() for k, v in trainer.unwrapped_model.state_dict().items()}
    trainer.train()
    skipped = [line for line in log_lines(results) if "skipped" in line]
    assert len(skipped) == 1 and skipped[0]["skipped"] == "gradient NaN/Inf"
    assert taken["n"] == 2 and trainer.step == 2
    after = trainer.unwrapped_model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the good steps did train


def test_bad_steps_in_a_row_stop_training_and_keep_the_last_good_checkpoint(tiny_data, tmp_path,  # noqa: F811
                                                                            monkeypatch):
    results = tmp_path / "r"
    trainer = make_trainer(tiny_data, results, steps=10, save_and_sample_every=1, max_bad_steps=3)
    poison_losses(monkeypatch, trainer, from_call=3)  # two good steps, then NaN for ever
    with pytest.raises(NonFiniteTrainingError) as e:
        trainer.train()
    message = str(e.value)
    assert "training stopped at step 2: 3 optimizer steps in a row had a non-finite loss or gradient" in message
    assert f"the last good checkpoint, {results / 'model-last.pt'}, is kept" in message
    assert trainer.step == 2 and not (results / "model-3.pt").exists()
    assert ckpt_io.load_checkpoint(results / "model-last.pt")["step"] == 2
    assert (results / "model-last.pt").read_bytes() == (results / "model-2.pt").read_bytes()
    assert [line.get("bad_in_a_row") for line in log_lines(results)][-3:] == [1, 2, 3]


def test_a_checkpoint_with_non_finite_weights_is_never_written(tiny_data, tmp_path):  # noqa: F811
    results = tmp_path / "r"
    trainer = make_trainer(tiny_data, results, steps=1)
    trainer.train()
    before = (results / "model-last.pt").read_bytes()
    with torch.no_grad():
        next(trainer.unwrapped_model.parameters()).view(-1)[0] = float("inf")
    for milestone in (7, "last"):
        with pytest.raises(ckpt_io.CheckpointError) as e:
            trainer.save(milestone)
        assert "refused to write checkpoint" in str(e.value) and "NaN or Inf (model/denoise_fn." in str(e.value)
    assert not (results / "model-7.pt").exists()
    assert (results / "model-last.pt").read_bytes() == before
    assert "the previous model-last.pt is unchanged" in str(e.value)


@pytest.mark.parametrize("setting", ["train_lr", "ema_decay", "max_grad_norm", "cond_scale", "null_cond_prob"])
def test_the_trainer_refuses_nan_settings(tiny_data, tmp_path, setting):  # noqa: F811
    with pytest.raises(ValueError, match=f"must be finite numbers: {setting}=nan"):
        make_trainer(tiny_data, tmp_path / "r", steps=1, **{setting: float("nan")})


def test_the_cli_stops_a_diverging_run_in_one_line(tiny_data, tiny_config, tmp_path):  # noqa: F811
    results = tmp_path / "r"
    result = CliRunner().invoke(main, [
        "train", "--data", str(tiny_data), "--results", str(results), "--config", str(tiny_config), "--steps", "20",
        "--save-every", "1", "--batch-size", "2", "--sample-rows", "1", "--quiet", "--lr", "1e30",
        "--max-bad-steps", "2"])
    assert result.exit_code == 1, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "2 optimizer steps in a row had a non-finite loss or gradient" in error[0], result.output
    assert "Traceback" not in result.output
    kept = ckpt_io.load_checkpoint(results / "model-last.pt")  # the last good one
    assert all(torch.isfinite(t).all() for t in kept["model"].values())
    assert kept["trainer"]["max_bad_steps"] == 2
