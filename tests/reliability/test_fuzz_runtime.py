"""Hypothesis against the runtime's two boundaries: the manifest (``from_json`` and ``load`` on mutated valid
manifests) and ``Pipeline.__call__`` (bad batch sizes, conditioning, noise, steps, samplers, options, scales,
texts, seeds). Every case ends in a correct result (a valid Manifest that re-serializes; a finite video
in [0, 1] of the right shape) or ManifestError / ValueError — never another exception and never a hang
(each case runs under an alarm)."""

from __future__ import annotations

import contextlib
import copy
import json
import signal

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_support import count
from runtime_fixtures import COND_DIM, model_dir

from vdeploy.runtime import SAMPLERS, Pipeline
from vdeploy.runtime import manifest as manifest_lib
from vdeploy.runtime.manifest import Manifest, ManifestError

FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
CASE_SECONDS = 60  # a case still running after this is a hang


def fuzz(request, name: str) -> settings:
    return settings(FUZZ, max_examples=count(name, bool(request.config.getoption("--reliability-full"))))


@contextlib.contextmanager
def no_hang(seconds: int = CASE_SECONDS):
    def fail(signum, frame):
        raise AssertionError(f"a case ran over {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------------------- manifests --

HUGE = [10**400, -(10**400), 2**63, 2**64 + 1, -(2**63) - 1]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.integers(), st.sampled_from(HUGE),
    st.just(5000).map(lambda digits: 10**digits),  # past int->str's digit limit (built lazily: no repr)
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["", "../x.onnx", "/etc/passwd", "denoiser.onnx", "\u202e\u0000", "é/ß.onnx", "x" * 300]),
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _nested(value, depth: int):
    for _ in range(depth):
        value = [value] if depth % 2 else {"k": value}
    return value


@st.composite
def mutated_manifests(draw, bases):
    """A valid manifest's JSON with 1-4 mutations at random places: a key removed, a value replaced by any
    JSON (types swapped, huge numbers, unicode), a junk key added, a value buried in deep nesting."""
    data = copy.deepcopy(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(1, 4))):
        parent, key = None, None
        node = data
        while isinstance(node, (dict, list)) and node and draw(st.integers(0, 3)):
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            parent, key = node, draw(st.sampled_from(keys))
            node = node[key]
        op = draw(st.sampled_from(["remove", "replace", "add", "nest", "top"]))
        if op == "top":
            data = draw(json_values) if draw(st.booleans()) else data
        elif parent is None:
            if isinstance(data, dict) and data:
                if op == "remove":
                    del data[draw(st.sampled_from(list(data)))]
                else:
                    data[draw(st.sampled_from(list(data)))] = draw(json_values)
        elif op == "remove":
            del parent[key]
        elif op == "replace":
            parent[key] = draw(json_values)
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=10))] = draw(json_values)
        else:
            parent[key] = _nested(parent[key], draw(st.sampled_from([2, 50, 900, 3000])))
    return data


@pytest.fixture(scope="module")
def manifest_bases():
    """The JSON of both tiny fixture directories (conditioned with text encoder; unconditioned), plus the
    conditioned one with an engine entry so the engines' checks are reached."""
    bases = [json.loads((model_dir(kind) / "vdeploy.json").read_text()) for kind in ("cond", "uncond")]
    with_engine = copy.deepcopy(bases[0])
    with_engine["engines"] = [{"file": "denoiser.onnx", "graph": "denoiser", "gpu": "NVIDIA H100",
                               "tensorrt_version": "10.3", "precision": "fp16", "profile": {}}]
    return bases + [with_engine]


def test_manifest_from_json_and_load_end_in_a_manifest_or_manifest_error(manifest_bases, request, tmp_path):
    for base in manifest_bases:  # the bases themselves are valid
        assert isinstance(manifest_lib.from_json(copy.deepcopy(base)), Manifest)
    outcomes = {"Manifest": 0, "ManifestError": 0}
    folder = tmp_path / "model"
    folder.mkdir()

    @fuzz(request, "manifest_json")
    @given(data=mutated_manifests(manifest_bases))
    def check(data):
        with no_hang():
            try:
                loaded = manifest_lib.from_json(data, where="fuzz.json")
            except ManifestError:
                outcomes["ManifestError"] += 1
            else:
                assert isinstance(loaded, Manifest)
                assert isinstance(manifest_lib.from_json(loaded.to_json()), Manifest)  # written back, it loads
                outcomes["Manifest"] += 1
            try:  # the same bytes through load(): JSON text, a file, the path checks
                text = json.dumps(data)
            except (ValueError, RecursionError):  # too deep (or ints too long) for json.dumps itself
                text = "[" * 100_000 + "]" * 100_000
            (folder / "vdeploy.json").write_text(text)
            try:
                assert isinstance(manifest_lib.load(folder, verify=False), Manifest)
            except ManifestError as e:
                assert "\n" not in str(e) and "vdeploy.json" in str(e)

    check()
    assert outcomes["ManifestError"] > 0 and outcomes["Manifest"] > 0, outcomes


# ------------------------------------------------------------------------------------ Pipeline call --


@pytest.fixture(scope="module")
def pipes():
    return {kind: Pipeline.from_dir(model_dir(kind), backend="cpu") for kind in ("uncond", "cond")}


def _arrays(shapes):
    dtypes = st.sampled_from(["float32", "float64", "float16", "int64", "bool", "complex64", "object", "U3"])
    fills = st.sampled_from(["normal", "nan", "inf", "zeros", "huge"])

    @st.composite
    def arrays(draw):
        shape = draw(shapes)
        dtype, fill = draw(dtypes), draw(fills)
        values = np.random.default_rng(0).standard_normal(shape)
        if fill == "nan":
            values.flat[0 if values.size else slice(0)] = np.nan
        elif fill == "inf":
            values[...] = np.inf
        elif fill == "zeros":
            values[...] = 0
        elif fill == "huge":
            values[...] = 1e300
        if dtype == "U3":
            return values.astype(str).astype("U3")
        with np.errstate(all="ignore"):
            return values.astype(dtype)

    return arrays()


