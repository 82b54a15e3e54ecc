"""The attention seam: every attention call of the model goes through these two functions.

`prefill_attention` runs over a whole (right-padded) prompt, `decode_attention` over the paged
cache for one new token per sequence. `AttentionConfig.impl` picks the kernels (one of
`pallas_kernels.impls.IMPLS`: "triton" Pallas kernels, "xla" their plain-jnp references);
`mode` picks dense attention or LServe's unified sparse attention: the
streaming heads' Λ mask in prefill (LServe §4), and in decode the streaming heads' sink + ring
pages and the dense heads' selected pages (LServe, arXiv 2502.14866).

Einsum alphabet used in models/: b batch, t query position, s key position, h query head,
k KV head, g query head within a GQA group, d head dim, e model (hidden) dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from models import page_selector, streaming_pool
from models import kv_cache
from models.kv_cache import KVCache
from pallas_kernels.paged_decode import gather_pages
from models.sparsity import SparsityConfig
from pallas_kernels.impls import normalize_impl
from pallas_kernels import (MAX_SELECT_PAGES, page_scores, paged_prefill_attention,
                            pooled_decode_attention, pooled_decode_attention_reference,
                            select_top_pages, sparse_prefill_attention)

ATTENTION_MODES = ("dense", "lserve")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    """Static attention settings, passed to jit as a static argument.

    `mode` picks dense attention or LServe's; `impl` the kernels or their jnp references
    (`interpret` runs the kernels in Pallas interpret mode). `streaming_heads[layer][kv_head]`
    marks LServe streaming heads; None means every head is dense. Every sparsity knob (the
    prefill and decode Λ windows, the token budget, the page selection and its interval,
    `keep_first_pages`, the page sizes) is `sparsity`'s, the one `SparsityConfig` (see
    models/sparsity.py); the knobs only apply in "lserve" mode, where the KV cache must have
    `sparsity`'s page sizes (`check_cache_pages`).
    """

    mode: str = "dense"
    impl: str = "xla"
    interpret: bool = False
    streaming_heads: tuple[tuple[bool, ...], ...] | None = None
    sparsity: SparsityConfig = SparsityConfig()

    def __post_init__(self):
        if self.mode not in ATTENTION_MODES:
            raise ValueError(f"attention mode={self.mode!r} must be one of {ATTENTION_MODES}")
        object.__setattr__(self, "impl", normalize_impl(self.impl))  # "pallas" -> "triton"
        if not isinstance(self.sparsity, SparsityConfig):
            raise TypeError(f"sparsity={self.sparsity!r} must be a SparsityConfig")

    @property
    def has_streaming(self) -> bool:
        return (self.mode == "lserve" and self.streaming_heads is not None
                and any(any(layer) for layer in self.streaming_heads))

    def for_layer(self, layer: int, num_kv_heads: int) -> AttentionConfig:
        """The config as layer `layer` sees it: its streaming flags as the only layer, to go
        with a one-layer cache view (`KVCache.layer_view`)."""
        if self.streaming_heads is None:
            return self
        return dataclasses.replace(self,
                                   streaming_heads=(self.layer_streaming(layer, num_kv_heads),))

    def layer_streaming(self, layer: int, num_kv_heads: int) -> tuple[bool, ...]:
        """Streaming flags of one layer's KV heads (all False in dense mode)."""
        if self.mode == "dense" or self.streaming_heads is None:
            return (False,) * num_kv_heads
        flags = self.streaming_heads[layer]
        if len(flags) != num_kv_heads:
            raise ValueError(
                f"layer {layer}: head pattern has {len(flags)} KV heads, model has {num_kv_heads}"
            )
        return tuple(bool(f) for f in flags)


def prefill_attention(q: jax.Array, k: jax.Array, v: jax.Array, seq_lens: jax.Array, *,
                      layer: int, config: AttentionConfig) -> jax.Array:
    """Causal self-attention over right-padded prompts.

    q [B, T, Hq, D]; k, v [B, T, Hkv, D]; seq_lens [B] -> [B, T, Hq, D].
    Dense heads see all earlier tokens; in LServe mode, streaming heads see the sink and the
    local window only (LServe, arXiv 2502.14866). One kernel launch serves both kinds of head.
    """
    streaming = jnp.asarray(config.layer_streaming(layer, k.shape[2]), jnp.int32)
    return sparse_prefill_attention(
        q, k, v, streaming,
        sink_tokens=config.sparsity.ctx_sink_tokens,
        local_tokens=config.sparsity.ctx_local_tokens,
        seq_lens=seq_lens, impl=config.impl, interpret=config.interpret)


