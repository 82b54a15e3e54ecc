"""Paged decode attention over per-list page ranges in one or two pools, split-K (LServe,
arXiv 2502.14866).

One decode step attends each query row to the keys named by a list of page entries. Entry i of
list (b, h) contributes the keys at offsets `lo <= o < hi` of physical page `pages[b, h, i]` of
the list's source: one KV head of one pool. So a single launch serves every head kind of LServe
(arXiv 2502.14866, §4.2 and §4.3):

- dense heads, per-KV-head selection: one list per KV head, its G query heads share the pages
  (each selected page is loaded once for the whole group);
- dense heads, per-query-head selection as in LServe/Quest: one list of one row per query head;
- streaming heads: sink pages plus the ring of the streaming pool, whose oldest page holds a
  suffix [x, S) of the window and newest page a prefix [0, y).

`pooled_decode_attention` takes the dense pool and the streaming pool together and a static
source (pool, KV head) per list, so both kinds of head of a layer run in one launch and the
output comes out in list order (query-head order), with no concatenate or permutation after it.
`paged_decode_attention` is the one-pool case (list h reads KV head h // (H // Hkv)).

Only the first `num_entries[b, h]` entries of a list are read: the loop is bounded by the list's
real length, not by the padded capacity K. Inside it there is no branch: an entry with
`hi <= lo` is masked to contribute exactly zero, so Triton can pipeline the next page's loads
under the current page's math. The key order does not matter to softmax, so lists can be in
any order.

The kernel is flash-decoding (split-K): program (b, h, split) reduces a contiguous run of the
list's live entries (the live entries are divided evenly among the splits at run time) to a
partial (unnormalised output, running max, sum of exponentials); `_merge_splits` combines the
splits with a log-sum-exp merge in plain jnp. Only the real query rows and head-dim columns of
the partials are stored (Triton's dot needs at least 16 rows, so q is padded in registers, but
the padded rows never reach memory).

Quantized pages (an int8, fp8 or int4 KV cache, pallas_kernels/quant.py) are read as they are
stored and dequantized in registers; the algebra keeps the page loop as cheap as for floats.
A static per-channel factor f of the keys (int8 / fp8 scales, int4 smoothing factors) moves onto
the query, q . (k * f) = (q * f) . k, and one of the values onto the output, so 8-bit pages
enter the dots as plain integers converted to q's dtype. An int4 token carries its own scale
a and zero point z: its logit is a * (q . n) + z * sum(q) for the nibbles n, and its value
weight p contributes (p * a) n + p * z, so the nibbles also enter the dots unscaled.

Layers: `_kernel` (one run of entries of one list) -> `_pallas_decode` (grid and BlockSpecs) ->
`pooled_decode_attention` / `paged_decode_attention` (public jitted ops, `impl="triton" |
"xla"`). The plain-jnp `pooled_decode_attention_reference` / `paged_decode_attention_reference`
are the XLA path (the CPU decode path) and the tests' oracle.

Shapes: B batch, H page lists, G query rows per list, P pages in a pool (page 0 is the null
page), S page size, K entries per list (capacity), D head dim; Gp, Dp the padded tile sizes.
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

from pallas_kernels import quant
from pallas_kernels.impls import check_impl

# Finite stand-in for -inf on masked logits: keeps the running max finite, so `m_prev - m_next`
# is never `-inf - -inf = nan` (same choice as jax/experimental/pallas/ops/gpu/attention.py).
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_LOG2E = math.log2(math.e)
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Streaming multiprocessors of an H100 / H200 (both 132); the default split count aims at two
# programs per SM.
_NUM_SMS = 132


def _padded_size(n: int) -> int:
    # Triton tiles must be powers of two, and tl.dot wants M, N, K >= 16.
    return max(16, pl.next_power_of_2(n))


def default_num_splits(batch: int, num_lists: int, num_entries: int) -> int:
    """Split count when `num_splits=None`: enough programs to fill the GPU, none of them empty.

    A decode launch has only B * H programs without splitting; ask for ceil(2 * 132 / (B * H))
    splits (two programs per SM hide one program's tail), clamped to [1, K]. The result then goes
    through `_effective_num_splits`, so no split is left without an entry of a full list.
    """
    splits = -(-2 * _NUM_SMS // max(1, batch * num_lists))
    return _effective_num_splits(min(max(splits, 1), max(num_entries, 1)), num_entries)


def _effective_num_splits(num_splits: int, num_entries: int) -> int:
    """Splits that actually receive entries of a full list when each gets E = ceil(K /
    num_splits) of them.

    E.g. K = 5, num_splits = 4: E = 2, so only 3 splits have entries; launching 3 avoids programs
    that would only write an empty partial result.
    """
    num_splits = min(max(num_splits, 1), max(num_entries, 1))
    per_split = -(-num_entries // num_splits)
    return max(1, -(-num_entries // max(per_split, 1)))


def _load_page(ref, head, page_id, kv_format: str, dtype):
    """One page of a pool ref [Hpool, P, S, X] as `dtype` [S, Dp]: int4 bytes unpacked
    (channel 2i from the low nibble, 2i + 1 from the high one, interleaved in registers).
    Shared by the decode and paged prefill kernels."""
    x = ref[head, page_id]
    if kv_format == "int4":
        x = jnp.stack([x & 0xF, x >> 4], axis=-1).reshape(x.shape[0], 2 * x.shape[1])
    return x.astype(dtype)


def _attend_page(carry, q, pool, head, page_id, visible, seen, *, kv_format, sm_scale,
                 precision, q_sum):
    """One online-softmax update (flash attention, logits in base 2) of the rows of q [R, Dp]
    with one page of a pool tuple of refs (k, v[, k_meta, v_meta]): visible [R, S] the keys
    each row sees, seen [S] those any row sees (the others may hold anything, a freed page's
    stale or non-finite values, so their values are zeroed: a zero weight times NaN is NaN).
    carry (acc [R, Dp], running max m [R], sum l [R]) f32. int4 pages: a token's key and value
    are nibbles * scale + zero, so its logit is scale * (q . n) + zero * sum(q) (q_sum [R]) and
    p @ values = (p * scale) @ nibbles + sum(p * zero). Shared by the decode and paged
    prefill kernels."""
    acc, m_prev, l_prev = carry
    k = _load_page(pool[0], head, page_id, kv_format, q.dtype)  # [S, Dp]
    # [R, Dp] x [S, Dp] -> [R, S]
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32)
    if kv_format == "int4":
        k_scale = pool[2][head, page_id, :, 0].astype(jnp.float32)  # [S]
        k_zero = pool[2][head, page_id, :, 1].astype(jnp.float32)
        s = s * k_scale[None, :] + q_sum[:, None] * k_zero[None, :]
    s = jnp.where(visible, s * (sm_scale * _LOG2E), _MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    correction = jnp.exp2(m_prev - m_next)
    # Masked keys add exactly 0, also for a page with no visible key (then m_next may be the
    # mask value, and the next real key's correction zeroes it).
    p = jnp.where(visible, jnp.exp2(s - m_next[:, None]), 0.0)
    l_next = correction * l_prev + jnp.sum(p, axis=1)
    v = _load_page(pool[1], head, page_id, kv_format, q.dtype)  # [S, Dp]
    v = jnp.where(seen[:, None], v, jnp.zeros_like(v))
    if kv_format == "int4":
        v_scale = jnp.where(seen, pool[3][head, page_id, :, 0].astype(jnp.float32), 0.0)
        v_zero = jnp.where(seen, pool[3][head, page_id, :, 1].astype(jnp.float32), 0.0)
        zero_part = jnp.sum(p * v_zero[None, :], axis=1)  # [R]
        p = p * v_scale[None, :]
    # [R, S] x [S, Dp] -> [R, Dp]
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                         precision=precision, preferred_element_type=jnp.float32)
    if kv_format == "int4":
        pv = pv + zero_part[:, None]
    return correction[:, None] * acc + pv, m_next, l_next


def _kernel(count_ref, source_ref, pages_ref, lo_ref, hi_ref, q_ref, *refs, sm_scale, num_pools,
            kv_format, num_splits, rows, d):
    """A run of the live entries of one list.

    count_ref [] int32 live entries of this list; source_ref [2] int32 (pool, KV head) of the
    list; pages_ref, lo_ref, hi_ref [K] int32; q_ref [Gp, Dp]; then per pool its page refs
    (whole pools: Triton blocks are only pointers, nothing is copied; the page is gathered by
    dynamic indices below): k_ref, v_ref [Hpool, P, S, Dp] for "float" and "scaled" pages,
    plus the (scale, zero) refs km_ref, vm_ref [Hpool, P, S, 2] for "int4" pages, whose
    k_ref, v_ref hold [Hpool, P, S, Dp / 2] bytes; then o_ref [Gp, Dp] f32 (unnormalised),
    m_ref, l_ref [Gp] f32 (running max in log2 units, sum of exponentials). Only rows < `rows`
    and columns < `d` are stored.

    Quantized pages are dequantized in registers (see "Quantized pages" in the module
    docstring): the wrapper folded the static per-channel factors into q and applies the
    values' factors to the output, so the kernel sees integer pages and per-token factors.
    """
    refs_per_pool = 4 if kv_format == "int4" else 2
    pool_refs = refs[:refs_per_pool * num_pools]
    o_ref, m_ref, l_ref = refs[refs_per_pool * num_pools:]
    rows_pad, d_pad = q_ref.shape
    page_size = pool_refs[0].shape[2]
    count = count_ref[...]
    # The live entries are divided evenly at run time, so a short list in a long-capacity
    # table (dense decode early in a sequence) still spreads over every split.
    per_split = (count + num_splits - 1) // num_splits
    start = pl.program_id(2) * per_split
    end = jnp.minimum(start + per_split, count)
    head = source_ref[1]

    q = q_ref[...]
    # f32 inputs: IEEE dots (Triton's default is TF32, too coarse for the f32 tolerances).
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    offsets = lax.broadcasted_iota(jnp.int32, (rows_pad, page_size), 1)
    # Sum of q's channels: the int4 zero point z of a key adds z * sum(q) to its logit.
    q_sum = jnp.sum(q.astype(jnp.float32), axis=1) if kv_format == "int4" else None

    def attend(*pool):
        def body(i, carry):
            """Online-softmax update with the keys lo <= o < hi of page pages[i] (hi <= lo:
            none, and the update adds exactly zero)."""
            page_id, lo, hi = pages_ref[i], lo_ref[i], hi_ref[i]
            token = lax.broadcasted_iota(jnp.int32, (page_size,), 0)
            return _attend_page(carry, q, pool, head, page_id,
                                (offsets >= lo) & (offsets < hi), (token >= lo) & (token < hi),
                                kv_format=kv_format, sm_scale=sm_scale, precision=precision,
                                q_sum=q_sum)

        carry = (jnp.zeros(q.shape, jnp.float32),
                 jnp.full((rows_pad,), -jnp.inf, jnp.float32),
                 jnp.zeros((rows_pad,), jnp.float32))
        return lax.fori_loop(start, end, body, carry)

    if num_pools == 1:
        acc, m, l = attend(*pool_refs)
    else:
        # One branch per program, around the whole loop (not per entry): each branch is an
        # ordinary pipelined loop over its pool.
        acc, m, l = lax.cond(source_ref[0] == 0, lambda: attend(*pool_refs[:refs_per_pool]),
                             lambda: attend(*pool_refs[refs_per_pool:]))
    row_ok = lax.broadcasted_iota(jnp.int32, (rows_pad,), 0) < rows
    col_ok = lax.broadcasted_iota(jnp.int32, (rows_pad, d_pad), 1) < d
    plgpu.store(o_ref, acc, mask=row_ok[:, None] & col_ok)
    # -inf for a split that saw no entry: it gets weight 0 in the merge.
    plgpu.store(m_ref, m, mask=row_ok)
    plgpu.store(l_ref, l, mask=row_ok)


def _pallas_decode(q, pools, pages, lo, hi, counts, sources, *, rows, d, sm_scale, kv_format,
                   num_splits, num_warps, num_stages, interpret):
    """Grid and BlockSpecs. q [B, H, Gp, Dp]; pools: tuple of (k, v) [Hpool, P, S, Dp]
    (int4: (k, v, k_meta, v_meta), see `_kernel`);
    pages, lo, hi [B, H, K] int32; counts [B, H] int32; sources [H, 2] int32. Returns the
    split partials o [B, H, splits, Gp, Dp], m and l [B, H, splits, Gp], all f32, valid in
    rows < `rows` and columns < `d`."""
    batch, num_lists, rows_pad, d_pad = q.shape
    num_entries = pages.shape[2]
    grid = (batch, num_lists, num_splits)
    list_spec = pl.BlockSpec((None, None, num_entries), lambda b, h, s: (b, h, 0))
    pool_specs = [pl.BlockSpec(x.shape, lambda b, h, s: (0, 0, 0, 0))
                  for pool in pools for x in pool]
    kernel = functools.partial(_kernel, sm_scale=sm_scale, num_pools=len(pools),
                               kv_format=kv_format, num_splits=num_splits, rows=rows, d=d)
    split_shape = (batch, num_lists, num_splits, rows_pad)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            pl.BlockSpec((None, None), lambda b, h, s: (b, h)),  # counts
            pl.BlockSpec((None, 2), lambda b, h, s: (h, 0)),  # sources
            list_spec, list_spec, list_spec,  # pages, lo, hi
            pl.BlockSpec((None, None, rows_pad, d_pad), lambda b, h, s: (b, h, 0, 0)),
            *pool_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows_pad, d_pad), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, rows_pad), lambda b, h, s: (b, h, s, 0)),
            pl.BlockSpec((None, None, None, rows_pad), lambda b, h, s: (b, h, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(split_shape + (d_pad,), jnp.float32),
            jax.ShapeDtypeStruct(split_shape, jnp.float32),
            jax.ShapeDtypeStruct(split_shape, jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_decode_attention",
    )(counts, sources, pages, lo, hi, q, *(x for pool in pools for x in pool))


def _merge_splits(o, m, l):
    """Log-sum-exp merge of split-K partials (flash-decoding).

    o [..., splits, R, D] unnormalised outputs, m [..., splits, R] running max in log2 units,
    l [..., splits, R] sums of 2**(logit - m). Returns [..., R, D] f32. A split that saw no key
    (l = 0, o = 0) gets weight 0 next to any split that did; a row no split saw comes out 0.
    """
    m_max = jnp.max(m, axis=-2)  # [..., R]
    m_max = jnp.where(jnp.isfinite(m_max), m_max, 0.0)
    weight = jnp.exp2(m - m_max[..., None, :])  # [..., splits, R], <= 1, 0 for empty splits
    l_total = jnp.sum(weight * l, axis=-2)
    out = jnp.sum(weight[..., None] * o, axis=-3)
    return out / jnp.where(l_total == 0.0, 1.0, l_total)[..., None]


def _attend_gathered(q, k, v, visible, sm_scale):
    """Masked f32 softmax attention over gathered keys: q [B, H, G, D]; k, v [B, H, N, D];
    visible [B, H, N] -> [B, H, G, D] f32 (0 for a list with no visible key)."""
    hi_prec = lax.Precision.HIGHEST
    # Keys-major scores [b,h,n,g]: the gathered keys stream once through a matrix-vector product
    # (on CPU, 4x faster than a [b,h,g,n] output). [b,h,n,d] x [b,h,g,d] -> [b,h,n,g]
    s = jnp.einsum("bhnd,bhgd->bhng", k, q, precision=hi_prec,
                   preferred_element_type=jnp.float32) * sm_scale
    s = jnp.where(visible[..., None], s, -jnp.inf)
    m = jnp.max(s, axis=2, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # a row with no visible key: p = 0 below
    p = jnp.where(visible[..., None], jnp.exp(s - m), 0.0)
    l = jnp.sum(p, axis=2)  # [B, H, G]
    # Invisible slots may hold anything (a freed page's stale or non-finite values): a zero
    # weight times NaN is NaN, so zero them.
    v = jnp.where(visible[..., None], v, jnp.zeros_like(v))
    # [b,h,n,g] x [b,h,n,d] -> [b,h,g,d]
    out = jnp.einsum("bhng,bhnd->bhgd", p.astype(v.dtype), v, precision=hi_prec,
                     preferred_element_type=jnp.float32)
    return out / jnp.where(l == 0.0, 1.0, l)[..., None]


def gather_pages(pool, heads, pages):
    """pool [Hkv, P, S, D] at (heads, pages) (broadcasting, -> pages.shape + [S, D]): one
    gather of whole pages, each a contiguous row of the flattened pool (on the CPU 2-3x faster
    than indexing the 4-D pool, which XLA gathers element by element)."""
    h, p, s, d = pool.shape
    rows = (heads * p + pages).reshape(-1, 1)
    dims = lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(0,),
                                      start_index_map=(0,))
    out = lax.gather(pool.reshape(h * p, s * d), rows, dims, slice_sizes=(1, s * d),
                     mode="clip")
    return out.reshape(*jnp.broadcast_shapes(jnp.shape(heads), pages.shape), s, d)


def pooled_decode_attention_reference(q, pools, pages, lo, hi, num_entries=None, *,
                                      sources, sm_scale=None):
    """Plain-jnp reference and CPU path: same contract as `pooled_decode_attention` (float,
    int8, fp8 and int4 pools); quantized pages are dequantized to f32 after the gather.

    For each pool, one gather of the pages its lists name ([B, Hlists, K, S, D], the keys
    actually attended) and a masked f32 softmax over all K * S slots; no loop over B or K.
    """
    batch, num_lists, rows, d = q.shape
    page_size = pools[0][0].shape[2]
    num_entries_cap = pages.shape[2]
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    offsets = jnp.arange(page_size)
    visible = (offsets >= lo[..., None]) & (offsets < hi[..., None])  # [B, H, K, S]
    if num_entries is not None:
        live = jnp.arange(num_entries_cap) < num_entries[..., None]  # [B, H, K]
        visible &= live[..., None]
    outs, order = [], []
    for p, pool in enumerate(pools):
        lists = np.array([h for h, (src, _) in enumerate(sources) if src == p], np.int32)
        if not lists.size:
            continue
        heads = np.array([sources[h][1] for h in lists], np.int32)[None, :, None]  # [1, Hp, 1]
        gather = lambda x: gather_pages(x, heads, pages[:, lists])  # noqa: E731  [B,Hp,K,S,X]
        pick = lambda f, _: f[heads[0, :, 0]][None, :, None, None, :]  # noqa: E731
        k, v = (quant.dequantize_entries(pool, i, gather, pick) for i in (0, 1))
        n = num_entries_cap * page_size
        shape = (batch, lists.size, n, d)
        outs.append(_attend_gathered(q[:, lists], k.reshape(shape), v.reshape(shape),
                                     visible[:, lists].reshape(batch, lists.size, n), sm_scale))
        order.extend(lists)
    out = jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
    if order != sorted(order):
        out = out[:, np.argsort(order)]
    return out.astype(q.dtype)


def paged_decode_attention_reference(q, k_pages, v_pages, pages, lo, hi, num_entries=None, *,
                                     sm_scale=None):
    """Plain-jnp reference and CPU path of the one-pool op, `paged_decode_attention`."""
    return pooled_decode_attention_reference(
        q, ((k_pages, v_pages),), pages, lo, hi, num_entries,
        sources=_one_pool_sources(q.shape[1], k_pages.shape[0]), sm_scale=sm_scale)


def _one_pool_sources(num_lists: int, num_kv_heads: int) -> tuple[tuple[int, int], ...]:
    group = max(1, num_lists // max(num_kv_heads, 1))
    return tuple((0, h // group) for h in range(num_lists))


# By the length of a pool tuple: float pages; "scaled" 8-bit pages (int8 or float8_e4m3fn) with
# static per-channel scales; int4 pages with per-token scales and zero points.
KV_FORMATS = {2: "float", 4: "scaled", 6: "int4"}
_SCALED_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))


def _kv_format(pools) -> str:
    """"float", "scaled" or "int4": what every pool holds (one format per call)."""
    formats = {KV_FORMATS.get(len(pool)) for pool in pools}
    if None in formats or len(formats) != 1:
        raise ValueError("every pool must be (k, v) float pages, (k, v, k_scale, v_scale) "
                         "int8 or fp8 pages or (k, v, k_meta, v_meta, k_smooth, v_smooth) "
                         "int4 pages, all of one kind; got tuples of lengths "
                         f"{[len(p) for p in pools]}")
    return formats.pop()


def _validate(q, pools, pages, lo, hi, num_entries, sources, impl, num_splits):
    if q.ndim != 4:
        raise ValueError(f"q must be [B, H, G, D]; got {q.shape=}")
    if not 1 <= len(pools) <= 2:
        raise ValueError(f"one or two pools are supported; got {len(pools)}")
    kv_format = _kv_format(pools)
    batch, num_lists, _, d = q.shape
    if jnp.dtype(q.dtype) not in _DTYPES:
        raise ValueError(f"q must be one of float32/bfloat16/float16 (and share one of them with "
                         f"float pools); got {q.dtype=}")
    page_size = pools[0][0].shape[2] if pools[0][0].ndim == 4 else None
    for pool in pools:
        k_pages, v_pages = pool[:2]
        if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
            raise ValueError(f"k_pages and v_pages must both be [Hkv, P, S, D]; got "
                             f"{k_pages.shape=} {v_pages.shape=}")
        width = d // 2 if kv_format == "int4" else d
        if kv_format == "int4" and d % 2:
            raise ValueError(f"int4 pages pack two channels a byte: head_dim {d} must be even")
        if k_pages.shape[3] != width:
            raise ValueError(f"head_dim of the pools ({k_pages.shape[3]}"
                             f"{' bytes' if kv_format == 'int4' else ''}) must match q's ({d}): "
                             f"{q.shape=} {k_pages.shape=}")
        if k_pages.shape[2] != page_size:
            raise ValueError(f"all pools must share one page size; got {k_pages.shape=}")
        want = {"float": (jnp.dtype(q.dtype),), "scaled": _SCALED_DTYPES,
                "int4": (jnp.dtype(jnp.uint8),)}[kv_format]
        if not (k_pages.dtype == v_pages.dtype and jnp.dtype(k_pages.dtype) in want):
            raise ValueError(f"q, k_pages, v_pages must share one of float32/bfloat16/float16 "
                             f"({kv_format} pages: {' or '.join(w.name for w in want)}); got "
                             f"{q.dtype=} {k_pages.dtype=} {v_pages.dtype=}")
        hpool = k_pages.shape[0]
        if kv_format == "int4":
            for meta in pool[2:4]:
                if meta.shape != k_pages.shape[:3] + (2,):
                    raise ValueError(f"int4 (scale, zero) pairs must be {k_pages.shape[:3] + (2,)}"
                                     f" [Hpool, P, S, 2]; got {meta.shape}")
        for factor in pool[2:4] if kv_format == "scaled" else pool[4:6]:
            if factor.shape != (hpool, d):
                raise ValueError(f"{kv_format} per-channel factors must be [Hpool={hpool}, "
                                 f"D={d}]; got {factor.shape}")
    if len(sources) != num_lists:
        raise ValueError(f"sources names {len(sources)} lists, q has H={num_lists}")
    for h, (pool, head) in enumerate(sources):
        if not (0 <= pool < len(pools) and 0 <= head < pools[pool][0].shape[0]):
            raise ValueError(f"list {h}: source (pool={pool}, kv_head={head}) does not exist")
    for name, x in (("pages", pages), ("lo", lo), ("hi", hi)):
        if x.ndim != 3 or x.shape[:2] != (batch, num_lists) or x.shape != pages.shape:
            raise ValueError(f"{name}.shape={x.shape} must be [B={batch}, H={num_lists}, K] and "
                             f"equal {pages.shape=}")
        if x.dtype != jnp.int32:
            raise ValueError(f"{name}.dtype={x.dtype} must be int32")
    if num_entries is not None and (num_entries.shape != (batch, num_lists)
                                    or num_entries.dtype != jnp.int32):
        raise ValueError(f"num_entries must be int32 [B={batch}, H={num_lists}]; got "
                         f"{num_entries.shape=} {num_entries.dtype=}")
    if impl == "triton" and (page_size < 16 or page_size & (page_size - 1)):
        raise ValueError(f"{page_size=} must be a power of two >= 16 for the Pallas kernel")
    for pool in pools:
        if impl == "triton" and pool[0].size >= 2**31:
            # The kernel addresses a pool with int32 element offsets.
            raise ValueError(f"a pool of {pool[0].size} elements ({pool[0].shape=}) is too "
                             f"large for the Pallas kernel's int32 offsets (< 2**31): split "
                             f"the batch")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"{num_splits=} must be >= 1")
    return kv_format


def _per_list(pools, sources, index):
    """Row `index` of each list's pool tuple at its KV head: [H, D] per-channel factors."""
    base = np.cumsum([0] + [pool[index].shape[0] for pool in pools])
    rows = np.array([base[p] + head for p, head in sources], np.int32)
    return jnp.concatenate([pool[index] for pool in pools]).astype(jnp.float32)[rows]


@functools.partial(jax.jit, static_argnames=(
    "sources", "sm_scale", "impl", "interpret", "num_splits", "num_warps", "num_stages"))
def pooled_decode_attention(q, pools, pages, lo, hi, num_entries=None, *, sources, sm_scale=None,
                            impl="triton", interpret=False, num_splits=None, num_warps=4,
                            num_stages=2):
    """Decode attention of G query rows per page list, each list reading one KV head of one of
    up to two page pools, in one launch.

    Args:
      q: [B, H, G, D] float32, bfloat16 or float16. H page lists, G query rows sharing each list.
      pools: one or two pool tuples of one kind (pools may differ in Hpool and P, not in S or
        D). Page 0 of each pool is its null page. Float pages: (k_pages, v_pages), each
        [Hpool, P, S, D] in q's dtype. int8 or fp8 pages (pallas_kernels/quant.py): (k_pages,
        v_pages, k_scale, v_scale), pages int8 or float8_e4m3fn [Hpool, P, S, D], static scales
        [Hpool, D] per (head, channel), read as page * scale. int4 pages: (k_pages, v_pages,
        k_meta, v_meta, k_smooth, v_smooth), pages uint8 [Hpool, P, S, D / 2] (two channels a
        byte, low nibble first), a (scale, zero) pair per token [Hpool, P, S, 2], smoothing
        factors [Hpool, D], read as (nibble * scale + zero) * smooth.
      pages: [B, H, K] int32 physical page ids of the list's pool, any order (keep unused entries
        on the null page: interpret mode and the reference clamp out-of-range ids, a GPU would
        read out of bounds).
      lo, hi: [B, H, K] int32 in [0, S]: entry i contributes offsets lo <= o < hi of its page;
        hi <= lo contributes nothing.
      num_entries: [B, H] int32 live entries per list (entries at or past it are never read),
        None: all K.
      sources: static, per list h the pair (pool index, KV head in that pool).
      sm_scale: logit scale, default 1/sqrt(D).
      impl: "triton" (the kernel, S a power of two >= 16) or "xla" (jnp reference, CPU path).
      interpret: run the Pallas kernel in interpret mode (CPU testing).
      num_splits: split-K programs per list (an upper bound, see `default_num_splits`); None:
        `default_num_splits(B, H, K)`.
      num_warps, num_stages: Triton launch settings.

    Returns:
      [B, H, G, D] in q's dtype: softmax(q.k * sm_scale) v over the listed keys, softmax in f32;
      0 for a list with no key.
    """
    pools = tuple(tuple(pool) for pool in pools)
    impl = check_impl(impl, "pooled_decode_attention")
    kv_format = _validate(q, pools, pages, lo, hi, num_entries, sources, impl, num_splits)
    batch, num_lists, rows, d = q.shape
    page_size = pools[0][0].shape[2]
    capacity = pages.shape[2]
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    if capacity == 0:
        return jnp.zeros(q.shape, q.dtype)
    if impl == "xla":
        return pooled_decode_attention_reference(q, pools, pages, lo, hi, num_entries,
                                                 sources=sources, sm_scale=sm_scale)

    num_splits = (default_num_splits(batch, num_lists, capacity) if num_splits is None
                  else _effective_num_splits(num_splits, capacity))
    if num_entries is None:
        num_entries = jnp.full((batch, num_lists), capacity, jnp.int32)
    num_entries = jnp.clip(num_entries, 0, capacity)
    # In [0, S], so an entry with lo < hi has at least one visible key.
    lo, hi = jnp.clip(lo, 0, page_size), jnp.clip(hi, 0, page_size)
    out_dtype = q.dtype
    v_factor = None
    if kv_format != "float":
        # Static per-channel factors (8-bit scales, int4 smoothing) leave the page loop: a key
        # factor scales q (q . (k * f) = (q * f) . k), a value factor the output.
        first = 2 if kv_format == "scaled" else 4
        k_factor = _per_list(pools, sources, first)  # [H, D]
        v_factor = _per_list(pools, sources, first + 1)
        q = (q.astype(jnp.float32) * k_factor[None, :, None, :]).astype(q.dtype)
        pools = tuple(pool[:4] if kv_format == "int4" else pool[:2] for pool in pools)
    # Zero rows and columns leave q.k unchanged; padded rows and columns are never stored.
    rows_pad, d_pad = _padded_size(rows), _padded_size(d)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, rows_pad - rows), (0, d_pad - d)))
    if d_pad != d:
        # Cost: this copies whole pools (read + write) on every call, more than the attention
        # itself reads. Fine for tests and odd head dims; a model with such a head dim should
        # allocate its pools at Dp instead.
        width = d_pad // 2 if kv_format == "int4" else d_pad
        pad = ((0, 0), (0, 0), (0, 0), (0, width - pools[0][0].shape[3]))
        pools = tuple((jnp.pad(pool[0], pad), jnp.pad(pool[1], pad)) + pool[2:]
                      for pool in pools)
    o, m, l = _pallas_decode(
        q, pools, pages, lo, hi, num_entries, jnp.asarray(np.array(sources, np.int32)),
        rows=rows, d=d, sm_scale=sm_scale, kv_format=kv_format, num_splits=num_splits,
        num_warps=num_warps, num_stages=num_stages, interpret=interpret)
    out = _merge_splits(o[..., :rows, :d], m[..., :rows], l[..., :rows])
    if v_factor is not None:
        out = out * v_factor[None, :, None, :]
    return out.astype(out_dtype)


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "impl", "interpret", "num_splits", "num_warps", "num_stages"))
def paged_decode_attention(q, k_pages, v_pages, pages, lo, hi, num_entries=None, *,
                           sm_scale=None, impl="triton", interpret=False, num_splits=None,
                           num_warps=4, num_stages=2):
    """`pooled_decode_attention` with one pool: q [B, H, G, D]; k_pages, v_pages [Hkv, P, S, D]
    with H % Hkv == 0, list h reading KV head h // (H // Hkv); pages, lo, hi [B, H, K];
    num_entries [B, H] or None. Returns [B, H, G, D] in q's dtype."""
    num_lists, num_kv_heads = q.shape[1], k_pages.shape[0] if k_pages.ndim == 4 else 0
    if num_kv_heads == 0 or num_lists % num_kv_heads:
        raise ValueError(f"number of page lists H={num_lists} must be a multiple of "
                         f"{num_kv_heads=}")
    return pooled_decode_attention(
        q, ((k_pages, v_pages),), pages, lo, hi, num_entries,
        sources=_one_pool_sources(num_lists, num_kv_heads), sm_scale=sm_scale, impl=impl,
        interpret=interpret, num_splits=num_splits, num_warps=num_warps, num_stages=num_stages)
