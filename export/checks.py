"""Checks right after export, the optimum way: graph validity, output names, shapes, then values.

:func:`check_graph` runs ``onnx.checker`` with full shape inference and compares the graph's inputs and
outputs with the :class:`~vdeploy.export.spec.ExportSpec`. :func:`check_parity` runs onnxruntime on
fresh inputs against PyTorch references and reports the max abs error of every case; all failures are
raised together with their numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .spec import ExportSpec, ValidationError

_ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 9: "bool"}


@dataclass
class Case:
    """One parity case: the feed for the graph and the PyTorch reference of one output (``output``: its name,
    None: the first)."""

    name: str
    feed: dict[str, np.ndarray]
    reference: np.ndarray
    output: str | None = None


def check_graph(path: str | Path, spec: ExportSpec) -> None:
    """``onnx.checker`` (full check: strict shape inference), then input/output names, dtypes and ranks.

    Raises:
        ValidationError: every mismatch, in one message.
    """
    import onnx

    path = str(path)
    try:
        onnx.checker.check_model(path, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ValidationError(f"{Path(path).name} fails onnx.checker: {e}") from None
    model = onnx.load(path, load_external_data=False)
    problems = []
    for kind, actual, expected in (
        ("input", model.graph.input, spec.inputs),
        ("output", model.graph.output, spec.outputs),
    ):
        names = [v.name for v in actual]
        if names != [t.name for t in expected]:
            problems.append(f"{kind} names {names} != {[t.name for t in expected]}")
            continue
        for value, want in zip(actual, expected):
            ttype = value.type.tensor_type
            dtype = _ONNX_DTYPES.get(ttype.elem_type, str(ttype.elem_type))
            dims = [d.dim_param or d.dim_value for d in ttype.shape.dim]
            if dtype != want.dtype:
                problems.append(f"{kind} {value.name}: dtype {dtype} != {want.dtype}")
            if len(dims) != len(want.shape):
                problems.append(f"{kind} {value.name}: rank {len(dims)} != {len(want.shape)}")
                continue
            for got, exp in zip(dims, want.shape):
                if isinstance(exp, int) and got != exp:
                    problems.append(f"{kind} {value.name}: shape {dims} != {list(want.shape)}")
                    break
                if isinstance(exp, str) and isinstance(got, int) and got > 0:
                    problems.append(f"{kind} {value.name}: axis '{exp}' is static ({got}) in the graph")
                    break
    if problems:
        raise ValidationError(f"{Path(path).name}: " + "; ".join(problems))


def ort_session(path: str | Path, threads: int = 2, optimization: str = "all"):
    """An onnxruntime CPU session with ``threads`` intra-op threads (the runtime's own session options)."""
    import onnxruntime as ort

    from vdeploy.runtime.platform import ort_session_options

    options = ort_session_options(ort, threads, optimization=optimization)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_parity(
    path: str | Path, spec: ExportSpec, cases: list[Case], atol: float | None = None, session=None
) -> dict[str, float]:
    """Run every case through onnxruntime, compare with its reference, report every max abs error.

    Output shapes are checked before values. Returns ``{case name: max abs error}``.

    Raises:
        ValidationError: some case has the wrong shape or exceeds ``atol`` (default ``spec.atol``); the
            message lists all cases with their errors.
    """
    atol = spec.atol if atol is None else atol
    session = session or ort_session(path)
    errors: dict[str, float] = {}
    failures = []
    for case in cases:
        (out,) = session.run([case.output or spec.output_names[0]], case.feed)
        if out.shape != case.reference.shape:
            failures.append(f"{case.name}: shape {out.shape} != PyTorch {case.reference.shape}")
            continue
        diff = np.abs(out.astype(np.float64) - case.reference.astype(np.float64))
        err = float(np.nan_to_num(diff, nan=np.inf).max())
        errors[case.name] = err
        if not err <= atol:
            failures.append(f"{case.name}: max abs err {err:.3g} > atol {atol:g}")
    if failures:
        report = ", ".join(f"{k} {v:.3g}" for k, v in errors.items())
        raise ValidationError(
            f"{Path(path).name} does not match PyTorch: " + "; ".join(failures) + f" (all cases: {report})"
        )
    return errors


def denoiser_cases(
    spec: ExportSpec,
    config: dict,
    reference: Callable[..., np.ndarray],
    null_embedding: np.ndarray | None,
    *,
    batches: tuple[int, ...] = (1, 3),
    extra_size: int | None = None,
    seed: int = 1234,
    null_tokens: np.ndarray | None = None,
) -> list[Case]:
    """Fresh random parity cases for a denoiser graph: each batch size, conditioned and unconditioned.

    Args:
        spec: the graph's spec (which inputs exist).
        config: resolved model config (shapes, timesteps).
        reference: ``reference(x, t, cond, kind, cond_scale, **inputs) -> eps`` on numpy arrays, where ``kind``
            is ``"cond"``, ``"uncond"`` (upstream's ``null_cond_prob=1``), or ``"cfg"``; ``inputs`` are a
            frame-conditioned graph's ``frames`` and ``mask`` and a token model's ``text_tokens`` and ``text_mask``.
        null_embedding: ``(1, cond_dim)`` learned null embedding, fed as ``cond`` for the unconditional case.
        extra_size: also check batch 1 at this height and width (a dynamic-size graph).
        null_tokens: ``(L, cond_dim)`` a token model's learned null token sequence, fed (with an all-ones mask) as
            ``text_tokens`` for the unconditional case; the other cases get random tokens, rows of 1 to L real
            tokens and random values in the padding (which must not matter).
    """
    rng = np.random.default_rng(seed)
    names = spec.input_names
    c, f, s = config["channels"], config["num_frames"], config["image_size"]
    has_cond = "cond" in names
    kinds = ["cfg"] if spec.guidance else (["cond", "uncond"] if has_cond else ["plain"])
    shapes = [(b, s) for b in batches] + ([(1, extra_size)] if extra_size else [])
    cases = []
    for b, size in shapes:
        for kind in kinds:
            x = rng.standard_normal((b, c, f, size, size), dtype=np.float32)
            t = rng.integers(0, config["timesteps"], size=(b,), dtype=np.int64)
            feed = {"x": x, "t": t}
            cond = scale = None
            if has_cond:
                cond = rng.standard_normal((b, spec.inputs[names.index("cond")].shape[1]), dtype=np.float32)
                feed["cond"] = np.repeat(null_embedding, b, axis=0) if kind == "uncond" else cond
            if spec.guidance:
                scale = np.array([rng.uniform(1.5, 5.0)], dtype=np.float32)
                feed["cond_scale"] = scale
            inputs = {}
            if "text_tokens" in names:
                length, width = spec.inputs[names.index("text_tokens")].shape[1:]
                tokens = rng.standard_normal((b, length, width), dtype=np.float32)
                text_mask = (np.arange(length)[None] < rng.integers(1, length + 1, size=(b, 1))).astype(np.float32)
                if kind == "uncond":
                    tokens = np.repeat(np.asarray(null_tokens, np.float32).reshape(1, length, width), b, axis=0)
                    text_mask = np.ones((b, length), np.float32)
                inputs.update(text_tokens=tokens, text_mask=text_mask)
            if "frames" in names:  # a frame-conditioned model: each row knows its first k frames (k = 0..f-1)
                inputs.update(frames=rng.uniform(-1, 1, x.shape).astype(np.float32),
                              mask=(np.arange(f)[None] < rng.integers(0, f, size=(b, 1))).astype(np.float32))
            feed.update(inputs)
            name = f"b{b}_{kind}" + (f"_{size}px" if size != s else "")
            cases.append(Case(name, feed, reference(x, t, cond, kind, scale, **inputs)))
    return cases