def check_cache_pages(cache: KVCache, config: AttentionConfig) -> None:
    """In LServe mode the cache is read with `config.sparsity`'s page sizes (the streaming
    layout, the budget in pages, the key statistics): refuse a cache built with others. Static
    shapes only, so this costs nothing under jit. Dense attention reads any paged cache."""
    if config.mode != "lserve":
        return
    s = config.sparsity
    if cache.page_size != s.page_size:
        raise ValueError(f"the cache's page_size={cache.page_size} != the attention config's "
                         f"sparsity.page_size={s.page_size}; build the cache from the config "
                         "(llama.cache_spec)")
    if cache.kmax and cache.logical_page_size != s.logical_page_size:
        raise ValueError(f"the cache's logical_page_size={cache.logical_page_size} != the "
                         f"attention config's sparsity.logical_page_size={s.logical_page_size}; "
                         "build the cache from the config (llama.cache_spec)")


def cache_streaming_layout(cache: KVCache, config: AttentionConfig
                           ) -> streaming_pool.StreamingLayout | None:
    """The streaming pool's layout of `cache` under `config` (None when it has no streaming
    pool), after `check_cache_pages`."""
    check_cache_pages(cache, config)
    return config.sparsity.streaming_layout if cache.sk else None


def _head_split(cache: KVCache, layer: int, config: AttentionConfig
                ) -> tuple[list[int], list[int]]:
    """Dense and streaming KV-head ids of a layer, checked against the cache's pools (and, in
    LServe mode, its page sizes against the config's)."""
    check_cache_pages(cache, config)
    num_dense = cache.k[layer].shape[0]
    num_kv_heads = num_dense + (cache.sk[layer].shape[0] if cache.sk else 0)
    flags = config.layer_streaming(layer, num_kv_heads)
    dense, stream = kv_cache.split_heads(flags)
    if len(dense) != num_dense:
        raise ValueError(f"layer {layer}: the cache holds {num_dense} dense heads, the attention "
                         f"config has {len(dense)}")
    return dense, stream


def _pad_entries(x: jax.Array, capacity: int) -> jax.Array:
    """[B, L, k] -> [B, L, capacity] with zeros (the null page, or an empty range)."""
    return jnp.pad(x, ((0, 0), (0, 0), (0, capacity - x.shape[2])))


