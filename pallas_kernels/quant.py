"""KV-cache quantization: the arithmetic that writes quantize with and reads dequantize with.

Three formats (LServe §5 runs an 8-bit KV cache with per-tensor static scales, as QServe's
checkpoints do; its paper also offers 4 bits):

- int8: symmetric with static scales (from a calibration pass or given by the user): one per
  (KV head, channel) of each layer's K and V (a single per-tensor scale, LServe's and QServe's
  choice, is the case of equal entries; a scale per head and channel lowers the keys' error
  about 3x on SmolLM2, whose keys have outlier channels): q = clip(round(x * (1 / scale)),
  -127, 127) as int8, and x ~ q * scale. Values beyond 127 scales are clipped, never wrapped;
  -128 is not used, so the range is symmetric.
- fp8: float8 e4m3 (finite, max 448; Hopper converts it natively) with the same static scales
  stretched to its range: x * (1 / scale), scale = int8 scale * 127 / 448, clipped to +-448
  and rounded to the nearest e4m3 (3 mantissa bits: a relative step of 1/8 to 1/16 wherever
  the value lies, where int8's step is one scale everywhere).
- int4: asymmetric per (token, KV head) over the head_dim channels, with a 16-bit (float16)
  scale and zero point: scale = (max - min) / 15, zero = min (both rounded to float16 first, so
  writer and reader use the same values), q = clip(round((x - zero) / scale), 0, 15), two
  values per byte along head_dim (channel 2i in the low nibble, 2i + 1 in the high one); a
  head_dim must be even. x ~ q * scale + zero.

Rounding is half to even (`jnp.round`, as NumPy's). Every function is plain jnp, usable inside
a kernel's body or a jitted step; `tests/test_quant.py` checks them against NumPy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KV_CACHE_DTYPES = ("auto", "int8", "int4", "fp8")
INT8_MAX = 127
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_DTYPE = jnp.float8_e4m3fn
INT4_LEVELS = 15  # q in [0, 15]


def pool_dtype(kv_cache_dtype: str, dtype=jnp.float32):
    """What a pool of `kv_cache_dtype` holds: int8, uint8 (two int4 values a byte),
    float8_e4m3fn, or the model's float `dtype` for "auto"."""
    return jnp.dtype({"int8": jnp.int8, "int4": jnp.uint8, "fp8": FP8_DTYPE}.get(
        kv_cache_dtype, dtype))


def static_scale(kv_cache_dtype: str, int8_scale: jax.Array) -> jax.Array:
    """The static per-channel scale a pool of `kv_cache_dtype` stores with ("int8" or "fp8"),
    from the calibrated int8 scale (absmax / 127): fp8 stretches it to e4m3's range."""
    if kv_cache_dtype == "fp8":
        return int8_scale * (INT8_MAX / FP8_MAX)
    return int8_scale


def quantize_scaled(x: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """x * (1 / scale) stored as `dtype`: int8 (`quantize_int8`) or float8_e4m3fn (clipped to
    +-448, rounded to the nearest e4m3)."""
    if jnp.dtype(dtype) == jnp.int8:
        return quantize_int8(x, scale)
    inverse = 1.0 / jnp.asarray(scale, jnp.float32)
    return jnp.clip(x.astype(jnp.float32) * inverse, -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)


def check_kv_cache_dtype(kv_cache_dtype: str, head_dim: int) -> str:
    """The KV cache dtype name, if it is one of KV_CACHE_DTYPES and fits the head_dim."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} must be one of {KV_CACHE_DTYPES}")
    if kv_cache_dtype == "int4" and head_dim % 2:
        raise ValueError(f"kv_cache_dtype='int4' packs two values per byte along head_dim; "
                         f"head_dim={head_dim} is odd")
    return kv_cache_dtype


def check_scale(name: str, scale) -> float:
    """A per-tensor int8 scale: a finite float > 0."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"{name}={scale!r} must be a number") from None
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"{name}={scale!r} must be finite and > 0")
    return value