def _shapes(good):
    near = st.lists(st.integers(0, 9), min_size=0, max_size=6).map(tuple)
    return st.one_of(st.just(good), st.sampled_from([(1, *good[1:]), (2, *good[1:]), good[1:], (0, *good[1:])]),
                     near)


@st.composite
def call_kwargs(draw, pipe):
    c, f, h, w = pipe.shape
    kwargs = {}
    junk = st.one_of(st.none(), st.booleans(), st.text(max_size=5), st.floats(allow_nan=True),
                     st.integers(-5, 5), st.lists(st.integers(0, 3), max_size=3), st.just(object()))
    if draw(st.booleans()):
        kwargs["batch_size"] = draw(st.one_of(st.integers(-2, 3), st.sampled_from([True, False, 2.0, "2", None,
                                                                                   np.int64(2), np.float32(1)])))
    if draw(st.booleans()):
        kwargs["steps"] = draw(st.one_of(st.integers(-1, 3), st.sampled_from([True, False, 1.5, 2.0, "2", 10**9,
                                                                              2**70, np.int32(2), -(10**9)])))
    else:
        kwargs["steps"] = draw(st.integers(1, 3))  # keep the default steps out of most cases: tiny runs
    if draw(st.booleans()):
        kwargs["sampler"] = draw(st.one_of(st.sampled_from(list(SAMPLERS)),
                                           st.sampled_from(["DDIM", "", "ddim ", None, 3, ["ddim"]])))
    if draw(st.booleans()):
        kwargs["seed"] = draw(st.one_of(st.integers(-3, 2**70), st.sampled_from([1.5, "1", True, None, [1, 2],
                                                                                 np.int64(3)])))
    if draw(st.booleans()):
        kwargs["cond_scale"] = draw(st.one_of(
            st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 5),
            st.sampled_from(["2", None, True, 1j, np.float32(2), np.array([2.0]), np.array([1.0, 2.0]), []])))
    if draw(st.booleans()):
        kwargs["noise"] = draw(st.one_of(_arrays(_shapes((1, c, f, h, w))), junk))
    if pipe.cond_dim is not None and draw(st.booleans()):
        which = draw(st.sampled_from(["cond", "text"]))
        if which == "cond":
            kwargs["cond"] = draw(st.one_of(_arrays(_shapes((2, COND_DIM))), junk))
        else:
            kwargs["text"] = draw(st.one_of(
                st.text(max_size=20), st.lists(st.text(max_size=8), max_size=3),
                st.sampled_from([[], [1, 2], b"bytes", 3, [None], ["a", 3], "\x00\ud7ff", ["red ball"] * 3])))
    elif draw(st.integers(0, 4)) == 0:
        kwargs[draw(st.sampled_from(["cond", "text"]))] = draw(st.one_of(_arrays(_shapes((1, 4))),
                                                                         st.text(max_size=5)))
    if draw(st.booleans()):
        options = draw(st.dictionaries(st.sampled_from(["eta", "spacing", "order", "variant", "bogus"]),
                                       st.one_of(st.sampled_from([0.0, 0.5, 1, "trailing", "leading", 2, 3, "bh1"]),
                                                 junk), max_size=2))
        kwargs.update(options)
    return kwargs


# what the fuzzing found (each was a TypeError, an onnxruntime error or a NaN video), kept as fixed cases
FOUND = [
    {"batch_size": True, "steps": 1}, {"cond_scale": "2", "steps": 1}, {"cond_scale": 1j, "steps": 1},
    {"seed": 1.5, "steps": 1}, {"seed": "1", "steps": 1}, {"steps": 1, "noise": np.zeros((0, 3, 4, 8, 8))},
    {"steps": 1, "noise": np.array(["a"])}, {"steps": 1, "noise": object()},
    {"steps": 2, "sampler": "ddim", "eta": "x"}, {"steps": 2, "sampler": "ddim", "eta": float("inf")},
    {"steps": 2, "sampler": "ddim", "eta": 1e300},
]
FOUND_COND = [{"steps": 1, "text": 3}, {"steps": 1, "text": b"bytes"}, {"steps": 1, "text": ["a", 3]},
              {"steps": 1, "cond": np.ones((1, COND_DIM), np.complex64)}, {"steps": 1, "cond": object()}]


@pytest.mark.parametrize("kind", ["uncond", "cond"])
def test_pipeline_call_returns_a_video_or_value_error(pipes, request, kind):
    pipe = pipes[kind]
    outcomes = {"video": 0, "ValueError": 0}
    for kwargs in FOUND + (FOUND_COND if kind == "cond" else []):
        with pytest.raises(ValueError):
            pipe(**kwargs)

    @fuzz(request, "pipeline_call")
    @given(kwargs=call_kwargs(pipe))
    def check(kwargs):
        with no_hang():
            try:
                video = pipe(**kwargs)
            except ValueError as e:  # ManifestError is one too
                assert str(e), kwargs
                outcomes["ValueError"] += 1
                return
        assert isinstance(video, np.ndarray) and video.dtype == np.float32, kwargs
        assert video.ndim == 5 and video.shape[1:] == pipe.shape and video.shape[0] >= 1, (video.shape, kwargs)
        assert np.isfinite(video).all() and video.min() >= 0 and video.max() <= 1, kwargs
        outcomes["video"] += 1

    check()
    assert outcomes["video"] > 0 and outcomes["ValueError"] > 0, outcomes
