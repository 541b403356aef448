"""Tolerances for comparisons with an external reference (diffusers' schedulers), derived, not tuned.

The reference and vdeploy compute the same recurrence in float32 from the same float64 alpha-bar table (the
tests hand diffusers the seed's table); neither is exact. The reference's own float32 round-off is measured
in the same test by running it twice, with the sample in float32 and in float64: ``r = max |ref32 - ref64|``.
vdeploy does the same float32 arithmetic per step or less (its per-step coefficients come precomputed from
float64), so its distance from the float64 run is its own round-off, of the order of r. The maximum of a round-off walk over a few thousand values fluctuates by about 2x
between inputs, so the tolerance is ``MARGIN = 4`` times r, plus a floor of one rounding (2 ulp of the
output's magnitude) per step for the cases where r happens to be tiny. The number is the reference's own,
so it follows the reference's version instead of being tuned to one of them.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

MARGIN = 4.0
ULP = float(np.finfo(np.float32).eps)


def reference_tolerance(run: Callable[[torch.dtype], np.ndarray], steps: int) -> tuple[np.ndarray, float, float]:
    """Run the reference in float32 and float64; return (its float64 output, the tolerance, its round-off r)."""
    ref32 = np.asarray(run(torch.float32), dtype=np.float64)
    ref64 = np.asarray(run(torch.float64), dtype=np.float64)
    roundoff = float(np.abs(ref32 - ref64).max())
    floor = 2 * ULP * steps * max(1.0, float(np.abs(ref64).max()))
    return ref64, MARGIN * roundoff + floor, roundoff


def assert_matches_reference(ours: np.ndarray, run: Callable[[torch.dtype], np.ndarray], steps: int) -> None:
    """``ours`` is within float32 round-off (as the reference itself measures it) of the reference's float64 run."""
    ref64, atol, roundoff = reference_tolerance(run, steps)
    err = float(np.abs(np.asarray(ours, dtype=np.float64) - ref64).max())
    assert err <= atol, (f"max abs error {err:.3e} from the reference's float64 run exceeds {atol:.3e} "
                         f"({MARGIN:g} x its own float32 round-off {roundoff:.3e} + {steps} steps x 2 ulp)")
