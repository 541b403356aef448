"""CFG rescale (``runtime.steps.combine_guidance(..., rescale)`` and ``guided(..., rescale)``): off by default and
then exactly the plain combination; at phi = 1 the guided output has the conditional output's spread per sample."""

from __future__ import annotations

import numpy as np
import pytest

from vdeploy.runtime.steps import combine_guidance, guided


def _outputs(seed=0):
    rng = np.random.default_rng(seed)
    cond = rng.standard_normal((2, 3, 4, 8, 8), dtype=np.float32)
    null = rng.standard_normal((2, 3, 4, 8, 8), dtype=np.float32) * np.float32(0.5)
    return cond, null


def test_rescale_off_is_the_plain_combination_bit_for_bit():
    cond, null = _outputs()
    plain = null + (cond - null) * 4.0
    assert np.array_equal(combine_guidance(cond, null, 4.0), plain)
    assert np.array_equal(combine_guidance(cond, null, 4.0, rescale=0.0), plain)


def test_full_rescale_matches_the_conditional_spread_and_keeps_the_direction():
    cond, null = _outputs()
    plain = combine_guidance(cond, null, 4.0)
    out = combine_guidance(cond, null, 4.0, rescale=1.0)
    assert out.dtype == np.float32
    # float32 std over 768 values: relative round-off ~1e-6; 1e-5 leaves margin
    np.testing.assert_allclose(out.std(axis=(1, 2, 3, 4)), cond.std(axis=(1, 2, 3, 4)), rtol=1e-5)
    for row in range(2):  # each row only scaled (by a positive factor < 1: guidance at 4 widened it)
        k = float(out[row].ravel() @ plain[row].ravel() / (plain[row].ravel() @ plain[row].ravel()))
        assert 0 < k < 1
        np.testing.assert_allclose(out[row], k * plain[row], rtol=1e-5, atol=1e-6)


def test_partial_rescale_mixes_rescaled_and_plain():
    cond, null = _outputs(1)
    full, plain = combine_guidance(cond, null, 3.0, rescale=1.0), combine_guidance(cond, null, 3.0)
    np.testing.assert_allclose(combine_guidance(cond, null, 3.0, rescale=0.7), 0.7 * full + 0.3 * plain,
                               rtol=1e-5, atol=1e-6)


def test_guided_denoiser_passes_rescale_and_refuses_bad_values():
    cond, null = _outputs(2)
    null_cond = np.zeros(5, np.float32)

    def denoise(x, t, c):  # the conditional rows return cond, the null-embedding rows null
        return cond if np.any(c) else null

    run = guided(denoise, null_cond, 2.0, rescale=0.7)
    got = run(cond, np.zeros(2, np.int64), np.ones((2, 5), np.float32))
    np.testing.assert_array_equal(got, combine_guidance(cond, null, 2.0, rescale=0.7))
    for bad in (-0.1, 1.5, float("nan"), True, "0.7"):
        with pytest.raises(ValueError, match="rescale"):
            guided(denoise, null_cond, 2.0, rescale=bad)
        with pytest.raises(ValueError, match="rescale"):
            combine_guidance(cond, null, 2.0, rescale=bad)
