"""Paged chunked prefill: a chunk of each sequence's prompt attends to the sequence's cached
pages and to itself, causally, reading K/V from the page pools (LServe, arXiv 2502.14866).

A chunked prefill continues prompts whose first `starts[b]` tokens are already in the cache:
query t of row b sits at position i = starts[b] + t (valid for t < chunk_lens[b]) and sees the
keys j <= i of its sequence. The chunk's own keys were written to the pages before the call, so
every key is read from a pool through a page table, never from a contiguous copy: pool p's
heads read through `tables[p]` [B, W] (page-table column c holds the keys c*S .. c*S + S - 1;
NULL_PAGE 0 where nothing is kept). A `windowed` pool applies LServe's Λ mask (§4.1): a key is
seen only if j < sink_tokens or j > i - local_tokens, and only where its column is mapped (the
engine's streaming heads read their prefill window pages this way, docs/design.md §6).

Every KV head of a layer runs in one launch: KV head h reads head `sources[h][1]` of pool
`sources[h][0]`, and its G query heads share each loaded page (GQA without repeating K/V). The
pools take the decode kernel's formats (float, int8/fp8 with static per-channel scales, int4
with a scale and zero point per token; pallas_kernels/quant.py), dequantized in registers the
same way: static key factors fold into q, value factors into the output (see
pallas_kernels/paged_decode.py, "Quantized pages").

Kernel: program (b, KV head h, query block) holds block_q tokens x G query heads as rows and
loops over exactly the pages its rows can see: for a dense head the columns 0 .. last (the
block's last query position), for a windowed head the sink's columns then the columns of the
block's local window, as one loop over a flat visit index (no branch inside, so Triton
pipelines the page loads). Token-exact masks inside each page: causal, the Λ mask, mapped
columns. Online softmax in f32, base 2.

Layers: `_kernel` -> `_pallas_prefill` (grid, BlockSpecs) -> `paged_prefill_attention` (the
public jitted op, `impl="triton" | "xla"`); `paged_prefill_attention_reference` (plain jnp over
gathered pages, queries in blocks so one block's scores stay in the CPU's caches) is the XLA
path and the tests' oracle.

Shapes: B rows, T chunk tokens, Hq query heads, Hkv KV heads (G = Hq / Hkv), D head dim, P
pages of a pool, S page size, W page-table columns.
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
from pallas_kernels.paged_decode import (_DTYPES, _attend_page, _kv_format, _padded_size,
                                         _per_list)

NULL_PAGE = 0
QUERY_BLOCK = 64  # reference: chunk queries per block (scores stay cache-sized on the CPU)


# ---------------------------------------------------------------------------- reference
def _attend_block(q, keys, values, visible, sm_scale):
    """q [B, t, H, G, D]; keys, values [B, H, N, D] f32; visible [B, t, N] -> [B, t, H, G, D]
    f32, 0 for a query that sees nothing. Scores of unseen keys are -inf, and values no query
    of the block sees are zeroed first (a zero weight times a stale NaN would be NaN)."""
    b, t, h, g, d = q.shape
    batch_dims = ((0, 1), (0, 1))
    qh = jnp.moveaxis(q.astype(jnp.float32), 1, 3).reshape(b, h, g * t, d) * sm_scale
    scores = lax.dot_general(qh, keys, (((3,), (3,)), batch_dims),
                             precision=lax.Precision.HIGHEST)
    scores = jnp.where(visible[:, None, None], scores.reshape(b, h, g, t, -1), -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.exp(scores - jnp.where(m == -jnp.inf, 0.0, m))
    vals = jnp.where(jnp.any(visible, axis=1)[:, None, :, None], values, 0.0)
    out = lax.dot_general(p.reshape(b, h, g * t, -1), vals, (((3,), (2,)), batch_dims),
                          precision=lax.Precision.HIGHEST).reshape(b, h, g, t, d)
    denom = jnp.sum(p, axis=-1)[..., None]
    return jnp.moveaxis(out / jnp.where(denom == 0, 1.0, denom), 3, 1)


def paged_prefill_attention_reference(q, pools, tables, starts, chunk_lens, *, sources,
                                      windowed, sink_tokens=0, local_tokens=1, sm_scale=None):
    """Plain-jnp reference and CPU path, same contract as `paged_prefill_attention`: each
    pool's pages gathered through its table ([B, H, W * S, D], dequantized to f32), a masked
    softmax over them, queries in blocks of QUERY_BLOCK (`lax.map`)."""
    b, t, hq, d = q.shape
    hkv = len(sources)
    g = hq // hkv
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    qg = q.reshape(b, t, hkv, g, d)
    offsets = jnp.arange(t, dtype=jnp.int32)
    position = (starts[:, None] + offsets[None])[:, :, None]  # [B, T, 1]
    valid = offsets[None] < chunk_lens[:, None]  # [B, T]
    outs, order = [], []
    for p, (pool, table) in enumerate(zip(pools, tables)):
        heads = [h for h, (src, _) in enumerate(sources) if src == p]
        if not heads:
            continue
        page_size = pool[0].shape[2]
        ids = np.array([sources[h][1] for h in heads], np.int32)
        keys = jnp.arange(table.shape[1] * page_size, dtype=jnp.int32)[None, None]  # [1, 1, N]
        visible = (keys <= position) & valid[:, :, None]
        if windowed[p]:
            mapped = jnp.repeat(table != NULL_PAGE, page_size, axis=1)[:, None]
            visible &= mapped & ((keys < sink_tokens) | (keys > position - local_tokens))

        def gather(x, table=table, ids=ids):  # [H, P, S, X] -> [B, Hp, W * S, X]
            x = jnp.moveaxis(x[ids][:, table], 0, 1)
            return x.reshape(b, len(ids), -1, x.shape[-1])

        def expand(factor, entries, ids=ids):  # [H, D] -> [1, Hp, 1, D]
            return factor[ids][None, :, None, :]

        k, v = (quant.dequantize_entries(pool, i, gather, expand).astype(jnp.float32)
                for i in (0, 1))
        qp = qg[:, :, np.array(heads)]
        block = QUERY_BLOCK if t % QUERY_BLOCK == 0 else t
        if block == t:
            out = _attend_block(qp, k, v, visible, sm_scale)
        else:
            nb = t // block
            blocks = (qp.reshape(b, nb, block, *qp.shape[2:]).swapaxes(0, 1),
                      visible.reshape(b, nb, block, -1).swapaxes(0, 1))
            out = lax.map(lambda x: _attend_block(x[0], k, v, x[1], sm_scale), blocks)
            out = out.swapaxes(0, 1).reshape(b, t, len(heads), g, d)
        outs.append(out)
        order += heads
    out = jnp.concatenate(outs, axis=2)[:, :, np.argsort(order)]
    out = jnp.where(valid[:, :, None, None, None], out, 0.0)
    return out.reshape(b, t, hq, d).astype(q.dtype)


# ---------------------------------------------------------------------------- kernel
def _kernel(start_ref, len_ref, source_ref, q_ref, *refs, sm_scale, num_pools, kv_format,
            windowed, sink_tokens, local_tokens, block_q, group, d):
    """One query block of one KV head of one row.

    start_ref, len_ref [] int32 the row's start position and chunk length; source_ref [2]
    int32 (pool, KV head) of this KV head; q_ref [block_q * Gp, Dp] (row r: token r // Gp,
    query head r % Gp); then per pool its table ref [W] int32 and its page refs (whole pools,
    as in the decode kernel: (k, v) [Hpool, P, S, Dp], int4 (k, v, k_meta, v_meta) with
    [Hpool, P, S, Dp / 2] bytes); then o_ref [block_q * Gp, Dp], normalised, 0 for rows that
    see nothing (padding queries)."""
    refs_per_pool = 1 + (4 if kv_format == "int4" else 2)
    pool_refs = refs[:refs_per_pool * num_pools]
    o_ref = refs[refs_per_pool * num_pools]
    rows_pad, d_pad = q_ref.shape
    page_size = pool_refs[1].shape[2]
    start, length = start_ref[...], len_ref[...]
    first_token = pl.program_id(2) * block_q
    head = source_ref[1]
    q = q_ref[...]
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    q_sum = jnp.sum(q.astype(jnp.float32), axis=1) if kv_format == "int4" else None
    token = lax.broadcasted_iota(jnp.int32, (rows_pad, page_size), 0) // group
    query_pos = start + first_token + token  # [R, S]
    row_valid = first_token + token < length
    # The block's last real query position bounds the columns it reads.
    last_pos = start + jnp.minimum(first_token + block_q, length) - 1
    num_columns = jnp.where(first_token < length, last_pos // page_size + 1, 0)

    def attend(table_ref, *pool, windowed_pool):
        if windowed_pool:
            # The sink's columns, then the local window's (from the block's first query's
            # oldest visible key), skipping columns already visited as sink columns.
            num_sink = jnp.minimum(-(-sink_tokens // page_size), num_columns)
            first_local = jnp.maximum((start + first_token - local_tokens + 1) // page_size,
                                      num_sink)
            num_visits = num_sink + jnp.maximum(num_columns - first_local, 0)
        else:
            num_sink, first_local, num_visits = 0, 0, num_columns

        def body(i, carry):
            column = jnp.where(i < num_sink, i, first_local + i - num_sink)
            page_id = table_ref[column]
            key_pos = column * page_size + lax.broadcasted_iota(jnp.int32, (rows_pad, page_size),
                                                                1)
            visible = (key_pos <= query_pos) & row_valid
            if windowed_pool:
                visible &= (page_id != NULL_PAGE) & ((key_pos < sink_tokens)
                                                     | (key_pos > query_pos - local_tokens))
            seen = jnp.max(visible.astype(jnp.int32), axis=0) > 0  # [S] (Triton: no any)
            return _attend_page(carry, q, pool, head, page_id, visible, seen,
                                kv_format=kv_format, sm_scale=sm_scale, precision=precision,
                                q_sum=q_sum)

        carry = (jnp.zeros(q.shape, jnp.float32),
                 jnp.full((rows_pad,), -jnp.inf, jnp.float32),
                 jnp.zeros((rows_pad,), jnp.float32))
        acc, _, l = lax.fori_loop(0, num_visits, body, carry)
        return acc / jnp.where(l == 0.0, 1.0, l)[:, None]

    def run(p):
        chunk = pool_refs[p * refs_per_pool:(p + 1) * refs_per_pool]
        return attend(*chunk, windowed_pool=windowed[p])

    if num_pools == 1:
        out = run(0)
    else:  # one branch per program, around the whole loop
        out = lax.cond(source_ref[0] == 0, lambda: run(0), lambda: run(1))
    col_ok = lax.broadcasted_iota(jnp.int32, (rows_pad, d_pad), 1) < d
    plgpu.store(o_ref, out.astype(o_ref.dtype), mask=col_ok)


def _pallas_prefill(q, pools, tables, starts, chunk_lens, sources, *, windowed, sink_tokens,
                    local_tokens, block_q, group, d, sm_scale, kv_format, num_warps, num_stages,
                    interpret):
    """q [B, Hkv, Tp * Gp, Dp]; pools as `_kernel` takes them; tables per pool [B, W];
    starts, chunk_lens [B]; sources [Hkv, 2]. Returns [B, Hkv, Tp * Gp, Dp] f32."""
    batch, hkv, rows, d_pad = q.shape
    gp = group
    rows_block = block_q * gp
    grid = (batch, hkv, rows // rows_block)
    in_specs = [pl.BlockSpec((None,), lambda b, h, i: (b,)),
                pl.BlockSpec((None,), lambda b, h, i: (b,)),
                pl.BlockSpec((None, 2), lambda b, h, i: (h, 0)),
                pl.BlockSpec((None, None, rows_block, d_pad), lambda b, h, i: (b, h, i, 0))]
    operands = [starts, chunk_lens, sources, q]
    for pool, table in zip(pools, tables):
        in_specs.append(pl.BlockSpec((None, table.shape[1]), lambda b, h, i: (b, 0)))
        operands.append(table)
        for x in pool:
            in_specs.append(pl.BlockSpec(x.shape, lambda b, h, i: (0,) * 4))
            operands.append(x)
    kernel = functools.partial(_kernel, sm_scale=sm_scale, num_pools=len(pools),
                               kv_format=kv_format, windowed=windowed, sink_tokens=sink_tokens,
                               local_tokens=local_tokens, block_q=block_q, group=gp, d=d)
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, rows_block, d_pad), lambda b, h, i: (b, h, i, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="paged_prefill_attention",
    )(*operands)


def _validate(q, pools, tables, starts, chunk_lens, sources, windowed, impl):
    if q.ndim != 4 or jnp.dtype(q.dtype) not in _DTYPES:
        raise ValueError(f"q must be float32/bfloat16/float16 [B, T, Hq, D]; got {q.shape} "
                         f"{q.dtype}")
    if not 1 <= len(pools) <= 2 or len(tables) != len(pools) or len(windowed) != len(pools):
        raise ValueError(f"one or two pools, each with its table and windowed flag; got "
                         f"{len(pools)} pools, {len(tables)} tables, {len(windowed)} flags")
    kv_format = _kv_format(pools)
    b, _, hq, d = q.shape
    if not sources or hq % len(sources):
        raise ValueError(f"{hq} query heads must be a multiple of the {len(sources)} KV heads")
    page_size = pools[0][0].shape[2]
    for pool, table in zip(pools, tables):
        width = d // 2 if kv_format == "int4" else d
        if pool[0].ndim != 4 or pool[0].shape != pool[1].shape or pool[0].shape[3] != width:
            raise ValueError(f"k and v pages must both be [Hpool, P, S, {width}]; got "
                             f"{pool[0].shape} {pool[1].shape}")
        if pool[0].shape[2] != page_size:
            raise ValueError("all pools must share one page size")
        if kv_format == "float" and pool[0].dtype != q.dtype:
            raise ValueError(f"float pages must have q's dtype {q.dtype}; got {pool[0].dtype}")
        if table.ndim != 2 or table.shape[0] != b or table.dtype != jnp.int32:
            raise ValueError(f"tables must be int32 [B={b}, W]; got {table.shape} "
                             f"{table.dtype}")
    for h, (pool, head) in enumerate(sources):
        if not (0 <= pool < len(pools) and 0 <= head < pools[pool][0].shape[0]):
            raise ValueError(f"KV head {h}: source (pool={pool}, head={head}) does not exist")
    for name, x in (("starts", starts), ("chunk_lens", chunk_lens)):
        if x.shape != (b,) or x.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32 [B={b}]; got {x.shape} {x.dtype}")
    if impl == "triton" and (page_size < 16 or page_size & (page_size - 1)):
        raise ValueError(f"{page_size=} must be a power of two >= 16 for the Pallas kernel")
    return kv_format


@functools.partial(jax.jit, static_argnames=(
    "sources", "windowed", "sink_tokens", "local_tokens", "sm_scale", "impl", "interpret",
    "block_q", "num_warps", "num_stages"))
def paged_prefill_attention(q, pools, tables, starts, chunk_lens, *, sources, windowed,
                            sink_tokens=0, local_tokens=1, sm_scale=None, impl="triton",
                            interpret=False, block_q=None, num_warps=4, num_stages=2):
    """Causal attention of prompt chunks over their sequences' paged keys and values.

    Args:
      q: [B, T, Hq, D] float32, bfloat16 or float16, right-padded chunk queries (RoPE applied).
      pools: one or two pool tuples of one format (`pooled_decode_attention`'s: float (k, v)
        [Hpool, P, S, D] in q's dtype; int8/fp8 (k, v, k_scale, v_scale); int4 (k, v, k_meta,
        v_meta, k_smooth, v_smooth)), holding every key the chunk sees, its own included.
      tables: per pool [B, W] int32: the physical page of each page-table column of the row
        (NULL_PAGE 0 where the pool keeps nothing).
      starts: [B] int32 position of q[:, 0]; chunk_lens: [B] int32 real queries per row.
      sources: static, per KV head its (pool, head in that pool); Hq / Hkv query heads each.
      windowed: static, per pool: its heads see only keys j < sink_tokens or j > i -
        local_tokens (LServe's Λ mask) in mapped columns.
      sm_scale: logit scale, default 1/sqrt(D).
      impl: "triton" (the kernel, S a power of two >= 16) or "xla" (the reference).
      interpret: run the kernel in Pallas interpret mode (CPU testing).
      block_q: chunk tokens per program (times the padded group, a power of two >= 16
        rows); default 64 // G, at least 16 rows.
      num_warps, num_stages: Triton launch settings.

    Returns:
      [B, T, Hq, D] in q's dtype; zeros for padding queries (t >= chunk_lens).
    """
    pools = tuple(tuple(p) for p in pools)
    tables = tuple(tables)
    impl = check_impl(impl, "paged_prefill_attention")
    kv_format = _validate(q, pools, tables, starts, chunk_lens, sources, windowed, impl)
    b, t, hq, d = q.shape
    hkv = len(sources)
    g = hq // hkv
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    if impl == "xla" or t == 0:
        return paged_prefill_attention_reference(
            q, pools, tables, starts, chunk_lens, sources=sources, windowed=windowed,
            sink_tokens=sink_tokens, local_tokens=local_tokens, sm_scale=sm_scale)
    gp, d_pad = pl.next_power_of_2(g), _padded_size(d)
    if block_q is None:
        block_q = max(64 // gp, 1)
    block_q = max(block_q, -(-16 // gp))  # Triton dots need 16 rows
    if block_q & (block_q - 1):
        raise ValueError(f"{block_q=} must be a power of two")
    tp = -(-t // block_q) * block_q
    qk = q.reshape(b, t, hkv, g, d)
    v_factor = None
    if kv_format != "float":
        first = 2 if kv_format == "scaled" else 4
        k_factor = _per_list(pools, sources, first)  # [Hkv, D]
        v_factor = _per_list(pools, sources, first + 1)
        qk = (qk.astype(jnp.float32) * k_factor[None, None, :, None, :]).astype(q.dtype)
        pools = tuple(pool[:4] if kv_format == "int4" else pool[:2] for pool in pools)
    qk = jnp.pad(qk, ((0, 0), (0, tp - t), (0, 0), (0, gp - g), (0, d_pad - d)))
    qk = jnp.moveaxis(qk, 2, 1).reshape(b, hkv, tp * gp, d_pad)  # row = token * Gp + head
    if d_pad != d:  # copies the pools: for tests and odd head dims only
        width = d_pad // 2 if kv_format == "int4" else d_pad
        pad = ((0, 0), (0, 0), (0, 0), (0, width - pools[0][0].shape[3]))
        pools = tuple((jnp.pad(p[0], pad), jnp.pad(p[1], pad)) + p[2:] for p in pools)
    out = _pallas_prefill(
        qk, pools, tables, starts, chunk_lens, jnp.asarray(np.array(sources, np.int32)),
        windowed=windowed, sink_tokens=sink_tokens, local_tokens=local_tokens, block_q=block_q,
        group=gp, d=d, sm_scale=sm_scale, kv_format=kv_format, num_warps=num_warps,
        num_stages=num_stages, interpret=interpret)
    out = out.reshape(b, hkv, tp, gp, d_pad)[:, :, :t, :g, :d]
    if v_factor is not None:
        out = out * v_factor[None, :, None, None, :]
    out = jnp.moveaxis(out, 1, 2).reshape(b, t, hq, d)
    valid = jnp.arange(t)[None] < chunk_lens[:, None]
    return jnp.where(valid[:, :, None, None], out, 0).astype(q.dtype)
