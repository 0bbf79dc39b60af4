"""Level sets, encode/decode and the scheme registry (no TVM involved)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tvm_rmsmp.quant.schemes import Scheme, get_scheme, list_schemes, register_scheme, sp2_decode, sp2_encode


def test_sp2_4_levels_are_sums_of_two_powers_of_two():
    s = get_scheme("sp2_4")
    assert s.kind == "sp2" and s.bits == 4 and (s.m1, s.m2) == (2, 1)
    assert s.levels.tolist() == [-8, -6, -5, -4, -2, -1, 0, 1, 2, 4, 5, 6, 8]
    # Independent construction from the definition: 8 * (q1 + q2).
    q1 = [0, 1 / 2, 1 / 4, 1 / 8]
    q2 = [0, 1 / 2]
    mags = sorted({int(8 * (a + b)) for a in q1 for b in q2})
    assert mags == [0, 1, 2, 4, 5, 6, 8]
    assert s.divisor == 8


@pytest.mark.parametrize("name,qmax", [("fixed_4", 7), ("fixed_8", 127)])
def test_fixed_levels_are_symmetric_uniform(name, qmax):
    s = get_scheme(name)
    assert s.levels.tolist() == list(range(-qmax, qmax + 1))
    assert s.divisor == qmax


def test_registry_names_the_culprit():
    assert {"sp2_4", "fixed_4", "fixed_8"} <= set(list_schemes())
    with pytest.raises(KeyError, match="fixed_3x"):
        get_scheme("fixed_3x")
    with pytest.raises(ValueError, match="already registered"):
        register_scheme(Scheme("fixed_4", kind="fixed", bits=4))


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(kind="fixed", bits=9), "bits must be in"),
        (dict(kind="fixed", bits=1), "bits must be in"),
        (dict(kind="sp2", bits=5, m1=2, m2=1), "m1 \\+ m2 \\+ 1"),
        (dict(kind="float", bits=4), "kind must be"),
    ],
)
def test_bad_scheme_definitions_are_rejected(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        Scheme("bad", **kwargs)


def test_sp2_5_has_more_levels():
    s = Scheme("sp2_5_test", kind="sp2", bits=5, m1=2, m2=2)
    # q1, q2 in {0, 1/2, 1/4, 1/8}: 8 * sums
    mags = sorted({a + b for a in (0, 4, 2, 1) for b in (0, 4, 2, 1)})
    assert s.levels[s.levels >= 0].tolist() == mags


weights = hnp.arrays(
    np.float64,
    st.tuples(st.integers(1, 6), st.integers(1, 20)),
    elements=st.floats(-10, 10, allow_nan=False, allow_infinity=False),
)


@settings(max_examples=60, deadline=None)
@given(w=weights, name=st.sampled_from(["sp2_4", "fixed_4", "fixed_8"]))
def test_encode_gives_nearest_level(w, name):
    s = get_scheme(name)
    scale = s.choose_row_scale(w)
    w_int = s.encode(w, scale)
    assert set(np.unique(w_int)) <= set(s.levels.tolist())
    # nearest: no level is closer (up to ties)
    v = w / scale[:, None]
    best = np.abs(v[..., None] - s.levels[None, None, :]).min(axis=-1)
    assert np.allclose(np.abs(v - w_int), best, atol=1e-9)
    # symmetric: encode(-w) == -encode(w)
    assert np.array_equal(s.encode(-w, scale), -w_int)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(["sp2_4", "fixed_4", "fixed_8"]), data=st.data())
def test_decode_encode_round_trip(name, data):
    s = get_scheme(name)
    w_int = data.draw(hnp.arrays(np.int64, (3, 7), elements=st.sampled_from(s.levels.tolist())))
    scale = data.draw(hnp.arrays(np.float32, (3,), elements=st.floats(2**-10, 10, width=32)))
    assert np.array_equal(s.encode(s.decode(w_int, scale), scale), w_int)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_sp2_code_round_trip(data):
    s = get_scheme("sp2_4")
    w_int = data.draw(hnp.arrays(np.int64, (4, 9), elements=st.sampled_from(s.levels.tolist())))
    code = sp2_encode(w_int, s)
    assert code.dtype == np.uint8 and code.max() < 128
    assert np.array_equal(sp2_decode(code), w_int)


def test_sp2_encode_rejects_non_levels():
    with pytest.raises(ValueError, match="value 3 is not a level of scheme 'sp2_4'"):
        sp2_encode(np.array([[1, 3]]), get_scheme("sp2_4"))


def test_row_scale_reduces_error_versus_max_scaling():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 256))
    for name in ("sp2_4", "fixed_4"):
        s = get_scheme(name)
        opt = s.choose_row_scale(w)
        naive = (np.abs(w).max(axis=1) / s.divisor).astype(np.float32)
        err = lambda sc: ((w - s.decode(s.encode(w, sc), sc)) ** 2).sum()  # noqa: E731
        assert err(opt) < err(naive)


def test_quantize_keeps_all_zero_rows_exact():
    s = get_scheme("fixed_4")
    w_int, scale = s.quantize(np.zeros((2, 5)))
    assert not w_int.any() and np.all(scale > 0)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(["sp2_4", "fixed_4"]), data=st.data())
def test_nibble_codes_round_trip_and_pack_two_per_byte(name, data):
    from tvm_rmsmp.quant.schemes import nibble_codes, nibble_decode, pack_nibbles

    s = get_scheme(name)
    w_int = data.draw(hnp.arrays(np.int64, (3, data.draw(st.integers(1, 9))), elements=st.sampled_from(s.levels.tolist())))
    codes = nibble_codes(w_int, s)
    assert codes.max() < 16
    assert np.array_equal(nibble_decode(codes, s), w_int)
    packed = pack_nibbles(codes)
    assert packed.shape == (3, (w_int.shape[1] + 1) // 2)
    unpacked = np.stack([packed & 15, packed >> 4], axis=-1).reshape(3, -1)[:, : w_int.shape[1]]
    assert np.array_equal(unpacked, codes)


def test_8_bit_schemes_have_no_nibble_code():
    from tvm_rmsmp.quant.schemes import nibble_codes

    with pytest.raises(ValueError, match="8 bits"):
        nibble_codes(np.zeros((1, 2), np.int64), get_scheme("fixed_8"))


def test_table_lookup_encoding_equals_binary_search():
    from tvm_rmsmp.quant.schemes import _nearest_level, _nearest_level_search

    rng = np.random.default_rng(0)
    for name in ("sp2_4", "fixed_4", "fixed_8"):
        lv = get_scheme(name).levels
        m = int(lv.max())
        ties = np.arange(-4 * m - 8, 4 * m + 9) / 4.0  # every midpoint, exactly
        edge = [0.0, -0.0, 1e-300, -1e-300, np.nextafter(0.5, 1), np.nextafter(0.5, 0), 1e30, -1e30]
        v = np.concatenate([rng.uniform(-m - 3, m + 3, 20000), ties, edge])
        np.testing.assert_array_equal(_nearest_level(v, lv), _nearest_level_search(v, lv))


def test_unpack_nibbles_inverts_pack_nibbles():
    """Odd and even code counts come back as packed; asking for more codes than the bytes hold
    is an error."""
    from tvm_rmsmp.quant.schemes import pack_nibbles, unpack_nibbles

    rng = np.random.default_rng(0)
    for count in (1, 6, 7):
        codes = rng.integers(0, 16, size=(3, count)).astype(np.uint8)
        np.testing.assert_array_equal(unpack_nibbles(pack_nibbles(codes), count), codes)
    assert unpack_nibbles(np.zeros((0, 4), np.uint8), 7).shape == (0, 7)
    with pytest.raises(ValueError, match="at least 9 codes"):
        unpack_nibbles(np.zeros((2, 4), np.uint8), 9)
