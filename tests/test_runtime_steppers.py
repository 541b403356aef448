"""Step machines: every sampler as a resumable generator, driven one step at a time.

The pure functions must give the stored numbers bit for bit (``tests/data/sampler_golden.npz``, the sampler
math as of commit 62deca3). Numpy only: no torch here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vdeploy.runtime import samplers, schedule
from vdeploy.runtime.samplers import SAMPLERS, StepRequest, drive
from vdeploy.runtime.schedule import respace

SHAPE = (2, 3, 4, 8, 8)
T = 100
SPACINGS = schedule.SPACINGS


def dummy(x, t, cond):
    """The brief's stand-in denoiser: ``0.1 x (t + 1) / 100``, elementwise, so batching cannot change it."""
    return 0.1 * x * (t[:, None, None, None, None] + 1) / 100


def start_noise(seed=0, shape=SHAPE):
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def recorded(fn, *args, **kwargs):
    """Run a sampler, returning its result and every callback dict (arrays copied)."""
    infos = []
    out = fn(*args, callback=lambda info: infos.append({k: np.copy(v) for k, v in info.items()}), **kwargs)
    return out, infos


GOLDEN = Path(__file__).parent / "data" / "sampler_golden.npz"
GOLDEN_SHAPE = (1, 1, 2, 2, 2)  # tiny: the stored arrays stay a few KB
CLIPS = {"none": {"clip_denoised": False}, "static": {}, "dynamic": {"dynamic_thres_percentile": 0.9}}
CASES = (
    [("ddpm", {"steps": None}), ("ddpm", {"steps": 10})]
    + [("ddim", {"steps": 10}), ("ddim", {"steps": 7, "eta": 0.5}), ("ddim", {"steps": 10, "eta": 1.0})]
    + [("dpmpp", {"steps": 1}), ("dpmpp", {"steps": 2}), ("dpmpp", {"steps": 10}), ("dpmpp", {"steps": 20})]
    + [("dpmpp3m", {"steps": 10}), ("unipc", {"steps": 10}), ("unipc", {"steps": 7, "order": 3, "variant": "bh1"})]
)


def golden_cases():
    """``{key: (sampler, keyword arguments)}``: every case of the golden file, in a stable order."""
    out = {}
    for name, options in CASES:
        for spacing in SPACINGS:
            for clip in CLIPS:
                key = "/".join([name, *(f"{k}={v}" for k, v in sorted(options.items())), spacing, clip])
                out[key] = (name, {**options, "spacing": spacing, **CLIPS[clip]})
    for name in ("ddpm", "ddim"):  # noise from an injected generator, drawn in the same order as before
        out[f"{name}/rng"] = (name, {"steps": 10, "eta": 1.0} if name == "ddim" else {})
    return out


def golden_run(fn, name, kwargs):
    """One golden case through ``fn`` (a sampler's pure function): the final x0, float32 ``GOLDEN_SHAPE``."""
    betas = schedule.cosine_beta_schedule(T)
    kwargs = dict(kwargs)
    if "spacing" not in kwargs:  # the generator cases
        kwargs["rng"] = np.random.default_rng(7)
    elif SAMPLERS[name].draws_noise:
        kwargs["noise"] = np.random.default_rng(1).standard_normal((kwargs["steps"] or T, *GOLDEN_SHAPE),
                                                                  dtype=np.float32)
    return fn(dummy, start_noise(shape=GOLDEN_SHAPE), betas, **kwargs)


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as data:
        return dict(zip(data["keys"].tolist(), data["x0"]))


@pytest.mark.parametrize("key", list(golden_cases()))
def test_samplers_give_the_stored_numbers_bit_for_bit(golden, key):
    """Every sampler, spacing and clipping (and the injected-generator draws) against the stored x0s, exactly.

    ``tests/data/sampler_golden.npz`` holds the numbers of the sampler math as of commit 62deca3 (the frozen
    copy this file carried until then; dpmpp3m and unipc as of its replacement): a refactor must not change one
    bit. Regenerate only for an intended numerical change: ``python tests/test_runtime_steppers.py``.
    """
    name, kwargs = golden_cases()[key]
    ours = golden_run(SAMPLERS[name].fn, name, kwargs)
    assert ours.dtype == np.float32 and ours.shape == GOLDEN_SHAPE
    assert np.array_equal(ours.reshape(-1), golden[key]), key