def check_scales(name: str, scales, num_heads: int, head_dim: int) -> tuple:
    """int8 scales of one tensor: a number (one scale) or [num_heads][head_dim] numbers (one per
    head and channel), each finite and > 0; returned as nested tuples [num_heads][head_dim]."""
    if isinstance(scales, (int, float)) or (hasattr(scales, "shape") and not scales.shape):
        value = check_scale(name, scales)
        return tuple((value,) * head_dim for _ in range(num_heads))
    try:
        if isinstance(scales, (str, bytes)):
            raise TypeError
        rows = [list(row) for row in scales]
    except TypeError:
        raise TypeError(f"{name} must be a number or [{num_heads}][{head_dim}] numbers") from None
    if len(rows) != num_heads or any(len(r) != head_dim for r in rows):
        raise ValueError(f"{name} must be a number or [{num_heads}][{head_dim}] numbers")
    return tuple(tuple(check_scale(f"{name}[{h}][{c}]", x) for c, x in enumerate(r))
                 for h, r in enumerate(rows))


def quantize_int8(x: jax.Array, scale: jax.Array | float) -> jax.Array:
    """x (any float) times 1 / scale (in float32: a multiply, exact the same wherever it is
    computed, which a division is not under XLA's rewrites), rounded and clipped to
    [-127, 127], as int8."""
    inverse = 1.0 / jnp.asarray(scale, jnp.float32)
    q = jnp.round(x.astype(jnp.float32) * inverse)
    return jnp.clip(q, -INT8_MAX, INT8_MAX).astype(jnp.int8)


def dequantize_int8(q: jax.Array, scale: jax.Array | float,
                    dtype=jnp.float32) -> jax.Array:
    return (q.astype(jnp.float32) * jnp.asarray(scale, jnp.float32)).astype(dtype)


def int8_scale(absmax: jax.Array | float) -> jax.Array:
    """The symmetric scale that maps |x| <= absmax onto [-127, 127] (absmax 0: scale 1)."""
    absmax = jnp.asarray(absmax, jnp.float32)
    return jnp.where(absmax > 0, absmax / INT8_MAX, 1.0)


def dequantize_entries(pool: tuple, index: int, gather, expand) -> jax.Array:
    """Keys (`index` 0) or values (1) of a pool tuple at the entries `gather` picks:
    quantized pages dequantized to f32, float pages as they are stored.

    pool: (k, v) float pages, (k, v, k_scale, v_scale) int8 or fp8 pages, or (k, v, k_meta,
    v_meta, k_smooth, v_smooth) int4 pages (the formats `pooled_decode_attention` takes).
    `gather` maps a per-head paged array [H, P, S, X] to its entries [..., S, X] (it is applied
    to int4's (scale, zero) pairs too, so they follow their tokens); `expand(factor, entries)`
    shapes a per-(head, channel) factor [H, D] to broadcast against the entries."""
    x = gather(pool[index])
    if len(pool) == 2:
        return x
    if len(pool) == 4:
        return dequantize_int8(x, expand(pool[2 + index], x))
    meta = gather(pool[2 + index]).astype(jnp.float32)  # [..., S, 2]
    out = dequantize_int4(x, meta[..., 0], meta[..., 1])
    return out * expand(pool[4 + index], out).astype(jnp.float32)


def quantize_int4(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [..., D] (D even) -> (packed [..., D/2] uint8, scale [...] float16, zero [...]
    float16): asymmetric over the last axis (one token of one head)."""
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"int4 packing needs an even last axis, got {d}")
    x = x.astype(jnp.float32)
    lo, hi = jnp.min(x, axis=-1), jnp.max(x, axis=-1)
    scale = jnp.where(hi > lo, (hi - lo) / INT4_LEVELS, 1.0).astype(jnp.float16)
    zero = lo.astype(jnp.float16)
    s, z = scale.astype(jnp.float32)[..., None], zero.astype(jnp.float32)[..., None]
    q = jnp.clip(jnp.round((x - z) / s), 0, INT4_LEVELS).astype(jnp.uint8)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return packed, scale, zero


def unpack_int4(packed: jax.Array) -> jax.Array:
    """packed [..., D/2] uint8 -> q [..., D] uint8 in [0, 15] (low nibble first)."""
    low, high = packed & 0xF, packed >> 4
    return jnp.stack([low, high], axis=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def dequantize_int4(packed: jax.Array, scale: jax.Array, zero: jax.Array,
                    dtype=jnp.float32) -> jax.Array:
    """The inverse of `quantize_int4` (up to rounding): q * scale + zero, [..., D]."""
    q = unpack_int4(packed).astype(jnp.float32)
    out = q * scale.astype(jnp.float32)[..., None] + zero.astype(jnp.float32)[..., None]
    return out.astype(dtype)
