"""The paged KV cache: a pytree of page pools, page tables and selector state, managed by pure
functions.

LServe (arXiv 2502.14866) keeps two pools per layer: dense heads store every token in pages
that grow with the sequence, streaming heads store only their sink and a ring of recent pages.
Array layouts (fixed here, used everywhere; Hd[l] / Hs[l] = dense / streaming KV heads of layer
l, in KV-head order; in dense mode every head is a dense head):

    k[l], v[l]          [Hd[l], num_pages, page_size, head_dim]            dense-head pool
    kmax[l], kmin[l]    [Hd[l], num_pages, page_size / logical_page_size, head_dim]
                        per-logical-page key statistics (empty tuples when not kept)
    page_table          [max_seqs, max_pages_per_seq] int32                shared by all layers
    seq_lens            [max_seqs] int32                                   tokens stored per slot
    num_reserved        [max_seqs] int32                                   pages owned per slot
    free                [num_pages] bool                                   page is unowned

    sk[l], sv[l]        [Hs[l], 1 + max_seqs * num_stream_pages, page_size, head_dim]
                        streaming-head pool (empty tuples when no layer has streaming heads)
    stream_table        [max_seqs, num_stream_pages] int32: the sink pages then the ring pages
                        of each slot (models/streaming_pool.py); fixed at init, because every
                        sequence owns the same constant number of them
    window_table        [max_seqs, max_pages_per_seq] int32 (width 0 without window pages):
                        the prefill window of each slot, page-table column -> streaming-pool
                        page, NULL_PAGE where the window keeps nothing. A prompt prefilled in
                        chunks keeps its streaming heads' keys for later chunks (the sink and
                        the last `ctx_local_tokens`, which the decode ring does not hold) in the
                        streaming pool's last `num_window_pages` pages, after the slots' pages;
                        their owner (the engine's scheduler) fills the table

    selected[l]         [max_seqs, Hsel[l], budget_pages] int32: page-table *columns* (a
                        sequence's page numbers, not pool page ids and not the 16-token logical
                        pages of the statistics) each dense head attends to, ascending;
                        Hsel[l] = Hd[l] for per-KV-head selection, Hd[l] * G per query head
    selected_num_pages  [max_seqs] int32: pages the slot had when `selected` was computed
                        (-1: never); entries at or past it are unused
    decode_steps        [max_seqs] int32: decode steps since the prefill (the selector's clock,
                        per sequence so requests can join a running batch at any step)

Quantized pools (`KVCacheSpec.kv_cache_dtype`, pallas_kernels/quant.py) keep the page layout:

    int8, fp8           k[l], v[l], sk[l], sv[l] int8 (float8_e4m3fn) [H, P, S, D];
                        k_scale[l], v_scale[l] (sk_scale, sv_scale) float32 [H, D]: the static
                        scale of each (KV head of the pool, channel)
    int4                k[l], ... uint8 [H, P, S, D / 2], two channels per byte;
                        k_scale[l], ... float16 [H, P, S, 2]: the (scale, zero point) of each
                        stored token of each head, written with it (so page copies, ring
                        overwrites and shared prefix pages carry their own);
                        k_smooth[l], ... float32 [H, D]: static per-channel factors a token is
                        divided by before its per-token quantization and multiplied by after
                        (QServe's SmoothAttention idea: outlier key channels no longer set
                        every token's range; they are the int8 calibration's scales)

The head axis comes first so a pool can later be sharded along KV heads. Page 0 of each pool is
the reserved null page (`NULL_PAGE`): it is never owned, every unused page-table entry points at
it, and writes for padding tokens or inactive slots land in it, so every index stays valid without
branches. Readers mask by `seq_lens`, so whatever the null page holds is never attended to.

Sequences are addressed by slot (row of the page table), never by batch position, so requests can
later join and leave a running batch.
"""

from __future__ import annotations

import dataclasses
import operator

import jax
import jax.numpy as jnp
from flax import struct

from models import streaming_pool
from models.streaming_pool import StreamingLayout
from pallas_kernels import append_tokens, quant

NULL_PAGE = 0
SCALES = ("k_scale", "v_scale", "sk_scale", "sv_scale")
SMOOTHING = ("k_smooth", "v_smooth", "sk_smooth", "sv_smooth")
PER_LAYER = ("k", "v", "kmax", "kmin", "sk", "sv", "selected") + SCALES + SMOOTHING


@struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    kmax: tuple[jax.Array, ...]
    kmin: tuple[jax.Array, ...]
    page_table: jax.Array
    seq_lens: jax.Array
    num_reserved: jax.Array
    free: jax.Array
    sk: tuple[jax.Array, ...]
    sv: tuple[jax.Array, ...]
    stream_table: jax.Array
    window_table: jax.Array
    selected: tuple[jax.Array, ...]
    selected_num_pages: jax.Array
    decode_steps: jax.Array
    k_scale: tuple[jax.Array, ...] = ()  # int8: [Hd[l], D]; int4: [Hd[l], P, S, 2]
    v_scale: tuple[jax.Array, ...] = ()
    sk_scale: tuple[jax.Array, ...] = ()  # the same for the streaming pool
    sv_scale: tuple[jax.Array, ...] = ()
    k_smooth: tuple[jax.Array, ...] = ()  # int4: [Hd[l], D]
    v_smooth: tuple[jax.Array, ...] = ()
    sk_smooth: tuple[jax.Array, ...] = ()
    sv_smooth: tuple[jax.Array, ...] = ()

    @property
    def quantized(self) -> bool:
        """The pools hold quantized values with their scales (`KVCacheSpec.kv_cache_dtype`)."""
        return bool(self.k_scale)

    @property
    def kv_cache_dtype(self) -> str:
        """"auto" (floats), "int8", "int4" or "fp8", read off the pools."""
        if not self.quantized:
            return "auto"
        return {jnp.dtype(jnp.uint8): "int4", jnp.dtype(jnp.int8): "int8"}.get(
            jnp.dtype(self.k[0].dtype), "fp8")

    def pool(self, name: str, layer: int) -> tuple:
        """One layer's (keys, values) of the dense ("k") or streaming ("sk") pool, with
        their scales when the cache is quantized: (k, v), int8 (k, v, k_scale, v_scale), int4
        (k, v, k_scale, v_scale, k_smooth, v_smooth) (see the module docstring), the form
        `pallas_kernels.pooled_decode_attention` reads."""
        prefix = "" if name == "k" else "s"
        k, v = getattr(self, prefix + "k")[layer], getattr(self, prefix + "v")[layer]
        if not self.quantized:
            return k, v
        names = ("k_scale", "v_scale") + (("k_smooth", "v_smooth")
                                          if self.kv_cache_dtype == "int4" else ())
        return (k, v) + tuple(getattr(self, prefix + name)[layer] for name in names)

    @property
    def page_size(self) -> int:
        return self.k[0].shape[2]

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[1]

    @property
    def logical_page_size(self) -> int | None:
        """Tokens per logical page of the key statistics; None when none are kept."""
        return self.page_size // self.kmax[0].shape[2] if self.kmax else None

    @property
    def max_seqs(self) -> int:
        return self.page_table.shape[0]

    @property
    def num_stream_pages(self) -> int:
        """Streaming pages per sequence (0 when no layer has streaming heads)."""
        return self.stream_table.shape[1]

    @property
    def first_window_page(self) -> int:
        """Streaming-pool id of the first prefill window page (after the null page and the
        slots' sink and ring pages)."""
        return 1 + self.max_seqs * self.num_stream_pages

    @property
    def budget_pages(self) -> int | None:
        """Pages a dense head attends per decode step; None when no selection state is kept."""
        return self.selected[0].shape[2] if self.selected else None

    def layer_view(self, layer: int) -> KVCache:
        """The cache as one layer sees it: a one-layer cache holding entry `layer` of every
        per-layer tuple (`PER_LAYER`) and the shared page tables, lengths and clocks. A layer
        step reads and writes only this view (models/llama.py `layer_step`); `with_layer` puts
        its per-layer arrays back. Views cost nothing under jit (no array is copied)."""
        return self.replace(**{name: getattr(self, name)[layer:layer + 1]
                               for name in PER_LAYER})

    def with_layer(self, layer: int, view: KVCache) -> KVCache:
        """The cache with entry `layer` of the per-layer arrays taken from a one-layer `view`
        (from `layer_view`); the shared arrays are this cache's (a layer step leaves them)."""
        return self.replace_layer(layer, **{name: getattr(view, name)[0]
                                            for name in PER_LAYER if getattr(view, name)})

    def replace_layer(self, layer: int, **arrays: jax.Array) -> KVCache:
        """The cache with entry `layer` of the named per-layer tuples replaced."""
        return self.replace(**{name: tuple(x if i != layer else arrays[name]
                                           for i, x in enumerate(getattr(self, name)))
                               for name in arrays})

    @property
    def max_pages_per_seq(self) -> int:
        return self.page_table.shape[1]


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVCacheSpec:
    """Capacities and head split of a cache. `num_pages` counts the null page.

    streaming_heads[l][kv_head] marks the streaming heads of layer l (None: all dense); they need
    `streaming_layout`. `budget_pages` (with `logical_page_size`) keeps the page selector's state,
    `selection_lists_per_head` page lists per dense KV head (1: per-KV-head selection, G:
    per-query-head selection).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_pages: int
    page_size: int
    max_seqs: int
    max_pages_per_seq: int
    dtype: str = "float32"
    logical_page_size: int | None = None  # keep key statistics at this granularity
    streaming_heads: tuple[tuple[bool, ...], ...] | None = None
    streaming_layout: StreamingLayout | None = None
    budget_pages: int | None = None
    selection_lists_per_head: int = 1
    num_window_pages: int = 0  # prefill window pages of the streaming pool (see `KVCache`)
    # "auto": the pools hold `dtype`; "int8" and "fp8" (static scales), "int4" (per-token scale
    # and zero point): pallas_kernels/quant.py
    kv_cache_dtype: str = "auto"
    # per layer (k scale, v scale), each one float or [num_kv_heads][head_dim] floats (one per
    # head and channel), normalized to the nested form: int8's scales (fp8 stretches them to
    # its range), int4's smoothing factors
    kv_scales: tuple | None = None

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_dim", "page_size", "max_seqs",
                     "max_pages_per_seq", "selection_lists_per_head"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_pages < 2:
            raise ValueError(f"num_pages={self.num_pages} must be >= 2 (page 0 is the null page)")
        lps = self.logical_page_size
        if lps is not None and (lps < 1 or self.page_size % lps):
            raise ValueError(f"logical_page_size={lps} must divide page_size={self.page_size}")
        flags = self.streaming_heads
        if flags is not None:
            if len(flags) != self.num_layers or any(len(f) != self.num_kv_heads for f in flags):
                raise ValueError(f"streaming_heads must be {self.num_layers} layers x "
                                 f"{self.num_kv_heads} KV heads")
            if any(any(f) for f in flags) and self.streaming_layout is None:
                raise ValueError("streaming heads need a streaming_layout")
        layout = self.streaming_layout
        if layout is not None and layout.page_size != self.page_size:
            raise ValueError(f"streaming_layout.page_size={layout.page_size} != {self.page_size=}")
        if self.num_window_pages < 0 or (self.num_window_pages and not self.has_streaming):
            raise ValueError(f"num_window_pages={self.num_window_pages} needs streaming heads "
                             "and must be >= 0")
        if self.budget_pages is not None and lps is None:
            raise ValueError("page selection (budget_pages) needs logical_page_size statistics")
        if not jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating):
            # A plain cast would wrap values, and integer statistics would turn their -inf /
            # +inf starting values into -128 / 127, so a fresh logical page would never be
            # recognised. Quantized pools go through pallas_kernels/quant.py.
            raise ValueError(f"dtype={self.dtype!r}: the pools hold floats; an integer KV "
                             "cache needs quantized writes (kv_cache_dtype, "
                             "pallas_kernels/quant.py), not a cast")
        quant.check_kv_cache_dtype(self.kv_cache_dtype, self.head_dim)
        if self.kv_cache_dtype != "auto":
            scales = self.kv_scales
            if scales is None or len(scales) != self.num_layers or any(
                    len(pair) != 2 for pair in scales):
                raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} needs kv_scales: one "
                                 f"(k_scale, v_scale) pair per layer ({self.num_layers})")
            object.__setattr__(self, "kv_scales", tuple(
                tuple(quant.check_scales(f"kv_scales[{layer}] {kind}", x, self.num_kv_heads,
                                         self.head_dim) for kind, x in zip("kv", pair))
                for layer, pair in enumerate(scales)))
        elif self.kv_scales is not None:
            raise ValueError("kv_scales are only used with a quantized kv_cache_dtype")

    @property
    def pool_dtype(self):
        """What the pools hold: int8 for an int8 KV cache, uint8 (two values a byte) for int4,
        else `dtype`."""
        return quant.pool_dtype(self.kv_cache_dtype, self.dtype)

    @property
    def pool_head_dim(self) -> int:
        """Last axis of a pool: head_dim, or head_dim / 2 bytes for int4."""
        return self.head_dim // 2 if self.kv_cache_dtype == "int4" else self.head_dim

    @property
    def token_head_bytes(self) -> int:
        """Bytes of one token of one KV head, keys and values together, scales included (int4:
        a float16 scale and zero point each; int8's static scales do not grow with tokens)."""
        if self.kv_cache_dtype == "int4":
            return 2 * (self.head_dim // 2 + 4)
        return 2 * self.head_dim * self.pool_dtype.itemsize

    @property
    def stats_dtype(self):
        """The key statistics' dtype: always a float type (the pools' when they hold floats;
        they are the max and min of unquantized keys, exact in it)."""
        dtype = jnp.dtype(self.dtype)
        return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.dtype(jnp.float32)

    @property
    def max_seq_len(self) -> int:
        return self.max_pages_per_seq * self.page_size

    def dense_heads(self, layer: int) -> tuple[int, ...]:
        """KV-head ids of layer `layer` kept in the dense pool, ascending."""
        flags = self.streaming_heads[layer] if self.streaming_heads else ()
        return tuple(h for h in range(self.num_kv_heads) if not (flags and flags[h]))

    def streaming_head_ids(self, layer: int) -> tuple[int, ...]:
        """KV-head ids of layer `layer` kept in the streaming pool, ascending."""
        dense = set(self.dense_heads(layer))
        return tuple(h for h in range(self.num_kv_heads) if h not in dense)

    @property
    def has_streaming(self) -> bool:
        return any(self.streaming_head_ids(layer) for layer in range(self.num_layers))


def init_cache(spec: KVCacheSpec) -> KVCache:
    """An empty cache: zero pools, all pages free except the null page, all slots empty."""
    dtype = spec.pool_dtype
    s, d, layers = spec.page_size, spec.head_dim, range(spec.num_layers)
    dense = [len(spec.dense_heads(layer)) for layer in layers]
    pool = lambda h, p: jnp.zeros((h, p, s, spec.pool_head_dim), dtype)  # noqa: E731
    stats = spec.logical_page_size is not None
    per_page = s // (spec.logical_page_size or 1)
    # Statistics are kept in the pool's dtype (16-bit for bf16/f16 models, as LServe keeps
    # them): the max and min of stored keys are exact in it, and a selection step reads half the
    # bytes of f32.
    stat = lambda h, fill: jnp.full((h, spec.num_pages, per_page, d), fill,  # noqa: E731
                                    spec.stats_dtype)
    if spec.has_streaming:
        n = spec.streaming_layout.num_pages
        stream_pages = 1 + spec.max_seqs * n + spec.num_window_pages
        stream_table = 1 + jnp.arange(spec.max_seqs * n, dtype=jnp.int32).reshape(-1, n)
    else:
        stream_pages, stream_table = 1, jnp.zeros((spec.max_seqs, 0), jnp.int32)
    selecting = spec.budget_pages is not None
    return KVCache(
        k=tuple(pool(dense[layer], spec.num_pages) for layer in layers),
        v=tuple(pool(dense[layer], spec.num_pages) for layer in layers),
        kmax=tuple(stat(dense[layer], -jnp.inf) for layer in layers) if stats else (),
        kmin=tuple(stat(dense[layer], jnp.inf) for layer in layers) if stats else (),
        page_table=jnp.full((spec.max_seqs, spec.max_pages_per_seq), NULL_PAGE, jnp.int32),
        seq_lens=jnp.zeros((spec.max_seqs,), jnp.int32),
        num_reserved=jnp.zeros((spec.max_seqs,), jnp.int32),
        free=jnp.arange(spec.num_pages) != NULL_PAGE,
        sk=tuple(pool(spec.num_kv_heads - dense[layer], stream_pages) for layer in layers)
        if spec.has_streaming else (),
        sv=tuple(pool(spec.num_kv_heads - dense[layer], stream_pages) for layer in layers)
        if spec.has_streaming else (),
        stream_table=stream_table,
        window_table=jnp.zeros((spec.max_seqs,
                                spec.max_pages_per_seq if spec.num_window_pages else 0), jnp.int32),
        selected=tuple(
            jnp.zeros((spec.max_seqs, dense[layer] * spec.selection_lists_per_head,
                       spec.budget_pages), jnp.int32) for layer in layers) if selecting else (),
        selected_num_pages=jnp.full((spec.max_seqs,), -1, jnp.int32),
        decode_steps=jnp.zeros((spec.max_seqs,), jnp.int32),
        **_scales(spec, dense, stream_pages),
    )


def _scales(spec: KVCacheSpec, dense: list[int], stream_pages: int) -> dict:
    """The per-layer scale arrays of a quantized cache, split by pool (empty tuples
    otherwise): int8 and fp8 the static scales; int4 zeroed per-token (scale, zero) pairs and
    the static smoothing factors."""
    if spec.kv_cache_dtype == "auto":
        return {}
    out = {}
    for i, kind in enumerate("kv"):
        full = [quant.static_scale(spec.kv_cache_dtype, jnp.asarray(pair[i], jnp.float32))
                for pair in spec.kv_scales]  # [Hkv, D]
        static = f"{kind}_smooth" if spec.kv_cache_dtype == "int4" else f"{kind}_scale"
        out[static] = tuple(x[jnp.asarray(spec.dense_heads(l), jnp.int32)]
                            for l, x in enumerate(full))
        if spec.has_streaming:
            out["s" + static] = tuple(x[jnp.asarray(spec.streaming_head_ids(l), jnp.int32)]
                                      for l, x in enumerate(full))
        if spec.kv_cache_dtype == "int4":
            meta = lambda h, p: jnp.zeros((h, p, spec.page_size, 2), jnp.float16)  # noqa: E731
            out[f"{kind}_scale"] = tuple(meta(h, spec.num_pages) for h in dense)
            if spec.has_streaming:
                out[f"s{kind}_scale"] = tuple(meta(spec.num_kv_heads - h, stream_pages)
                                              for h in dense)
    return out


def _concrete_int(x) -> int | None:
    """`x` as a Python int when its value is known now; None when it is traced (under jit)."""
    return None if isinstance(x, jax.core.Tracer) else operator.index(x)


def _check_slot(cache: KVCache, slot, fn: str) -> jax.Array:
    """Raise ValueError for a concrete slot outside [0, max_seqs); return the traced validity.

    Out-of-range indices must never reach an indexing op: JAX wraps negative indices and clamps
    out-of-range gathers, so a bad slot would silently address another sequence's row.
    """
    s = _concrete_int(slot)
    if s is not None and not 0 <= s < cache.max_seqs:
        raise ValueError(f"{fn}: slot={s} is out of range; valid slots are "
                         f"0..{cache.max_seqs - 1} (max_seqs={cache.max_seqs})")
    return (slot >= 0) & (slot < cache.max_seqs)


def reserve(cache: KVCache, slot: jax.Array, num_tokens: jax.Array) -> tuple[KVCache, jax.Array]:
    """Own enough pages in `slot` to hold `num_tokens` tokens in total.

    Pages are taken lowest-id first from the free set. Returns `(cache, ok)`; when the pool or the
    slot's page-table row is too small, `ok` is False and the cache comes back unchanged, so a
    failed request never disturbs other sequences. Usable inside and outside jit.

    Invalid input: with concrete arguments, a slot outside [0, max_seqs) or a negative
    `num_tokens` raises ValueError. Traced arguments cannot raise, so there they give `ok` False
    and the cache unchanged, like a request that does not fit (counts up to the int32 maximum
    included: the page count is computed without overflow).
    """
    valid_slot = _check_slot(cache, slot, "reserve")
    n = _concrete_int(num_tokens)
    if n is not None:
        if n < 0:
            raise ValueError(f"reserve: num_tokens={n} must be >= 0")
        # Every count past the row's capacity fails alike; saturating keeps it within int32.
        num_tokens = min(n, cache.max_pages_per_seq * cache.page_size + 1)
    page_size = cache.page_size
    row_index = jnp.where(valid_slot, slot, 0)  # a real row to read; discarded unless valid_slot
    have = cache.num_reserved[row_index]
    pages = num_tokens // page_size + (num_tokens % page_size != 0)  # ceil, cannot overflow
    need = jnp.maximum(pages - have, 0)
    ok = (valid_slot & (num_tokens >= 0) & (pages <= cache.max_pages_per_seq)
          & (need <= jnp.sum(cache.free)))
    # The i-th free page (ascending) goes to row entry have + i, for i < need.
    rank = jnp.cumsum(cache.free) - 1  # rank of each free page among free pages
    take = cache.free & (rank < need) & ok
    cols = jnp.where(take, have + rank, cache.max_pages_per_seq)  # out of range -> dropped
    row = cache.page_table[row_index].at[cols].set(jnp.arange(cache.num_pages, dtype=jnp.int32),
                                                   mode="drop")
    target = jnp.where(ok, slot, cache.max_seqs)  # past the last row: the writes are dropped
    return cache.replace(
        page_table=cache.page_table.at[target].set(row, mode="drop"),
        num_reserved=cache.num_reserved.at[target].add(need, mode="drop"),
        free=cache.free & ~take,
    ), ok


def release(cache: KVCache, slot: jax.Array) -> KVCache:
    """Free every page of `slot` and empty it. Page contents are left as they are: a page is
    only read below its owner's `seq_lens`, and the next owner overwrites before reading.

    Releasing an empty slot changes nothing. A concrete slot outside [0, max_seqs) raises
    ValueError; a traced one returns the cache unchanged (never another slot's row, which JAX's
    index clamping would otherwise pick)."""
    valid = _check_slot(cache, slot, "release")
    row_index = jnp.where(valid, slot, 0)  # a real row to read; discarded unless valid
    target = jnp.where(valid, slot, cache.max_seqs)  # past the last row: the writes are dropped
    row = cache.page_table[row_index]
    owned = valid & (jnp.arange(cache.max_pages_per_seq) < cache.num_reserved[row_index])
    freed = jnp.zeros_like(cache.free).at[jnp.where(owned, row, NULL_PAGE)].set(True)
    freed = freed.at[NULL_PAGE].set(False)
    return cache.replace(
        page_table=cache.page_table.at[target].set(NULL_PAGE, mode="drop"),
        seq_lens=cache.seq_lens.at[target].set(0, mode="drop"),
        num_reserved=cache.num_reserved.at[target].set(0, mode="drop"),
        free=cache.free | freed,
        selected_num_pages=cache.selected_num_pages.at[target].set(-1, mode="drop"),
        decode_steps=cache.decode_steps.at[target].set(0, mode="drop"),
    )


def token_pages(cache: KVCache, slots: jax.Array, positions: jax.Array,
                valid: jax.Array, table: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Physical (page, offset) of each token through `table` (default the page table; the
    window table for prefill window pages); invalid tokens go to the null page.

    slots [B], positions [B, T], valid [B, T] -> pages [B, T], offsets [B, T].
    """
    table = cache.page_table if table is None else table
    col = jnp.clip(positions // cache.page_size, 0, table.shape[1] - 1)
    pages = jnp.take_along_axis(table[slots], col, axis=1)
    pages = jnp.where(valid, pages, NULL_PAGE)
    return pages, positions % cache.page_size


def write_layer(pool: jax.Array, pages: jax.Array, offsets: jax.Array, x: jax.Array,
                scale: jax.Array | None = None) -> jax.Array:
    """Scatter new keys or values into one layer's float, int8 or fp8 pool (quantized with
    the static `scale` [Hkv, D] when it holds int8 or fp8, `quant.quantize_scaled`).

    pool [Hkv, P, S, D]; pages, offsets [B, T]; x [B, T, Hkv, D] -> pool.
    """
    # [B, T, Hkv, D] -> [Hkv, B, T, D] to line up with pool[:, pages, offsets].
    x = jnp.moveaxis(x, 2, 0)
    if scale is not None:  # [Hkv, D] per head and channel
        x = quant.quantize_scaled(x, scale[:, None, None, :], pool.dtype)
    else:
        x = x.astype(pool.dtype)
    return pool.at[:, pages, offsets].set(x)


def store(pool: jax.Array, scale: jax.Array | None, pages: jax.Array, offsets: jax.Array,
          x: jax.Array, smooth: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
    """Write x [B, T, Hkv, D] at (pages, offsets) [B, T] of a pool of any KV dtype and
    return (pool, scale): int4 divides by the static `smooth` [Hkv, D] and quantizes each
    token of each head (`quant.quantize_int4`), writing its (scale, zero) pair [Hkv, P, S, 2]
    beside it; float, int8 and fp8 pools keep their scale argument (None or the static
    [Hkv, D])."""
    if pool.dtype != jnp.uint8:
        return write_layer(pool, pages, offsets, x, scale), scale
    x = jnp.moveaxis(x, 2, 0).astype(jnp.float32) * (1.0 / smooth[:, None, None, :])
    packed, s, z = quant.quantize_int4(x)  # [Hkv, B, T, D / 2], [Hkv, B, T]
    return (pool.at[:, pages, offsets].set(packed),
            scale.at[:, pages, offsets].set(jnp.stack([s, z], axis=-1)))


def read_pool(pool: tuple, index: int, gather, head_axis: int = 1) -> jax.Array:
    """Keys (`index` 0) or values (1) of a pool tuple (`KVCache.pool`) at the entries
    `gather` picks, dequantized to f32 (`quant.dequantize_entries`). `gather` maps a per-head
    paged array [H, P, S, X] to its gathered form [..., S, X] with heads on `head_axis`."""
    def expand(factor, entries):  # [H, D] onto the entries' head and channel axes
        shape = [1] * entries.ndim
        shape[head_axis], shape[-1] = factor.shape
        return factor.reshape(shape)

    return quant.dequantize_entries(pool, index, gather, expand).astype(jnp.float32)


def update_key_stats(kmax: jax.Array, kmin: jax.Array, pages: jax.Array, offsets: jax.Array,
                     k: jax.Array, valid: jax.Array, *,
                     logical_page_size: int) -> tuple[jax.Array, jax.Array]:
    """Fold new post-RoPE keys into the per-logical-page key statistics (LServe, arXiv 2502.14866).

    kmax, kmin [H, P, L, D] with L = page_size // logical_page_size; pages, offsets [B, T] (from
    `token_pages`); k [B, T, H, D]; valid [B, T].

    A logical page restarts at −inf/+inf when its first token is written, so a page reused after
    `release` never carries a previous owner's keys into the bound; writes that continue a
    logical page (decode, chunked prefill) keep what is there. Invalid tokens only touch the
    null page, whose statistics are never read.
    """
    logical = offsets // logical_page_size  # [B, T]
    starts = valid & (offsets % logical_page_size == 0)
    keys = jnp.moveaxis(k, 2, 0).astype(kmax.dtype)  # [H, B, T, D]
    if k.shape[1] == 1:
        # One token per row (a decode step): no two valid rows share a logical page, so each
        # statistic is a read and a plain in-place write instead of a reset write plus a
        # scatter-max/min (on a GPU a read-modify-write loop per element for floats). Invalid
        # rows write into the null page.
        fresh = starts[None, :, :, None]
        new_max = jnp.where(fresh, keys, jnp.maximum(kmax[:, pages, logical], keys))
        new_min = jnp.where(fresh, keys, jnp.minimum(kmin[:, pages, logical], keys))
        return kmax.at[:, pages, logical].set(new_max), kmin.at[:, pages, logical].set(new_min)
    restart = jnp.where(starts, pages, NULL_PAGE)
    kmax = kmax.at[:, restart, logical].set(-jnp.inf)
    kmin = kmin.at[:, restart, logical].set(jnp.inf)
    live = valid[None, :, :, None]
    kmax = kmax.at[:, pages, logical].max(jnp.where(live, keys, -jnp.inf))
    kmin = kmin.at[:, pages, logical].min(jnp.where(live, keys, jnp.inf))
    return kmax, kmin


def split_heads(streaming_heads: tuple[bool, ...]) -> tuple[list[int], list[int]]:
    """A layer's KV-head ids by pool: (dense heads, streaming heads), each ascending."""
    return ([h for h, s in enumerate(streaming_heads) if not s],
            [h for h, s in enumerate(streaming_heads) if s])


def write_tokens(cache: KVCache, layer: int, slots: jax.Array, positions: jax.Array,
                 valid: jax.Array, lengths: jax.Array, k: jax.Array, v: jax.Array, *,
                 streaming_heads: tuple[bool, ...], layout: StreamingLayout | None,
                 window: bool = False, impl: str = "xla", interpret: bool = False) -> KVCache:
    """Store one layer's new keys/values: dense heads into the dense pool (and their key
    statistics, when kept), streaming heads into their sink/ring pages (LServe, arXiv 2502.14866).

    slots [B]; positions, valid [B, T]; lengths [B] tokens of each slot once these are written;
    k, v [B, T, Hkv, D] post-RoPE; streaming_heads: static flags of the layer's KV heads.
    Streaming heads only write the tokens that survive in their pages (`streaming_pool.survives`),
    so a long prefill never writes one ring slot twice. A decode step (T = 1) with
    `impl="triton"` writes each pool with one launch of the append kernel
    (`pallas_kernels.append_tokens`: keys, values and statistics together, in place) instead of
    one scatter per array. With `window` (a prefill chunk) streaming heads also store every
    token whose page-table column has a prefill window page (`KVCache.window_table`).
    """
    dense, stream = split_heads(streaming_heads)
    if len(dense) != cache.k[layer].shape[0]:
        raise ValueError(f"layer {layer}: the cache holds {cache.k[layer].shape[0]} dense heads, "
                         f"the attention config has {len(dense)}")
    head_dim = k.shape[3]
    # (the append kernel stores floats: a quantized cache quantizes in the scatter path)
    fused = (impl != "xla" and k.shape[1] == 1 and head_dim >= 16
             and not head_dim & (head_dim - 1) and not cache.quantized)
    scales = {name: getattr(cache, name)[layer] if getattr(cache, name) else None
              for name in SCALES + SMOOTHING}
    pages, offsets = token_pages(cache, slots, positions, valid)
    # Tokens that are not stored still land in the null page; write zeros there, so a non-finite
    # key or value of one row (a row stopped for NaN logits) never reaches the null page that
    # every other row's masked reads touch (a zero attention weight times NaN is NaN).
    k = jnp.where(valid[:, :, None, None], k, 0)
    v = jnp.where(valid[:, :, None, None], v, 0)
    kd, vd = k[:, :, dense], v[:, :, dense]
    arrays = {}
    if fused and dense:  # (a layer whose heads all stream has nothing to write here)
        stats = (cache.kmax[layer], cache.kmin[layer]) if cache.kmax else (None, None)
        out = append_tokens(cache.k[layer], cache.v[layer], kd[:, 0], vd[:, 0], pages[:, 0],
                            offsets[:, 0], valid[:, 0], *stats,
                            logical_page_size=cache.logical_page_size, impl=impl,
                            interpret=interpret)
        arrays.update(k=out[0], v=out[1])
        if cache.kmax:
            arrays.update(kmax=out[2], kmin=out[3])
    elif not fused:
        for name, x in (("k", kd), ("v", vd)):
            arrays[name], scales[name + "_scale"] = store(
                getattr(cache, name)[layer], scales[name + "_scale"], pages, offsets, x,
                scales[name + "_smooth"])
        if cache.kmax:
            arrays["kmax"], arrays["kmin"] = update_key_stats(
                cache.kmax[layer], cache.kmin[layer], pages, offsets, kd, valid,
                logical_page_size=cache.logical_page_size)
    if stream:
        kept = valid & streaming_pool.survives(layout, positions, lengths[:, None])
        index, offsets = streaming_pool.token_slot(layout, positions)
        pages = jnp.take_along_axis(cache.stream_table[slots], index, axis=1)
        pages = jnp.where(kept, pages, NULL_PAGE)
        ks = jnp.where(kept[:, :, None, None], k[:, :, stream], 0)
        vs = jnp.where(kept[:, :, None, None], v[:, :, stream], 0)
        if fused:
            arrays["sk"], arrays["sv"], _, _ = append_tokens(
                cache.sk[layer], cache.sv[layer], ks[:, 0], vs[:, 0], pages[:, 0],
                offsets[:, 0], kept[:, 0], impl=impl, interpret=interpret)
        else:
            for name, x in (("sk", ks), ("sv", vs)):
                arrays[name], scales[name + "_scale"] = store(
                    getattr(cache, name)[layer], scales[name + "_scale"], pages, offsets, x,
                    scales[name + "_smooth"])
        if window and cache.window_table.shape[1]:
            pages, offsets = token_pages(cache, slots, positions, valid, cache.window_table)
            kept = valid & (pages != NULL_PAGE)
            for name, x in (("sk", k), ("sv", v)):
                x = jnp.where(kept[:, :, None, None], x[:, :, stream], 0)
                arrays[name], scales[name + "_scale"] = store(
                    arrays[name], scales[name + "_scale"], pages, offsets, x,
                    scales[name + "_smooth"])
            names = ("sk", "sv") + (("sk_scale", "sv_scale") if cache.kv_cache_dtype == "int4"
                                    else ())
            restored = restore_stream_pages(
                cache, slots, positions[:, 0], lengths, valid[:, 0],
                tuple(arrays[n] if n in arrays else scales[n] for n in names), layout)
            arrays.update(zip(names, restored))
    if cache.kv_cache_dtype == "int4":  # the per-token scales written beside the pages
        arrays.update({name: scales[name] for name in SCALES if scales[name] is not None})
    return cache.replace_layer(layer, **arrays)


def restore_stream_pages(cache: KVCache, slots: jax.Array, starts: jax.Array,
                         lengths: jax.Array, active: jax.Array, pools: tuple[jax.Array, ...],
                         layout: StreamingLayout) -> tuple[jax.Array, ...]:
    """Copy into each slot's decode sink and ring the keys and values of positions before its
    chunk, from the slot's prefill window pages (`KVCache.window_table`), where the window
    holds them.

    slots, starts, lengths, active [B]: the chunk of an active row covers [starts, lengths).
    pools: the layer's streaming pools (sk, sv, and an int4 cache's per-token scales) with
    the chunk already written, each [Hs, P, S, X]. After a prefix hit
    the slot's decode pages hold nothing of the shared prefix, and this is what fills them; a
    chunk that continues its own prefill rewrites what its earlier chunks stored there, with
    the same values (both are copies of the same keys).
    """
    s = cache.page_size
    held, _ = streaming_pool.slot_positions(layout, lengths)  # [B, P, S], -1: empty
    table = cache.window_table[slots]  # [B, W]
    col = jnp.clip(held // s, 0, table.shape[1] - 1)
    src = jnp.take_along_axis(table, col.reshape(col.shape[0], -1), axis=1).reshape(col.shape)
    take = (active[:, None, None] & (held >= 0) & (held < starts[:, None, None])
            & (src != NULL_PAGE))
    src = jnp.where(take, src, NULL_PAGE)
    dst = jnp.where(take, cache.stream_table[slots][:, :, None], NULL_PAGE)
    src_off = jnp.where(take, held % s, 0)
    dst_off = jnp.broadcast_to(jnp.arange(s), held.shape)
    out = []
    for pool in pools:
        x = jnp.where(take[None, ..., None], pool[:, src, src_off], 0)  # [H, B, P, S, X]
        out.append(pool.at[:, dst, dst_off].set(x))
    return tuple(out)