def test_the_callback_sees_every_step_and_the_function_equals_its_machine():
    betas = schedule.cosine_beta_schedule(T)
    for name, steps in (("ddpm", T), ("ddim", 7), ("dpmpp", 10), ("unipc", 10)):
        kwargs = {"rng": np.random.default_rng(1)} if SAMPLERS[name].draws_noise else {}
        ours, infos = recorded(SAMPLERS[name].fn, dummy, start_noise(), betas, steps=steps, **kwargs)
        assert len(infos) == steps and [i["i"] for i in infos] == list(range(steps))
        assert np.array_equal(infos[-1]["x"], ours) and all(set(i) == {"i", "t", "x", "x0", "eps"} for i in infos)


def test_the_protocol_step_by_step():
    betas = schedule.cosine_beta_schedule(T)
    x, cond = start_noise(), np.ones((2, 5), np.float32)
    machine = samplers.dpmpp_steps(x, betas, steps=6, cond=cond)
    request = next(machine)
    assert isinstance(request, StepRequest) and request.i == 0
    assert request.x is x and request.cond is cond  # the caller's float32 arrays, not copies
    seen = []
    with pytest.raises(StopIteration) as done:
        while True:
            assert request.x.dtype == np.float32 and request.x.shape == SHAPE
            assert request.t.dtype == np.int64 and request.t.shape == (2,) and request.cond is cond
            seen.append((request.i, int(request.t[0])))
            request = machine.send(dummy(request.x, request.t, request.cond))
    assert seen == list(enumerate(respace(T, 6).tolist()))
    x0 = done.value.value  # StopIteration.value: the machine's return value
    assert x0.dtype == np.float32 and np.array_equal(x0, samplers.dpmpp(dummy, x, betas, steps=6, cond=cond))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_table_entry_has_a_stepper_that_its_function_drives(name):
    spec = SAMPLERS[name]
    betas = schedule.cosine_beta_schedule(T)
    kwargs = {"steps": 8} if spec.default_steps is not None else {}
    if spec.draws_noise:
        kwargs["rng"] = np.random.default_rng(0)
    via_fn = spec.fn(dummy, start_noise(), betas, **kwargs)
    if spec.draws_noise:
        kwargs["rng"] = np.random.default_rng(0)
    via_steps = drive(spec.stepper(start_noise(), betas, **kwargs), dummy)
    assert np.array_equal(via_fn, via_steps)


