"""KV-cache quantization arithmetic (pallas_kernels/quant.py) against NumPy: int8 symmetric
(rounding half to even, clipping, never wrapping) and int4 per-token asymmetric (16-bit scale
and zero point, packing order, odd head dims refused); and the key statistics, which must stay
a float type whatever the pools hold."""

import jax.numpy as jnp
import numpy as np
import pytest

from models import kv_cache
from pallas_kernels import quant


def np_int8(x, scale):
    inverse = np.float32(1) / np.float32(scale)
    return np.clip(np.round(x.astype(np.float32) * inverse), -127, 127).astype(np.int8)


def np_int4(x):
    x = x.astype(np.float32)
    lo, hi = x.min(-1), x.max(-1)
    scale = np.where(hi > lo, (hi - lo) / 15, 1.0).astype(np.float16)
    zero = lo.astype(np.float16)
    q = np.clip(np.round((x - zero.astype(np.float32)[..., None])
                         / scale.astype(np.float32)[..., None]), 0, 15).astype(np.uint8)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return packed, scale, zero, q


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_int8_round_trip_matches_numpy(seed, dtype):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(3, 5, 8, 24)) * 2).astype(np.float32)
    x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))
    scale = float(quant.int8_scale(np.abs(x).max() * 0.6))  # some values clip
    q = np.asarray(quant.quantize_int8(jnp.asarray(x, dtype), scale))
    assert q.dtype == np.int8
    np.testing.assert_array_equal(q, np_int8(x, scale))
    assert q.min() == -127 and q.max() == 127  # clipped at both ends, -128 unused
    back = np.asarray(quant.dequantize_int8(jnp.asarray(q), scale))
    inside = np.abs(x) <= 127 * scale
    assert np.abs(back - x)[inside].max() <= scale / 2 + 1e-6
    np.testing.assert_array_equal(np.sign(back[~inside]), np.sign(x[~inside]))  # not wrapped


def test_int8_rounds_half_to_even_and_never_wraps():
    x = jnp.array([0.5, 1.5, 2.5, -0.5, -2.5, 1e6, -1e6, 126.5, 127.49], jnp.float32)
    assert np.asarray(quant.quantize_int8(x, 1.0)).tolist() == [0, 2, 2, 0, -2, 127, -127,
                                                                126, 127]
    assert float(quant.int8_scale(0.0)) == 1.0
    assert float(quant.int8_scale(254.0)) == 2.0


def test_fp8_matches_ml_dtypes_and_clips_to_its_range():
    """fp8 pages: x / scale rounded to the nearest float8_e4m3fn (as ml_dtypes casts), clipped
    to +-448 (e4m3fn has no infinity: a plain cast past it would give NaN), with the int8
    scale stretched by 127 / 448."""
    import ml_dtypes

    rng = np.random.default_rng(3)
    x = (rng.normal(size=(4, 64)) * 20).astype(np.float32)
    x[0, :3] = [1e6, -1e6, 0.0]
    scale = np.float32(0.05)
    got = np.asarray(quant.quantize_scaled(jnp.asarray(x), scale, quant.FP8_DTYPE))
    assert got.dtype == ml_dtypes.float8_e4m3fn
    want = np.clip(x * (np.float32(1) / scale), -448, 448).astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32))
    assert got[0, :3].astype(np.float32).tolist() == [448.0, -448.0, 0.0]
    back = got.astype(np.float32) * scale
    inside = np.abs(x) <= 448 * scale
    assert (np.abs(back - x)[inside] <= np.abs(x)[inside] / 16 + 2.0**-9 * scale).all()
    np.testing.assert_allclose(float(quant.static_scale("fp8", jnp.float32(448.0))), 127.0)
    assert quant.pool_dtype("fp8") == jnp.float8_e4m3fn


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_int4_round_trip_and_packing_match_numpy(seed):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(2, 7, 16)) * 3 + rng.normal(size=(2, 7, 1)) * 5).astype(np.float32)
    x[0, 0] = 1.25  # a constant token: scale 1, every value at the zero point
    packed, scale, zero = (np.asarray(a) for a in quant.quantize_int4(jnp.asarray(x)))
    want_packed, want_scale, want_zero, want_q = np_int4(x)
    assert packed.dtype == np.uint8 and packed.shape == (2, 7, 8)
    assert scale.dtype == zero.dtype == np.float16
    np.testing.assert_array_equal(scale, want_scale)
    np.testing.assert_array_equal(zero, want_zero)
    np.testing.assert_array_equal(packed, want_packed)
    np.testing.assert_array_equal(np.asarray(quant.unpack_int4(jnp.asarray(packed))), want_q)
    assert (packed[..., 0] & 0xF).tolist() == want_q[..., 0].tolist()  # channel 0: low nibble
    back = np.asarray(quant.dequantize_int4(*(jnp.asarray(a) for a in (packed, scale, zero))))
    step = want_scale.astype(np.float32)[..., None]
    assert (np.abs(back - x) <= step / 2 + 1e-2 * step + 1e-3).all()
    np.testing.assert_allclose(back[0, 0], 1.25, atol=1e-3)


def test_int4_needs_an_even_head_dim_and_dtypes_are_checked():
    with pytest.raises(ValueError, match="even"):
        quant.quantize_int4(jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="odd"):
        quant.check_kv_cache_dtype("int4", 63)
    with pytest.raises(ValueError, match="must be one of"):
        quant.check_kv_cache_dtype("int3", 64)
    assert quant.check_kv_cache_dtype("int8", 63) == "int8"
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            quant.check_scale("k_scale", bad)
    with pytest.raises(TypeError):
        quant.check_scale("k_scale", "big")


def spec(dtype):
    return kv_cache.KVCacheSpec(num_layers=1, num_kv_heads=2, head_dim=8, num_pages=4,
                                page_size=8, max_seqs=2, max_pages_per_seq=2, dtype=dtype,
                                logical_page_size=4)


def test_key_statistics_stay_a_float_type():
    for dtype in ("float32", "bfloat16"):
        cache = kv_cache.init_cache(spec(dtype))
        assert cache.kmax[0].dtype == jnp.dtype(dtype)
        assert float(cache.kmax[0].max()) == -np.inf and float(cache.kmin[0].min()) == np.inf
    for dtype in ("int8", "uint8", "int32"):  # a cast would wrap and break the statistics
        with pytest.raises(ValueError, match="quantized"):
            spec(dtype)
