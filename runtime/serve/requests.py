"""The body of ``POST /v1/videos``: JSON in, ``Pipeline.prepare`` keywords out, or one clear error naming the field.

Messages follow the CLI's (``vdeploy sample``): choices listed as click lists them, ranges as click states
them, and the sampler options checked by the samplers table (``sampler_kwargs``), so an option a sampler
does not take gets the same sentence as on the command line.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import numpy as np

from ..pipeline import CONDITIONING, DEFAULT_SAMPLER, Pipeline
from ..samplers import SAMPLERS, OptionError, request_fields, sampler_kwargs, sampler_options

FORMATS = {"gif": "image/gif", "mp4": "video/mp4", "npy": "application/x-npy"}
# and one field per sampler option of the samplers table (request_fields): see fields()
FIELDS = ("prompt", "cond", "sampler", "steps", "seed", "cond_scale", "batch_size",
          "frames", "known_mask", "resample", "conditioning", "format", "fps", "async")
FRAME_FIELDS = ("frames", "known_mask", "resample", "conditioning")  # checked by Pipeline.prepare (runtime.conditioning)
MAX_PROMPT_CHARS = 2000


class Invalid(ValueError):
    """A bad request body: HTTP 422 with ``{"error": message, "field": field}``."""

    def __init__(self, field: str | None, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class VideoRequest:
    """A checked request: ``kwargs`` for ``Pipeline.prepare``/``Batcher.submit``, and how to answer."""

    kwargs: dict
    format: str
    fps: float
    run_async: bool


def _choices(values) -> str:
    return ", ".join(repr(v) for v in values)


def _int(body: dict, name: str, lo: int, hi: int | None = None, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(name, f"{value!r} is not a valid integer")
    if value < lo or (hi is not None and value > hi):
        bound = f"{lo}<=x<={hi}" if hi is not None else f"x>={lo}"
        raise Invalid(name, f"{value} is not in the range {bound}")
    return value


def _float(body: dict, name: str, lo: float | None = None, hi: float | None = None, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Invalid(name, f"{value!r} is not a valid float")
    value = float(value)
    if not math.isfinite(value):
        raise Invalid(name, f"{value!r} is not a finite number")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bound = f"{lo}<=x<={hi}" if hi is not None and lo is not None else (f"x>={lo}" if lo is not None else f"x<={hi}")
        raise Invalid(name, f"{value} is not in the range {bound}")
    return value


def _choice(body: dict, name: str, choices, default):
    value = body.get(name, default)
    if value is None:
        return default
    if value not in choices:
        raise Invalid(name, f"{value!r} is not one of {_choices(choices)}")
    return value


def _prompt(value, pipe: Pipeline):
    if isinstance(value, str):
        prompts = [value]
    elif isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        prompts = value
    else:
        raise Invalid("prompt", "expected a string or a non-empty list of strings")
    if pipe.cond_dim is None:
        raise Invalid("prompt", f"{pipe.model_dir.name} is an unconditional model (no cond_dim): it samples "
                                "without prompts or embeddings; leave the field out")
    if pipe.text_encoder is None:
        raise Invalid("prompt", f"{pipe.model_dir.name} has no text encoder; pass `cond` embeddings instead")
    for p in prompts:
        if not p.strip():
            raise Invalid("prompt", "a prompt is empty")
        if len(p) > MAX_PROMPT_CHARS:
            raise Invalid("prompt", f"a prompt has {len(p)} characters (at most {MAX_PROMPT_CHARS})")
    return prompts[0] if isinstance(value, str) else prompts


def _cond(value, pipe: Pipeline, max_videos: int) -> np.ndarray:
    if pipe.cond_dim is None:
        raise Invalid("cond", f"{pipe.model_dir.name} is an unconditional model (no cond_dim): it samples "
                              "without prompts or embeddings; leave the field out")
    d = pipe.cond_width  # cond_dim, or a token model's packed rows (Pipeline.encode_text's)
    expected = f"expected {d} numbers or a list of rows of {d} numbers"
    try:
        cond = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise Invalid("cond", expected) from None
    if cond.dtype.kind != "f" or isinstance(value, (str, bool)) or _has_bool(value):
        raise Invalid("cond", expected)
    if cond.ndim == 1:
        cond = cond[None]
    if cond.ndim != 2 or cond.shape[1] != d or cond.shape[0] < 1:
        raise Invalid("cond", f"has shape {cond.shape}: {expected}")
    if cond.shape[0] > max_videos:
        raise Invalid("cond", f"has {cond.shape[0]} rows: at most {max_videos} videos a request")
    cond = cond.astype(np.float32)
    if not np.isfinite(cond).all():
        raise Invalid("cond", "holds NaN or Inf (as float32): embeddings must be finite")
    return cond


def _numbers(value, field: str, expected: str) -> np.ndarray:
    """A nested JSON list of numbers (no booleans, no strings) as a float64 array, or Invalid naming ``field``."""
    if not isinstance(value, list) or _has_bool(value):
        raise Invalid(field, f"expected {expected}")
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):  # ragged or not numbers
        raise Invalid(field, f"expected {expected}") from None
    return a


def _has_bool(value) -> bool:
    if isinstance(value, bool):
        return True
    return isinstance(value, list) and any(_has_bool(v) for v in value)


def parse(body, pipe: Pipeline, *, max_videos: int = 16, can_mp4: bool | None = None) -> VideoRequest:
    """Check a ``POST /v1/videos`` body against the loaded pipeline.

    Raises:
        Invalid: the first bad field, named, with the CLI's wording.
    """
    if not isinstance(body, dict):
        raise Invalid(None, "the body must be a JSON object")
    unknown = sorted(set(body) - set(fields()))
    if unknown:
        raise Invalid(unknown[0], f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                                  f"(the fields are: {', '.join(fields())})")
    if body.get("prompt") is not None and body.get("cond") is not None:
        raise Invalid("cond", "pass either prompt or cond, not both")
    sampler = _choice(body, "sampler", list(SAMPLERS), DEFAULT_SAMPLER)
    T = len(pipe.betas)
    steps = _int(body, "steps", 1, T)
    seed = _int(body, "seed", 0, 2**63 - 1)
    cond_scale = _float(body, "cond_scale", default=1.0)
    if cond_scale != 1 and pipe.cond_dim is None:
        raise Invalid("cond_scale", f"{pipe.model_dir.name} is an unconditional model: guidance needs a "
                                    "conditioned one; leave the field out (or 1)")
    try:
        options = request_fields(body)
    except OptionError as e:
        raise Invalid(e.field, e.message) from None
    try:
        sampler_kwargs(sampler, steps or 1, options)
    except ValueError as e:
        field = next((k for k, v in options.items() if v is not None and k not in SAMPLERS[sampler].options), None)
        raise Invalid(field, str(e)) from None
    batch_size = _int(body, "batch_size", 1, max_videos, default=1)
    fmt = _choice(body, "format", list(FORMATS), "gif")
    if fmt == "mp4" and not (can_mp4 if can_mp4 is not None else mp4_available()):
        raise Invalid("format", "mp4 needs PyAV on the server (pip install 'vdeploy[video]'); "
                                "ask for gif or npy")
    fps = _float(body, "fps", lo=0.1, hi=100.0, default=1000 / 120)
    run_async = body.get("async", False)
    if not isinstance(run_async, bool):
        raise Invalid("async", f"{run_async!r} is not a valid boolean")
    kwargs = {"sampler": sampler, "steps": steps, "seed": seed, "cond_scale": cond_scale,
              **{k: v for k, v in options.items() if v is not None}}
    if body.get("prompt") is not None:
        prompt = _prompt(body["prompt"], pipe)
        if not isinstance(prompt, str) and len(prompt) > max_videos:
            raise Invalid("prompt", f"{len(prompt)} prompts: at most {max_videos} videos a request")
        kwargs["text"] = prompt
    elif body.get("cond") is not None:
        kwargs["cond"] = _cond(body["cond"], pipe, max_videos)
    if body.get("frames") is not None:
        frames = _numbers(body["frames"], "frames", "a nested list of numbers in [0, 1], (c, k, h, w) or (b, c, k, h, w)")
        kwargs["frames"] = frames.astype(np.float32)
    if body.get("known_mask") is not None:
        mask = body["known_mask"]
        if not isinstance(mask, list) or not mask or not all(
                isinstance(v, bool) or (isinstance(v, list) and v and all(isinstance(w, bool) for w in v)) for v in mask):
            raise Invalid("known_mask", "expected a list of booleans (f,) or a list of such lists (b, f)")
        kwargs["known_mask"] = np.asarray(mask, dtype=bool)
    resample = _int(body, "resample", 0, 100)
    if resample:
        kwargs["resample"] = resample
    conditioning = body.get("conditioning")
    if conditioning is not None:
        if conditioning not in CONDITIONING:
            raise Invalid("conditioning", f"{conditioning!r} is not one of {', '.join(CONDITIONING)}")
        kwargs["conditioning"] = conditioning
    rows = len(kwargs["text"]) if isinstance(kwargs.get("text"), list) else (
        kwargs["cond"].shape[0] if "cond" in kwargs else 1)
    if batch_size != 1 and rows not in (1, batch_size):
        raise Invalid("batch_size", f"{batch_size} does not match the {rows} rows of prompt/cond")
    kwargs["batch_size"] = batch_size
    return VideoRequest(kwargs, fmt, fps, run_async)


def fields() -> tuple[str, ...]:
    """Every field a request body may have: ``FIELDS`` and the samplers table's options."""
    return (*FIELDS, *sampler_options())


def mp4_available() -> bool:
    """PyAV importable (what ``save_mp4`` needs)."""
    return importlib.util.find_spec("av") is not None