def decode_attention(q: jax.Array, cache: KVCache, slots: jax.Array, lengths: jax.Array,
                     selected: jax.Array | None, *, layer: int, config: AttentionConfig,
                     entries: jax.Array | None = None) -> jax.Array:
    """Attention of one new query per sequence over its pages (LServe, arXiv 2502.14866).

    q [B, Hq, D]; cache holds the layer's pools with the new token already written; slots [B];
    lengths [B] tokens to attend (including the new one); selected [B, Hsel, K] the dense heads'
    page-table columns in LServe mode (from `select_pages_for_step`), None for dense attention
    over all pages. Returns [B, Hq, D].

    Both kinds of head run in one launch of the paged decode kernel (`pooled_decode_attention`):
    one page list per KV head (G query rows) or, with per-query-head selection, one per query
    head (one row; a streaming head's G lists then share its pages). Dense lists name the
    selected (or all) pages of the dense pool, streaming lists the sink and ring pages of the
    streaming pool; lists are in head order, so the output needs no reordering.

    `entries` [E, 2] (row, page-table column; rows >= B are padding), when given with
    `selected` None on the CPU path, lists the pages the dense heads read, so the rows' pages
    are gathered once each, raggedly (`_entry_attention`), instead of every row reading the
    batch's widest page table.
    """
    b, hq, d = q.shape
    dense, stream = _head_split(cache, layer, config)
    hkv = len(dense) + len(stream)
    g = hq // hkv
    page_size = cache.page_size
    per_query_head = selected is not None and selected.shape[1] != len(dense)
    lists_per_head, rows = (g, 1) if per_query_head else (1, g)
    num_pages = (lengths + page_size - 1) // page_size  # [B]
    parts, pools = [], []  # (pages, lo, hi, num_entries) of the dense lists, then streaming
    if dense:
        table = cache.page_table[slots]  # [B, P]
        if selected is None:  # every page, one list per KV head
            columns = jnp.broadcast_to(jnp.arange(table.shape[1], dtype=jnp.int32),
                                       (b, len(dense), table.shape[1]))
            dense_count = num_pages
        else:
            columns = selected
            dense_count = jnp.minimum(columns.shape[2], num_pages)
        pages_d = jnp.take_along_axis(table[:, None, :], columns, axis=2)  # [B, Ld, Kd]
        hi_d = jnp.clip(lengths[:, None, None] - columns * page_size, 0, page_size)
        count_d = jnp.broadcast_to(dense_count[:, None], columns.shape[:2])
        parts.append((pages_d, jnp.zeros_like(pages_d), hi_d.astype(jnp.int32), count_d))
        pools.append(cache.pool("k", layer))
    if stream:
        layout = config.sparsity.streaming_layout
        lo_s, hi_s = streaming_pool.page_ranges(layout, lengths)  # [B, n]
        shape = (b, len(stream) * lists_per_head, layout.num_pages)
        widen = lambda x: jnp.broadcast_to(x[:, None], shape)  # noqa: E731
        parts.append((widen(cache.stream_table[slots]), widen(lo_s), widen(hi_s),
                      jnp.full(shape[:2], layout.num_pages, jnp.int32)))
        pools.append(cache.pool("sk", layer))
    # List t = head * lists_per_head + j in head order is list `order[t]` of the parts'
    # concatenation, reading KV head `sources[t][1]` of pool `sources[t][0]`.
    order, sources = [], []
    for head in range(hkv):
        if head in dense:
            pool, index, first = 0, dense.index(head), 0
        else:
            pool, index, first = len(pools) - 1, stream.index(head), len(dense) * lists_per_head
        for j in range(lists_per_head):
            order.append(first + index * lists_per_head + j)
            sources.append((pool, index))
    order = np.array(order)
    qlists = q.reshape(b, hkv * lists_per_head, rows, d)
    if config.impl == "xla":
        # The CPU path gathers every entry it is given, so each pool's lists keep their own
        # length (streaming lists 7 entries, not the dense lists' budget).
        position = np.argsort(order)  # head-order position of each concatenated list
        firsts = np.cumsum([0] + [part[0].shape[1] for part in parts])
        outs = [pooled_decode_attention_reference(
            qlists[:, position[first:first + part[0].shape[1]]], (pool,), *part,
            sources=tuple((0, i // lists_per_head) for i in range(part[0].shape[1])))
            if not (i == 0 and dense and entries is not None and selected is None) else
            _entry_attention(qlists[:, position[:len(dense)]], pool, cache.page_table[slots],
                             lengths, entries)
            for i, (part, pool, first) in enumerate(zip(parts, pools, firsts))]
        out = jnp.concatenate(outs, axis=1)[:, order]
    else:
        capacity = max(part[0].shape[2] for part in parts)
        pages, lo, hi, counts = (
            jnp.concatenate([_pad_entries(part[i], capacity) if i < 3 else part[i]
                             for part in parts], axis=1)[:, order] for i in range(4))
        out = pooled_decode_attention(qlists, tuple(pools), pages, lo, hi, counts,
                                      sources=tuple(sources), impl=config.impl,
                                      interpret=config.interpret)
    return out.reshape(b, hq, d).astype(q.dtype)


def _entry_attention(q: jax.Array, pool: tuple[jax.Array, jax.Array], table: jax.Array,
                     lengths: jax.Array, entries: jax.Array) -> jax.Array:
    """Dense heads' decode attention over ragged page entries (the CPU path).

    q [B, H, G, D] (one list per KV head); pool (k, v) [H, P, S, D] (or with their scales,
    `KVCache.pool`); table [B, W] the rows' page tables; lengths [B]; entries [E, 2]
    (row, column), rows >= B padding. Each entry's page is gathered once for its row, scored against that row's queries, and the softmax is
    taken over each row's entries (segment max and sums). Returns [B, H, G, D] f32, zeros for
    a row with no visible key; equal to attending over the whole table row.
    """
    b, h, g, d = q.shape
    s = pool[0].shape[2]
    row, col = entries[:, 0], entries[:, 1]
    live = row < b
    r = jnp.clip(row, 0, b - 1)
    page = jnp.where(live, table[r, jnp.clip(col, 0, table.shape[1] - 1)], kv_cache.NULL_PAGE)
    heads = jnp.arange(h)[None, :]
    gather = lambda x: gather_pages(x, heads, page[:, None])  # noqa: E731
    keys = kv_cache.read_pool(pool, 0, gather)  # [E, H, S, D]
    values = kv_cache.read_pool(pool, 1, gather)
    visible = live[:, None] & (col[:, None] * s + jnp.arange(s)[None] < lengths[r][:, None])
    scores = jnp.einsum("ehsd,ehgd->ehgs", keys.astype(jnp.float32), q[r].astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST) / np.sqrt(d)
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    m = jax.ops.segment_max(jnp.max(scores, axis=-1), r, num_segments=b)  # [B, H, G]
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(visible[:, None, None], jnp.exp(scores - m[r][..., None]), 0.0)
    values = jnp.where(visible[:, None, :, None], values.astype(jnp.float32), 0.0)
    out = jax.ops.segment_sum(jnp.einsum("ehgs,ehsd->ehgd", p, values,
                                         precision=jax.lax.Precision.HIGHEST), r, num_segments=b)
    denom = jax.ops.segment_sum(jnp.sum(p, axis=-1), r, num_segments=b)
    return out / jnp.where(denom == 0, 1.0, denom)[..., None]


def select_pages_for_step(q: jax.Array, cache: KVCache, slots: jax.Array, lengths: jax.Array,
                          need: jax.Array, *, layer: int, config: AttentionConfig) -> jax.Array:
    """The dense heads' page lists for this decode step: recomputed for rows in `need`, the
    stored selection for the others (selector reuse, LServe, arXiv 2502.14866).

    q [B, Hq, D]; lengths [B] including the new token; need [B] bool. Returns
    [B, Hsel, K] page-table columns (see `page_selector.select_dense_pages`); histories not
    longer than the budget take all their pages.

    Only rows in `need` with more pages than the budget are scored. With the kernels (the
    GPU path) the scoring and top-K kernels skip the other rows inside the kernel, so the step
    has no branch: on a GPU each `lax.cond` copies its predicate to the host and waits, once per
    layer. The XLA path (the CPU path, where a branch costs nothing) skips the scoring with one
    `lax.cond` when no row needs it.
    """
    b, hq, d = q.shape
    dense, stream = _head_split(cache, layer, config)
    g = hq // (len(dense) + len(stream))
    stored = cache.selected[layer][slots]  # [B, Hsel, K]
    if not dense:  # every head of this layer streams: nothing to select
        return stored
    k = stored.shape[2]
    num_pages = (lengths + cache.page_size - 1) // cache.page_size
    qd = q.reshape(b, len(dense) + len(stream), g, d)[:, dense]
    per_query_head = config.sparsity.page_selection == "query_head"
    table = cache.page_table[slots]
    if config.impl != "xla":
        scoring = need & (num_pages > k)
        scores = page_scores(qd, cache.kmax[layer], cache.kmin[layer], table, num_pages, scoring,
                             per_query_head=per_query_head, impl=config.impl,
                             interpret=config.interpret)
        # The top-K kernel holds a whole row of page scores; longer rows sort in XLA.
        top_k_impl = config.impl if table.shape[1] <= MAX_SELECT_PAGES else "xla"
        fresh = select_top_pages(scores, num_pages, need, budget_pages=k,
                                 keep_first_pages=config.sparsity.keep_first_pages, impl=top_k_impl,
                                 interpret=config.interpret)
        return jnp.where(need[:, None, None], fresh, stored)

    def score():
        return page_selector.select_dense_pages(
            qd, cache.kmax[layer], cache.kmin[layer], table, num_pages, budget_pages=k,
            per_query_head=per_query_head, keep_first_pages=config.sparsity.keep_first_pages)

    def all_pages():
        column = jnp.arange(k, dtype=jnp.int32)
        return jnp.broadcast_to(jnp.where(column < num_pages[:, None], column, 0)[:, None],
                                stored.shape)

    fresh = jax.lax.cond(jnp.any(need & (num_pages > k)), score, all_pages)
    return jnp.where(need[:, None, None], fresh, stored)


@struct.dataclass
class LayerStep:
    """What every layer of one forward step shares, besides its params, x and its cache view.

    slots [B] cache rows; positions, valid [B, T] each token's position and whether it is
    stored (padding and inactive rows are not); lengths [B] tokens of each slot once these are
    written (a prefill attends within them, a decode step over them); cos, sin [B, T, D] RoPE;
    need [B] the decode rows whose page selection is recomputed (None in a prefill);
    entries [E, 2] (decode, optional): the (row, page-table column) pairs of the pages the rows
    attend to, for the CPU path of dense-head attention over all pages (`decode_attention`).
    `decode` (static): one new token per row over the paged cache; `chunk` (static): a prefill
    chunk that continues cached tokens (attends over the pages and the prefill window), or with
    `fresh` (static) a chunk of rows that all start at position 0 (attends within the chunk,
    as a whole prompt does); neither: whole prompts.
    """

    slots: jax.Array
    positions: jax.Array
    valid: jax.Array
    lengths: jax.Array
    cos: jax.Array
    sin: jax.Array
    need: jax.Array | None = None
    entries: jax.Array | None = None
    decode: bool = struct.field(pytree_node=False, default=False)
    chunk: bool = struct.field(pytree_node=False, default=False)
    fresh: bool = struct.field(pytree_node=False, default=False)


def store_layer(cache: KVCache, k: jax.Array, v: jax.Array, step: LayerStep, *,
                config: AttentionConfig) -> KVCache:
    """Write a layer's new keys and values (k, v [B, T, Hkv, D], post-RoPE) into a one-layer
    cache view (`KVCache.layer_view`), `config` from `AttentionConfig.for_layer`: dense heads
    into their pages and key statistics, streaming heads into their sink and ring (and, for a
    prefill chunk, into its prefill window pages)."""
    return kv_cache.write_tokens(
        cache, 0, step.slots, step.positions, step.valid, step.lengths, k, v,
        streaming_heads=config.layer_streaming(0, k.shape[2]),
        layout=cache_streaming_layout(cache, config), window=step.chunk, impl=config.impl,
        interpret=config.interpret)


def chunk_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache: KVCache, step: LayerStep,
                    *, config: AttentionConfig) -> jax.Array:
    """Attention of a prefill chunk over its sequence's cached tokens and itself, causally:
    query t of row b at position i = `step.positions[b, t]` sees keys j <= i; in LServe mode a
    streaming head only those with j < ctx_sink_tokens or j > i - ctx_local_tokens (the Λ mask
    of `prefill_attention`). q [B, T, Hq, D]; k, v [B, T, Hkv, D] the chunk's keys and values;
    cache a one-layer view. Returns [B, T, Hq, D]; padding queries (not `step.valid`) get zeros.

    Every key comes from the pages, the chunk's own included (`store_layer` wrote them first):
    the dense heads' through the page table, the streaming heads' through the slot's prefill
    window (`KVCache.window_table`; the decode ring does not hold the prefill window,
    docs/design.md §6). One call of the paged prefill op serves both pools
    (`paged_prefill_attention`: the Pallas kernel on a GPU, its jnp reference on the CPU).
    """
    dense, stream = _head_split(cache, 0, config)
    pools, tables, windowed = [], [], []
    if dense:
        pools.append(cache.pool("k", 0))
        tables.append(cache.page_table[step.slots])
        windowed.append(False)
    if stream:
        if not cache.window_table.shape[1]:
            raise ValueError("a prefill chunk of a layer with streaming heads needs the cache's "
                             "prefill window pages (KVCacheSpec.num_window_pages)")
        pools.append(cache.pool("sk", 0))
        tables.append(cache.window_table[step.slots])
        windowed.append(True)
    sources = tuple((0, dense.index(h)) if h in dense else (len(pools) - 1, stream.index(h))
                    for h in range(len(dense) + len(stream)))
    s = config.sparsity
    return paged_prefill_attention(
        q, tuple(pools), tuple(tables), step.positions[:, 0],
        jnp.sum(step.valid, axis=1, dtype=jnp.int32), sources=sources, windowed=tuple(windowed),
        sink_tokens=s.ctx_sink_tokens, local_tokens=s.ctx_local_tokens, impl=config.impl,
        interpret=config.interpret)


def attend_layer(cache: KVCache, q: jax.Array, k: jax.Array, v: jax.Array, step: LayerStep, *,
                 config: AttentionConfig) -> tuple[KVCache, jax.Array]:
    """A layer's attention with its KV cache: store k, v, then attend. q [B, T, Hq, D]; cache
    a one-layer view and `config` its layer's (`for_layer`). Returns (cache, out [B, T, Hq, D]).

    A prefill attends within the prompts (`prefill_attention`); a decode step (T = 1) selects
    the dense heads' pages for rows in `step.need` (LServe), keeps the selection in the cache,
    and attends over the pages (`decode_attention`)."""
    cache = store_layer(cache, k, v, step, config=config)
    if step.chunk and not step.fresh:
        return cache, chunk_attention(q, k, v, cache, step, config=config)
    if not step.decode:
        return cache, prefill_attention(q, k, v, step.lengths, layer=0, config=config)
    selected = None
    if cache.selected:
        selected = select_pages_for_step(q[:, 0], cache, step.slots, step.lengths, step.need,
                                         layer=0, config=config)
        cache = cache.replace_layer(0, selected=cache.selected[0].at[step.slots].set(selected))
    out = decode_attention(q[:, 0], cache, step.slots, step.lengths, selected, layer=0,
                           config=config, entries=step.entries)
    return cache, out[:, None]
