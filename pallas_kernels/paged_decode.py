"""Paged decode attention over per-head lists of page ranges, split-K (DESIGN §1.3, §1.4 step 3).

One decode step attends each query row to the keys named by a list of page entries. Entry i of
list (b, h) contributes the keys at offsets `lo <= o < hi` of physical page `pages[b, h, i]`, so a
single op serves every head kind of LServe (arXiv 2502.14866, §4.2 and §4.3):

- dense heads, per-KV-head selection: one list per KV head, its G query heads share the pages
  (H = Hkv, G = group size): each selected page is loaded once for the whole group;
- dense heads, per-query-head selection as in LServe/Quest: H = Hq lists of G = 1 row;
- streaming heads: sink pages plus the ring, whose oldest page holds a suffix [x, S) of the window
  and newest page a prefix [0, y) (H = Hkv streaming heads, G = group size).

Entries with `hi <= lo` are padding and are skipped. The key order does not matter to softmax, so
page lists can be in any order.

The kernel is flash-decoding (split-K): program (b, h, split) reduces a contiguous run of entries
to a partial (unnormalised output, running max, sum of exponentials); `_merge_splits` combines the
splits with a log-sum-exp merge in plain jnp. Splitting the entry list fills the GPU when B * H is
small (one decode token, few heads), which is the common case for decode.

Layers: `_kernel` (one run of entries of one list) -> `_pallas_paged_decode` (grid and BlockSpecs)
-> `paged_decode_attention` (public jitted op, `impl="pallas" | "xla"`). The plain-jnp
`paged_decode_attention_reference` is the XLA path (the CPU decode path) and the tests' oracle.

Shapes: B batch, H page lists, G query rows per list, Hkv KV heads (list h reads KV head
h // (H // Hkv)), P pages in the pool (page 0 is the null page), S page size, K entries per list,
D head dim; Gp, Dp the padded tile sizes.
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

# Finite stand-in for -inf on masked logits: keeps the running max finite, so `m_prev - m_next`
# is never `-inf - -inf = nan` (same choice as jax/experimental/pallas/ops/gpu/attention.py).
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_LOG2E = math.log2(math.e)
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Streaming multiprocessors of an H100 SXM; the default split count aims at two programs per SM.
_H100_SMS = 132


def _padded_size(n: int) -> int:
    # Triton tiles must be powers of two, and tl.dot wants M, N, K >= 16.
    return max(16, pl.next_power_of_2(n))


def default_num_splits(batch: int, num_lists: int, num_entries: int) -> int:
    """Split count when `num_splits=None`: enough programs to fill an H100, none of them empty.

    A decode launch has only B * H programs without splitting; ask for ceil(2 * 132 / (B * H))
    splits (two programs per SM hide one program's tail), clamped to [1, K]. The result then goes
    through `_effective_num_splits`, so no split is left without an entry.
    """
    splits = -(-2 * _H100_SMS // max(1, batch * num_lists))
    return _effective_num_splits(min(max(splits, 1), max(num_entries, 1)), num_entries)


def _effective_num_splits(num_splits: int, num_entries: int) -> int:
    """Splits that actually receive entries when each gets E = ceil(K / num_splits) of them.

    E.g. K = 5, num_splits = 4: E = 2, so only 3 splits have entries; launching 3 avoids programs
    that would only write an empty partial result.
    """
    num_splits = min(max(num_splits, 1), max(num_entries, 1))
    per_split = -(-num_entries // num_splits)
    return max(1, -(-num_entries // max(per_split, 1)))


def _kernel(pages_ref, lo_ref, hi_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, sm_scale,
            entries_per_split):
    """Entries [split * E, min((split + 1) * E, K)) of one page list.

    pages_ref, lo_ref, hi_ref [K] int32; q_ref [Gp, Dp]; k_ref, v_ref [P, S, Dp] (the whole pool of
    this list's KV head: Triton blocks are only pointers, nothing is copied; the page is gathered
    by a dynamic index below); o_ref [Gp, Dp] f32 (unnormalised), m_ref, l_ref [Gp] f32 (running
    max in log2 units, sum of exponentials).
    """
    num_entries = pages_ref.shape[0]
    rows, page_size = q_ref.shape[0], k_ref.shape[1]
    start = pl.program_id(2) * entries_per_split
    end = jnp.minimum(start + entries_per_split, np.int32(num_entries))

    q = q_ref[...]
    # f32 inputs: IEEE dots (Triton's default is TF32, too coarse for the f32 tolerances).
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    offsets = lax.broadcasted_iota(jnp.int32, (rows, page_size), 1)

    def update(i, lo, hi, carry):
        """Online-softmax update with the keys lo <= o < hi of page pages[i]."""
        acc, m_prev, l_prev = carry
        page = pages_ref[i]
        visible = (offsets >= lo) & (offsets < hi)  # [Gp, S]
        k = k_ref[page]  # [S, Dp]
        # [Gp, Dp] x [S, Dp] -> [Gp, S], logits in base 2.
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * (sm_scale * _LOG2E)
        s = jnp.where(visible, s, _MASK_VALUE)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        correction = jnp.exp2(m_prev - m_next)
        # Masked keys add exactly 0, even for an entry with no visible key (m_next would be the
        # mask value); the cond below already skips such entries, this keeps the update exact.
        p = jnp.where(visible, jnp.exp2(s - m_next[:, None]), 0.0)
        l_next = correction * l_prev + jnp.sum(p, axis=1)
        v = v_ref[page]  # [S, Dp]
        # [Gp, S] x [S, Dp] -> [Gp, Dp]
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             precision=precision, preferred_element_type=jnp.float32)
        return correction[:, None] * acc + pv, m_next, l_next

    def body(i, carry):
        # Padding entries (hi <= lo) skip both page loads. Triton-safe: the Pallas Triton lowering
        # turns `cond` into an `scf.if` whose branches yield the same statically shaped carry,
        # and the predicate is a scalar compare of two loaded int32 values (no data-dependent
        # shapes, no scalar prefetch).
        lo, hi = lo_ref[i], hi_ref[i]
        return lax.cond(lo < hi, functools.partial(update, i, lo, hi), lambda c: c, carry)

    carry = (jnp.zeros(q.shape, jnp.float32),
             jnp.full((rows,), -jnp.inf, jnp.float32),
             jnp.zeros((rows,), jnp.float32))
    acc, m, l = lax.fori_loop(start, end, body, carry)
    o_ref[...] = acc
    m_ref[...] = m  # -inf for a split that saw no key: it gets weight 0 in the merge
    l_ref[...] = l


def _pallas_paged_decode(q, k_pages, v_pages, pages, lo, hi, *, sm_scale, num_splits, num_warps,
                         num_stages, interpret):
    """Grid and BlockSpecs. q [B, H, Gp, Dp]; k_pages, v_pages [Hkv, P, S, Dp]; pages, lo, hi
    [B, H, K] int32. Returns the split partials o [B, H, splits, Gp, Dp], m and l
    [B, H, splits, Gp], all f32."""
    batch, num_lists, rows, d_pad = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    num_entries = pages.shape[2]
    group = num_lists // num_kv_heads
    entries_per_split = -(-num_entries // num_splits)
    grid = (batch, num_lists, num_splits)
    list_spec = pl.BlockSpec((None, None, num_entries), lambda b, h, s: (b, h, 0))
    # The whole pool of one KV head is one block; the kernel gathers pages from it.
    pool_spec = pl.BlockSpec((None, num_pages, page_size, d_pad),
                             lambda b, h, s: (lax.div(h, group), 0, 0, 0))
    kernel = functools.partial(_kernel, sm_scale=sm_scale, entries_per_split=entries_per_split)
    split_shape = (batch, num_lists, num_splits, rows)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            list_spec, list_spec, list_spec,  # pages, lo, hi
            pl.BlockSpec((None, None, rows, d_pad), lambda b, h, s: (b, h, 0, 0)),
            pool_spec, pool_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, d_pad), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(split_shape + (d_pad,), jnp.float32),
            jax.ShapeDtypeStruct(split_shape, jnp.float32),
            jax.ShapeDtypeStruct(split_shape, jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_decode_attention",
    )(pages, lo, hi, q, k_pages, v_pages)


def _merge_splits(o, m, l):
    """Log-sum-exp merge of split-K partials (flash-decoding).

    o [..., splits, R, D] unnormalised outputs, m [..., splits, R] running max in log2 units,
    l [..., splits, R] sums of 2**(logit - m). Returns [..., R, D] f32. A split that saw no key
    (m = -inf, l = 0, o = 0) gets weight 0; a row no split saw comes out 0.
    """
    m_max = jnp.max(m, axis=-2)  # [..., R]
    m_max = jnp.where(jnp.isfinite(m_max), m_max, 0.0)
    weight = jnp.exp2(m - m_max[..., None, :])  # [..., splits, R], <= 1, 0 for empty splits
    l_total = jnp.sum(weight * l, axis=-2)
    out = jnp.sum(weight[..., None] * o, axis=-3)
    return out / jnp.where(l_total == 0.0, 1.0, l_total)[..., None]


def paged_decode_attention_reference(q, k_pages, v_pages, pages, lo, hi, *, sm_scale=None):
    """Plain-jnp reference and CPU path: same contract as `paged_decode_attention`.

    One gather of the listed pages ([B, H, K, S, D], the keys actually attended) and a masked f32
    softmax over all K * S slots; no loop over B, H or K.
    """
    batch, num_lists, rows, d = q.shape
    num_kv_heads = k_pages.shape[0]
    page_size = k_pages.shape[2]
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    kv_head = (jnp.arange(num_lists) // (num_lists // num_kv_heads))[None, :, None]  # [1, H, 1]
    k = k_pages[kv_head, pages]  # [B, H, K, S, D]
    v = v_pages[kv_head, pages]
    offsets = jnp.arange(page_size)
    visible = (offsets >= lo[..., None]) & (offsets < hi[..., None])  # [B, H, K, S]
    n = pages.shape[2] * page_size
    k = k.reshape(batch, num_lists, n, d)
    v = v.reshape(batch, num_lists, n, d)
    visible = visible.reshape(batch, num_lists, n, 1)
    hi_prec = lax.Precision.HIGHEST
    # Keys-major scores [b,h,n,g]: the gathered keys stream once through a matrix-vector product
    # (on CPU, 4x faster than a [b,h,g,n] output). [b,h,n,d] x [b,h,g,d] -> [b,h,n,g]
    s = jnp.einsum("bhnd,bhgd->bhng", k, q, precision=hi_prec,
                   preferred_element_type=jnp.float32) * sm_scale
    s = jnp.where(visible, s, -jnp.inf)
    m = jnp.max(s, axis=2, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # a row with no visible key: p = 0 below
    p = jnp.where(visible, jnp.exp(s - m), 0.0)
    l = jnp.sum(p, axis=2)  # [B, H, G]
    # [b,h,n,g] x [b,h,n,d] -> [b,h,g,d]
    out = jnp.einsum("bhng,bhnd->bhgd", p.astype(v.dtype), v, precision=hi_prec,
                     preferred_element_type=jnp.float32)
    return (out / jnp.where(l == 0.0, 1.0, l)[..., None]).astype(q.dtype)


def _validate(q, k_pages, v_pages, pages, lo, hi, impl, num_splits):
    if impl not in ("pallas", "xla"):
        raise ValueError(f"{impl=} must be 'pallas' or 'xla'")
    if q.ndim != 4:
        raise ValueError(f"q must be [B, H, G, D]; got {q.shape=}")
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages and v_pages must both be [Hkv, P, S, D]; got "
                         f"{k_pages.shape=} {v_pages.shape=}")
    batch, num_lists, _, d = q.shape
    num_kv_heads, _, page_size, d_kv = k_pages.shape
    if d_kv != d:
        raise ValueError(f"head_dim of the pools ({d_kv}) must equal q's ({d}): {q.shape=} "
                         f"{k_pages.shape=}")
    if num_kv_heads == 0 or num_lists % num_kv_heads:
        raise ValueError(f"number of page lists H={num_lists} must be a multiple of "
                         f"{num_kv_heads=}")
    if not (q.dtype == k_pages.dtype == v_pages.dtype) or jnp.dtype(q.dtype) not in _DTYPES:
        raise ValueError(f"q, k_pages, v_pages must share one of float32/bfloat16/float16; got "
                         f"{q.dtype=} {k_pages.dtype=} {v_pages.dtype=}")
    for name, x in (("pages", pages), ("lo", lo), ("hi", hi)):
        if x.ndim != 3 or x.shape[:2] != (batch, num_lists) or x.shape != pages.shape:
            raise ValueError(f"{name}.shape={x.shape} must be [B={batch}, H={num_lists}, K] and "
                             f"equal {pages.shape=}")
        if x.dtype != jnp.int32:
            raise ValueError(f"{name}.dtype={x.dtype} must be int32")
    if impl == "pallas" and (page_size < 16 or page_size & (page_size - 1)):
        raise ValueError(f"{page_size=} must be a power of two >= 16 for the Pallas kernel")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"{num_splits=} must be >= 1")


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "impl", "interpret", "num_splits", "num_warps", "num_stages"))
def paged_decode_attention(q, k_pages, v_pages, pages, lo, hi, *, sm_scale=None, impl="pallas",
                           interpret=False, num_splits=None, num_warps=4, num_stages=2):
    """Decode attention of G query rows per page list over that list's page ranges.

    Args:
      q: [B, H, G, D] float32, bfloat16 or float16. H page lists, G query rows sharing each list.
      k_pages, v_pages: [Hkv, P, S, D] page pools, same dtype as q; H % Hkv == 0 and list h reads
        KV head h // (H // Hkv). Page 0 is the null page (contents arbitrary).
      pages: [B, H, K] int32 physical page ids in [0, P), any order (padding entries are never
        loaded by the kernel, but keep them on the null page: interpret mode and the reference
        clamp out-of-range ids, a GPU would read out of bounds).
      lo, hi: [B, H, K] int32 in [0, S]: entry i contributes offsets lo <= o < hi of its page;
        hi <= lo marks padding.
      sm_scale: logit scale, default 1/sqrt(D).
      impl: "pallas" (Triton kernel, S a power of two >= 16) or "xla" (jnp reference, CPU path).
      interpret: run the Pallas kernel in interpret mode (CPU testing).
      num_splits: split-K programs per list (an upper bound: reduced so every split has an
        entry); None: `default_num_splits(B, H, K)`.
      num_warps, num_stages: Triton launch settings.

    Returns:
      [B, H, G, D] in q's dtype: softmax(q.k * sm_scale) v over the listed keys, softmax in f32;
      0 for a list with no key.
    """
    _validate(q, k_pages, v_pages, pages, lo, hi, impl, num_splits)
    batch, num_lists, rows, d = q.shape
    page_size = k_pages.shape[2]
    num_entries = pages.shape[2]
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    if num_entries == 0:
        return jnp.zeros(q.shape, q.dtype)
    if impl == "xla":
        return paged_decode_attention_reference(q, k_pages, v_pages, pages, lo, hi,
                                                sm_scale=sm_scale)

    num_splits = (default_num_splits(batch, num_lists, num_entries) if num_splits is None
                  else _effective_num_splits(num_splits, num_entries))
    # In [0, S], so an entry with lo < hi has at least one visible key.
    lo, hi = jnp.clip(lo, 0, page_size), jnp.clip(hi, 0, page_size)
    # Zero rows and columns leave q.k unchanged; padded rows and columns are sliced off below.
    rows_pad, d_pad = _padded_size(rows), _padded_size(d)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, rows_pad - rows), (0, d_pad - d)))
    if d_pad != d:
        # Cost: this copies both whole pools (read + write of 2 * Hkv * P * S * D elements) on
        # every call, more than the attention itself reads. Fine for tests and odd head dims;
        # a model with such a head dim should allocate its pools at Dp instead.
        pad = ((0, 0), (0, 0), (0, 0), (0, d_pad - d))
        k_pages, v_pages = jnp.pad(k_pages, pad), jnp.pad(v_pages, pad)
    o, m, l = _pallas_paged_decode(
        q, k_pages, v_pages, pages, lo, hi, sm_scale=sm_scale, num_splits=num_splits,
        num_warps=num_warps, num_stages=num_stages, interpret=interpret)
    return _merge_splits(o, m, l)[:, :, :rows, :d].astype(q.dtype)