def test_machines_batched_together_equal_solo_runs_bit_for_bit():
    """A toy cross-request batcher: machines join at different step boundaries, one denoiser call per round
    over the concatenated requests, each machine gets a view of its rows. Nothing a machine was given or
    yielded may change afterwards, and every result equals its solo run exactly."""
    betas = schedule.cosine_beta_schedule(T)
    jobs = [  # (joins at round, sampler, batch rows, options)
        (0, "dpmpp", 2, {"steps": 10}),
        (0, "ddpm", 1, {"steps": 12, "rng": 3}),
        (2, "ddim", 3, {"steps": 5, "eta": 0.5, "rng": 4, "spacing": "leading"}),
        (3, "dpmpp", 1, {"steps": 7, "spacing": "linspace", "dynamic_thres_percentile": 0.8}),
        (3, "ddim", 2, {"steps": 9, "clip_denoised": False}),
        (4, "unipc", 2, {"steps": 9, "order": 3, "variant": "bh1", "spacing": "logsnr"}),
        (5, "dpmpp3m", 1, {"steps": 8, "dynamic_thres_percentile": 0.9}),
    ] + [(1, name, 1, {"steps": 6}) for name in SAMPLERS if not SAMPLERS[name].draws_noise]

    def make(k, name, rows, options):
        options = dict(options)
        if "rng" in options:
            options["rng"] = np.random.default_rng(options["rng"])
        x = start_noise(10 + k, (rows, *SHAPE[1:]))
        cond = np.full((rows, 4), k, np.float32)
        return x, cond, options

    solo = []
    for k, (_, name, rows, options) in enumerate(jobs):
        x, cond, options = make(k, name, rows, options)
        solo.append(SAMPLERS[name].fn(dummy, x, betas, cond=cond, **options))

    given, yielded, received = [], [], []  # (array, its copy when handed over)
    pending, results, waiting = {}, {}, list(enumerate(jobs))
    for round_ in range(100):
        for k, job in list(waiting):
            joins, name, rows, options = job
            if joins <= round_:
                x, cond, options = make(k, name, rows, options)
                given += [(x, x.copy()), (cond, cond.copy())]
                machine = SAMPLERS[name].stepper(x, betas, cond=cond, **options)
                pending[k] = (machine, next(machine))
                waiting.remove((k, job))
        if not pending:
            break
        order = sorted(pending)
        requests = [pending[k][1] for k in order]
        yielded += [(r.x, r.x.copy()) for r in requests]
        eps = dummy(np.concatenate([r.x for r in requests]), np.concatenate([r.t for r in requests]), None)
        eps = eps.astype(np.float32)
        received.append((eps, eps.copy()))
        start = 0
        for k, request in zip(order, requests):
            rows = request.x.shape[0]
            machine = pending[k][0]
            try:
                pending[k] = (machine, machine.send(eps[start : start + rows]))
            except StopIteration as done:
                results[k] = done.value
                del pending[k]
            start += rows
    assert not pending and not waiting and len(results) == len(jobs)
    for k in range(len(jobs)):
        assert np.array_equal(results[k], solo[k]), f"job {k} ({jobs[k][1]})"
    for array, copy in given + yielded + received:
        assert np.array_equal(array, copy), "a machine wrote into an array it was given or yielded"


def test_bad_arguments_fail_when_the_machine_is_made_bad_eps_when_sent():
    betas = schedule.cosine_beta_schedule(T)
    with pytest.raises(ValueError, match=r"eta must be a number in \[0, 1\]"):
        samplers.ddim_steps(start_noise(), betas, eta=-1.0)
    with pytest.raises(ValueError, match="steps must be"):
        samplers.dpmpp_steps(start_noise(), betas, steps=0)
    with pytest.raises(ValueError, match="spacing must be one of"):
        samplers.ddpm_steps(start_noise(), betas, steps=5, spacing="karras")
    with pytest.raises(ValueError, match=r"x must be \(b, c, f, h, w\)"):
        samplers.ddim_steps(np.zeros((3, 4, 8, 8), np.float32), betas)
    machine = samplers.ddim_steps(start_noise(), betas, steps=3)
    next(machine)
    with pytest.raises(ValueError, match=r"step 0: eps has shape \(1, 3, 4, 8, 8\)"):
        machine.send(np.zeros((1, 3, 4, 8, 8), np.float32))


def test_a_denoiser_error_propagates_through_drive():
    def broken(x, t, cond):
        raise StopIteration("not the machine's end")  # must not be taken for the machine finishing

    with pytest.raises(StopIteration, match="not the machine"):
        drive(samplers.ddim_steps(start_noise(), schedule.cosine_beta_schedule(T), steps=3), broken)


if __name__ == "__main__":  # regenerate the golden file (an intended numerical change only)
    keys = list(golden_cases())
    x0 = np.stack([golden_run(SAMPLERS[n].fn, n, kw).reshape(-1) for n, kw in golden_cases().values()])
    np.savez_compressed(GOLDEN, keys=np.array(keys), x0=x0)
    print(f"wrote {GOLDEN}: {len(keys)} cases")
