"""Integer-only requantization (RMSMPConfig(requant="fixed_point")): the arithmetic against
Python integers / fractions written here, and the torch reference layers against it."""

from fractions import Fraction

import numpy as np
import pytest

from tvm_rmsmp.quant.requant import multiplier_value, quantize_multiplier, quantize_multipliers, requantize


def _ref_pair(scale):
    """The (m, s) with 2^14 <= m < 2^15 nearest to scale, by search over s."""
    best = None
    for s in range(1, 64):
        m = round(Fraction(scale) * 2**s)
        if 2**14 <= m < 2**15:
            err = abs(Fraction(m, 2**s) - Fraction(scale))
            if best is None or err < best[0]:
                best = (err, m, s)
    return best[1], best[2]


def _ref_requant(x, m, s, qmin, qmax, zp=0):
    q = Fraction(x * m, 2**s) + Fraction(1, 2)
    q = q.numerator // q.denominator  # floor
    return min(max(q + zp, qmin), qmax)


def test_multiplier_is_the_nearest_15_bit_one():
    rng = np.random.default_rng(0)
    scales = np.concatenate([10.0 ** rng.uniform(-12, 4, 300), [1.0, 0.5, 0.25, 2**-20, 0.999999999, 1 - 2**-17]])
    m, s = quantize_multipliers(scales)
    for v, mi, si in zip(scales, m, s):
        rm, rs = _ref_pair(float(v))
        # ties between two neighbours (a power of two boundary) may pick either: same value
        assert Fraction(int(mi), 2 ** int(si)) == Fraction(rm, 2**rs), v
        assert abs(Fraction(int(mi), 2 ** int(si)) / Fraction(float(v)) - 1) <= Fraction(1, 2**15)
    assert multiplier_value(m, s).astype(np.float64).tolist() == [float(Fraction(int(a), 2 ** int(b)))
                                                                  for a, b in zip(m, s)]


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), 2.0**15, 2.0**-60])
def test_multiplier_refuses_bad_scales(bad):
    with pytest.raises(ValueError, match="scale"):
        quantize_multiplier(bad)


def test_requantize_matches_fractions_including_ties_and_saturation():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.integers(-2**31 + 1, 2**31, 400), rng.integers(-5000, 5000, 400),
                        [0, 1, -1, 2**31 - 1, -2**31 + 1]]).astype(np.int64)
    rows = 5
    x = x[: (x.size // rows) * rows].reshape(-1, rows)
    m, s = quantize_multipliers(10.0 ** rng.uniform(-9, 0, rows))
    for qmin, qmax, zp in ((-127, 127, 0), (0, 255, 0), (0, 255, 17)):
        got = requantize(x.astype(np.int32), m[None], s[None], qmin, qmax, zp)
        want = [[_ref_requant(int(v), int(m[j]), int(s[j]), qmin, qmax, zp) for j, v in enumerate(r)] for r in x]
        np.testing.assert_array_equal(got, np.array(want))
    # ties: x * m / 2^s exactly k + 1/2 rounds toward +infinity
    half = requantize(np.array([5, -5, 3, -3], np.int32), np.array(2**14), np.array(15), -127, 127)
    np.testing.assert_array_equal(half, [3, -2, 2, -1])  # 2.5 -> 3, -2.5 -> -2, 1.5 -> 2, -1.5 -> -1
    # saturation: unsigned clamps negatives to 0 (the folded ReLU)
    np.testing.assert_array_equal(requantize(np.array([-10**6, 10**6], np.int32), np.array(2**14), np.array(14), 0,
                                             255), [0, 255])


def test_requantize_refuses_float_input():
    with pytest.raises(TypeError, match="integer"):
        requantize(np.array([1.5]), np.array(2**14), np.array(15), -127, 127)
