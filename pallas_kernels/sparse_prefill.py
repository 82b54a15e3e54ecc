"""Unified sparse prefill attention: dense and streaming heads in one launch (LServe §4).

LServe (arXiv 2502.14866, §3 and §4.1) runs causal prefill attention over all heads in a single
kernel and lets each KV head pick its loop from an int32 flag:

- dense heads visit every causal key tile;
- streaming heads (DuoAttention's Λ mask) visit only the sink tiles and the local-window tiles, so
  their cost is linear in the prompt length.

Key j is visible to query i iff `j <= i and j < seq_len`, and for a streaming head additionally
`j < sink_tokens or j > i - local_tokens` (the local window includes the current token).

Layers: `_kernel` (one query tile of one query head) -> `_pallas_prefill` (grid and BlockSpecs) ->
`sparse_prefill_attention` (the public jitted op, `impl="triton" | "xla"`). The plain-jnp
`sparse_prefill_attention_reference` is the XLA path and the oracle of the tests.

Shapes: B batch, T tokens, Hq query heads, Hkv KV heads, G = Hq // Hkv, D head dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.impls import check_impl

# Finite stand-in for -inf on masked logits: keeps the running max finite, so `m_prev - m_next`
# is never `-inf - -inf = nan` (same choice as jax/experimental/pallas/ops/gpu/attention.py).
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_LOG2E = math.log2(math.e)
# Query and key rows per block of the XLA reference: bounds its scores to [B, Hq, 256, 256].
_REFERENCE_BLOCK = 256
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def prefill_mask(q_pos, k_pos, streaming, *, sink_tokens: int, local_tokens: int):
    """Visibility of key `k_pos` to query `q_pos` (broadcasting): causal, plus the Λ mask where
    `streaming` is true. Sequence lengths are not applied here."""
    lam = (k_pos < sink_tokens) | (k_pos > q_pos - local_tokens)
    return (k_pos <= q_pos) & (lam | jnp.logical_not(streaming))


def default_prefill_config(head_dim: int, dtype=jnp.bfloat16) -> dict:
    """Default tiles and launch settings per (padded) head_dim; starting points for H100 tuning.

    16-bit inputs: 128x64 tiles keep the f32 accumulator plus a K/V tile in registers/shared memory
    for D <= 128; D=128 needs 8 warps to hold the [128, 128] f32 accumulator without spilling.
    f32 inputs (tests) use IEEE FMA dots with twice the bytes per tile: smaller tiles, 2 stages.
    """
    d = _padded_head_dim(head_dim)
    if jnp.dtype(dtype).itemsize == 4:
        return dict(block_q=64, block_k=32, num_warps=4, num_stages=2)
    if d <= 64:
        return dict(block_q=128, block_k=64, num_warps=4, num_stages=3)
    if d <= 128:
        return dict(block_q=128, block_k=64, num_warps=8, num_stages=3)
    return dict(block_q=64, block_k=32, num_warps=4, num_stages=2)


def _padded_head_dim(head_dim: int) -> int:
    # Triton tiles must be powers of two, and tl.dot wants K >= 16.
    return max(16, pl.next_power_of_2(head_dim))


def _tile_plan(q_start, seq_len, sink, window, *, block_q, block_k, div, xp):
    """The key tiles one query tile [q_start, q_start + block_q) visits, as six bounds.

    The visited tiles are: [0, sink_full) sink tiles needing no mask, [sink_full, sink_end) sink
    tiles needing the mask, [local_lo, mid_lo) local-window start tiles (masked), [mid_lo, mid_hi)
    interior tiles (no mask), [mid_hi, end) diagonal and seq_len tail tiles (masked). A dense head
    is the special case sink = 0, window >= T (everything before the diagonal is interior).
    The sink range stops where the local range starts, so no tile is visited twice (LServe §4.1).

    Works on traced int32 scalars inside the kernel (`div=lax.div, xp=jnp`) and on NumPy arrays
    on the host (`div=np.floor_divide, xp=np`); all dividends are >= 0, so both divisions agree.
    """
    cdiv = lambda a, b: div(a + b - 1, b)
    q_last = q_start + block_q - 1
    # Causal and length bound; a query tile entirely past seq_len visits nothing.
    end = xp.minimum(cdiv(q_last + 1, block_k), cdiv(seq_len, block_k))
    end = xp.where(q_start < seq_len, end, xp.zeros_like(end))
    # Tiles whose every key is causal-visible to the first query row and inside seq_len.
    num_full = xp.minimum(xp.minimum(div(q_start + 1, block_k), div(seq_len, block_k)), end)
    sink_end = xp.minimum(cdiv(sink, block_k), end)
    sink_full = xp.minimum(div(sink, block_k), xp.minimum(num_full, sink_end))
    # First tile of the window of the first query row, after the sink tiles.
    window_lo = div(xp.maximum(q_start - window + 1, 0), block_k)
    local_lo = xp.minimum(xp.maximum(window_lo, cdiv(sink, block_k)), end)
    # Tiles from here on are inside the window of the last query row, hence of every row.
    in_window = cdiv(xp.maximum(q_last - window + 1, 0), block_k)
    mid_lo = xp.minimum(xp.maximum(local_lo, in_window), end)
    mid_hi = xp.maximum(xp.minimum(num_full, end), mid_lo)
    return sink_full, sink_end, local_lo, mid_lo, mid_hi, end


def prefill_tile_counts(T: int, streaming, sink_tokens: int, local_tokens: int,
                        block_q: int, block_k: int) -> tuple[int, int]:
    """(q-tile, k-tile) pairs the kernel computes for a full-length sequence of T tokens.

    Returns `(dense_pairs, streaming_pairs)`: each summed over the KV heads of that kind in
    `streaming` [Hkv], for one query head per KV head and one sequence. Total work of a launch is
    `B * G * (dense_pairs + streaming_pairs)` tiles of `4 * block_q * block_k * D` FLOPs.
    """
    flags = np.asarray(streaming).astype(bool)
    t_pad = _round_up(T, max(block_q, block_k))
    q_starts = np.arange(0, t_pad, block_q)
    counts = []
    for sink, window in ((0, t_pad), (min(sink_tokens, t_pad), min(local_tokens, t_pad))):
        _, sink_end, local_lo, _, _, end = _tile_plan(
            q_starts, T, sink, window, block_q=block_q, block_k=block_k,
            div=np.floor_divide, xp=np)
        counts.append(int(np.sum(sink_end + end - local_lo)))
    return int(np.sum(~flags)) * counts[0], int(np.sum(flags)) * counts[1]


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _kernel(streaming_ref, seq_len_ref, q_ref, k_ref, v_ref, o_ref, *, sm_scale, sink_tokens,
            local_tokens, block_q, block_k, num_q_blocks):
    """One query tile of one query head.

    streaming_ref, seq_len_ref [1] int32; q_ref, o_ref [block_q, Dp]; k_ref, v_ref [T_pad, Dp]
    (the whole sequence of this head's KV head: Triton blocks are only pointers, nothing is
    copied).
    """
    t_pad = k_ref.shape[0]
    # Heavy (late) query tiles are launched first: better tail balance for causal work.
    q_start = (num_q_blocks - 1 - pl.program_id(1)) * block_q
    seq_len = seq_len_ref[0]
    is_streaming = streaming_ref[0] != 0
    # A dense head is a streaming head with no sink and a window covering the whole sequence.
    # (Typed constants: Triton's scalar select lowering gives weak-typed literals the i1 type.)
    sink = jnp.where(is_streaming, np.int32(sink_tokens), np.int32(0))
    window = jnp.where(is_streaming, np.int32(local_tokens), np.int32(t_pad))
    ranges = _tile_plan(q_start, seq_len, sink, window, block_q=block_q, block_k=block_k,
                        div=lax.div, xp=jnp)
    sink_full, sink_end, local_lo, mid_lo, mid_hi, end = ranges

    q = q_ref[...]
    # f32 inputs: IEEE dots (Triton's default is TF32, too coarse for the f32 tolerances).
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)

    def visit(lo, hi, carry, masked):
        """Online-softmax update over the key tiles [lo, hi). One plain loop per contiguous
        range keeps the tile address affine in the loop index, which Triton pipelines."""
        def body(tile, carry):
            acc, m_prev, l_prev = carry
            k_start = pl.multiple_of(tile * block_k, block_k)
            k = k_ref[pl.ds(k_start, block_k), :]
            # [block_q, Dp] x [block_k, Dp] -> [block_q, block_k], logits in base 2.
            s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                                preferred_element_type=jnp.float32) * (sm_scale * _LOG2E)
            if masked:  # boundary tiles only; interior tiles skip this work (LServe §4.1)
                k_pos = k_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
                visible = ((k_pos <= q_pos) & (k_pos < seq_len)
                           & ((k_pos < sink) | (k_pos > q_pos - window)))
                s = jnp.where(visible, s, _MASK_VALUE)
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
            correction = jnp.exp2(m_prev - m_next)
            p = jnp.exp2(s - m_next[:, None])
            if masked:  # a row with no visible key so far must keep l = 0, not count masks
                p = jnp.where(visible, p, 0.0)
            l_next = correction * l_prev + jnp.sum(p, axis=1)
            v = v_ref[pl.ds(k_start, block_k), :]
            # [block_q, block_k] x [block_k, Dp] -> [block_q, Dp]
            pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                 precision=precision, preferred_element_type=jnp.float32)
            return correction[:, None] * acc + pv, m_next, l_next

        return lax.fori_loop(lo, hi, body, carry)

    carry = (jnp.zeros(q.shape, jnp.float32),
             jnp.full((block_q,), -jnp.inf, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))
    # The online softmax is order-independent: interior tiles first, then the boundary tiles.
    carry = visit(0, sink_full, carry, masked=False)
    carry = visit(mid_lo, mid_hi, carry, masked=False)
    for lo, hi in ((sink_full, sink_end), (local_lo, mid_lo), (mid_hi, end)):
        carry = visit(lo, hi, carry, masked=True)
    acc, _, l = carry
    # Query rows past seq_len may have seen no key: l = 0, acc = 0 -> output 0, never nan.
    l = jnp.where(l == 0.0, 1.0, l)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)


def _pallas_prefill(q, k, v, streaming, seq_lens, *, sm_scale, sink_tokens, local_tokens,
                    block_q, block_k, num_warps, num_stages, interpret):
    """Grid and BlockSpecs. q [B, Tp, Hq, Dp], k/v [B, Tp, Hkv, Dp] with Tp a multiple of both
    block sizes and Dp a power of two; streaming [Hkv] int32; seq_lens [B] int32."""
    batch, t_pad, num_q_heads, d_pad = q.shape
    group = num_q_heads // k.shape[2]
    num_q_blocks = t_pad // block_q
    # Query heads on the fastest grid axis: the heads of one GQA group run side by side and share
    # their K/V tiles through L2; the KV head comes from the index map, K/V are never repeated.
    grid = (num_q_heads, num_q_blocks, batch)
    q_map = lambda h, i, b: (b, num_q_blocks - 1 - i, h, 0)
    kv_map = lambda h, i, b: (b, 0, lax.div(h, group), 0)
    kernel = functools.partial(
        _kernel, sm_scale=sm_scale, sink_tokens=sink_tokens, local_tokens=local_tokens,
        block_q=block_q, block_k=block_k, num_q_blocks=num_q_blocks)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            pl.BlockSpec((1,), lambda h, i, b: (lax.div(h, group),)),  # flag of the KV head
            pl.BlockSpec((1,), lambda h, i, b: (b,)),  # seq_len
            pl.BlockSpec((None, block_q, None, d_pad), q_map),
            pl.BlockSpec((None, t_pad, None, d_pad), kv_map),
            pl.BlockSpec((None, t_pad, None, d_pad), kv_map),
        ],
        out_specs=pl.BlockSpec((None, block_q, None, d_pad), q_map),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="sparse_prefill_attention",
    )(streaming, seq_lens, q, k, v)


def sparse_prefill_attention_reference(q, k, v, streaming, *, sink_tokens, local_tokens,
                                       seq_lens=None, sm_scale=None):
    """Plain-jnp reference and CPU path: same contract as `sparse_prefill_attention`.

    Flash-style over [256 x 256] blocks: `lax.map` over query blocks, `lax.scan` over key blocks
    with an online softmax in f32, and `lax.cond` skipping key blocks no head of the batch can
    see (past the diagonal or the longest sequence; outside sink and window when every head
    streams). Scores are [B, Hkv, G * 256, 256], never T x T. Heads lead every operand so each
    einsum is a plain batched matmul (fast on CPU).
    """
    batch, t, num_q_heads, d = q.shape
    num_kv_heads = k.shape[2]
    group = num_q_heads // num_kv_heads
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    seq_lens = jnp.full((batch,), t, jnp.int32) if seq_lens is None else seq_lens
    block = min(_REFERENCE_BLOCK, t)
    num_blocks = _round_up(t, block) // block
    pad = ((0, 0), (0, num_blocks * block - t), (0, 0), (0, 0))
    # q [B, Tp, Hq, D] -> [nb, B, Hkv, G * block, D] (query head h = kv_head * G + g, row m =
    # g * block + position); k, v [B, Tp, Hkv, D] -> [nb, B, Hkv, block, D].
    qb = jnp.pad(q, pad).reshape(batch, num_blocks, block, num_kv_heads, group, d)
    qb = qb.transpose(1, 0, 3, 4, 2, 5).reshape(num_blocks, batch, num_kv_heads, group * block, d)
    kb, vb = (jnp.pad(x, pad).reshape(batch, num_blocks, block, num_kv_heads, d)
              .transpose(1, 0, 3, 2, 4) for x in (k, v))
    flags = streaming.astype(bool)[None, :, None, None]  # [1, Hkv, 1, 1]
    all_streaming = jnp.all(streaming.astype(bool))
    max_len = jnp.max(seq_lens)
    hi = lax.Precision.HIGHEST

    def query_block(args):
        q_blk, i = args
        q_pos = jnp.tile(i * block + jnp.arange(block), group)[:, None]  # [G * block, 1]

        def key_block(carry, j):
            def update(carry):
                acc, m, l = carry
                k_pos = j * block + jnp.arange(block)
                # [b,k,m,d] x [b,k,s,d] -> [b,k,m,s]
                s = jnp.einsum("bkmd,bksd->bkms", q_blk, kb[j], precision=hi,
                               preferred_element_type=jnp.float32) * sm_scale
                visible = prefill_mask(q_pos, k_pos, flags, sink_tokens=sink_tokens,
                                       local_tokens=local_tokens)
                visible &= k_pos < seq_lens[:, None, None, None]  # [B, Hkv, G * block, block]
                s = jnp.where(visible, s, -jnp.inf)
                m_next = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
                m_safe = jnp.where(jnp.isfinite(m_next), m_next, 0.0)  # no key seen yet: 0
                p = jnp.exp(s - m_safe)
                correction = jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe)
                # [b,k,m,s] x [b,k,s,d] -> [b,k,m,d]
                pv = jnp.einsum("bkms,bksd->bkmd", p.astype(v.dtype), vb[j], precision=hi,
                                preferred_element_type=jnp.float32)
                return (acc * correction + pv, m_next,
                        l * correction + jnp.sum(p, axis=-1, keepdims=True))

            k_lo, q_lo, q_hi = j * block, i * block, i * block + block - 1
            in_lambda = (k_lo < sink_tokens) | (k_lo + block - 1 > q_lo - local_tokens)
            needed = (k_lo <= q_hi) & (k_lo < max_len) & (in_lambda | ~all_streaming)
            return lax.cond(needed, update, lambda c: c, carry), None

        rows = q_blk.shape[:-1]
        init = (jnp.zeros(rows + (d,), jnp.float32), jnp.full(rows + (1,), -jnp.inf),
                jnp.zeros(rows + (1,), jnp.float32))
        (acc, _, l), _ = lax.scan(key_block, init, jnp.arange(num_blocks))
        return acc / jnp.where(l == 0.0, 1.0, l)  # rows with no visible key: output 0

    out = lax.map(query_block, (qb, jnp.arange(num_blocks)))
    # [nb, B, Hkv, G * block, D] -> [B, Tp, Hq, D]
    out = out.reshape(num_blocks, batch, num_kv_heads, group, block, d)
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(batch, num_blocks * block, num_q_heads, d)
    return out[:, :t].astype(q.dtype)


def _validate(q, k, v, streaming, seq_lens, sink_tokens, local_tokens, impl):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got {q.shape=} {k.shape=} {v.shape=}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {k.shape=} {v.shape=}")
    batch, t, num_q_heads, d = q.shape
    if k.shape[0] != batch or k.shape[1] != t or k.shape[3] != d:
        raise ValueError(f"k/v {k.shape} must be [B={batch}, T={t}, Hkv, D={d}] like {q.shape=}")
    num_kv_heads = k.shape[2]
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads=} must be a multiple of {num_kv_heads=}")
    if not (q.dtype == k.dtype == v.dtype) or jnp.dtype(q.dtype) not in _DTYPES:
        raise ValueError(f"q, k, v must share one of float32/bfloat16/float16; got "
                         f"{q.dtype=} {k.dtype=} {v.dtype=}")
    if streaming.shape != (num_kv_heads,):
        raise ValueError(f"{streaming.shape=} must be [Hkv={num_kv_heads}]")
    if not (streaming.dtype == jnp.bool_ or jnp.issubdtype(streaming.dtype, jnp.integer)):
        raise ValueError(f"{streaming.dtype=} must be bool or integer")
    if seq_lens is not None and (seq_lens.shape != (batch,)
                                 or not jnp.issubdtype(seq_lens.dtype, jnp.integer)):
        raise ValueError(f"seq_lens must be int [B={batch}]; got {seq_lens.shape} {seq_lens.dtype}")
    if sink_tokens < 0:
        raise ValueError(f"{sink_tokens=} must be >= 0")
    if local_tokens < 1:
        raise ValueError(f"{local_tokens=} must be >= 1 (the window includes the current token)")


@functools.partial(jax.jit, static_argnames=(
    "sink_tokens", "local_tokens", "sm_scale", "impl", "interpret", "block_q", "block_k",
    "num_warps", "num_stages"))
def sparse_prefill_attention(q, k, v, streaming, *, sink_tokens, local_tokens, seq_lens=None,
                             sm_scale=None, impl="triton", interpret=False, block_q=None,
                             block_k=None, num_warps=None, num_stages=None):
    """Causal prefill attention with per-KV-head dense/streaming (Λ) masks, one launch.

    Args:
      q: [B, T, Hq, D]; k, v: [B, T, Hkv, D], Hq % Hkv == 0 (query head h uses KV head h // G).
        float32, bfloat16 or float16, all the same.
      streaming: [Hkv] bool/int, nonzero = streaming head (sink + local window only).
      sink_tokens (>= 0), local_tokens (>= 1): the Λ mask of streaming heads (LServe §4).
      seq_lens: [B] int32 lengths of right-padded prompts (None: all T). Rows past a length are
        don't-care but finite.
      sm_scale: logit scale, default 1/sqrt(D).
      impl: "triton" (the kernel) or "xla" (blockwise jnp reference, the CPU path);
        "mosaic" is not written yet.
      interpret: run the Pallas kernel in interpret mode (CPU testing).
      block_q, block_k, num_warps, num_stages: kernel tiling overrides (powers of two >= 16 for
        the blocks); defaults from `default_prefill_config(D, dtype)`.

    Returns:
      [B, T, Hq, D] in q's dtype.
    """
    impl = check_impl(impl, "sparse_prefill_attention")
    _validate(q, k, v, streaming, seq_lens, sink_tokens, local_tokens, impl)
    batch, t, _, d = q.shape
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    seq_lens = (jnp.full((batch,), t, jnp.int32) if seq_lens is None
                else jnp.clip(seq_lens.astype(jnp.int32), 0, t))
    if impl == "xla":
        return sparse_prefill_attention_reference(
            q, k, v, streaming, sink_tokens=sink_tokens, local_tokens=local_tokens,
            seq_lens=seq_lens, sm_scale=sm_scale)

    config = default_prefill_config(d, q.dtype)
    # Default tiles shrink for short prompts, so tiny inputs are not padded to 128 rows.
    short = max(16, pl.next_power_of_2(t))
    block_q = min(config["block_q"], short) if block_q is None else block_q
    block_k = min(config["block_k"], short) if block_k is None else block_k
    for name, size in (("block_q", block_q), ("block_k", block_k)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name}={size} must be a power of two >= 16")
    num_warps = config["num_warps"] if num_warps is None else num_warps
    num_stages = config["num_stages"] if num_stages is None else num_stages

    # Pad T to whole tiles (padded keys are masked by seq_len <= T) and D to a power of two
    # (zero columns leave q.k unchanged and give zero output columns, sliced off below).
    t_pad = _round_up(t, max(block_q, block_k))
    d_pad = _padded_head_dim(d)
    if not interpret and batch * t_pad * q.shape[2] * d_pad >= 2**31:
        raise ValueError(f"{q.shape=} pads to >= 2**31 elements, but Triton pointer offsets are "
                         "int32: split the batch")
    pad = ((0, 0), (0, t_pad - t), (0, 0), (0, d_pad - d))
    out = _pallas_prefill(
        jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad), streaming.astype(jnp.int32),
        seq_lens, sm_scale=sm_scale, sink_tokens=min(sink_tokens, t_pad),
        local_tokens=min(local_tokens, t_pad), block_q=block_q, block_k=block_k,
        num_warps=num_warps, num_stages=num_stages, interpret=interpret)
    return out[:, :t, :, :d]
