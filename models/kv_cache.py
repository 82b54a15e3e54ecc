"""The paged KV cache: a pytree of page pools plus a page table, managed by pure functions.

Array layouts (fixed here, used everywhere):

    k[layer], v[layer]  [num_kv_heads, num_pages, page_size, head_dim]   one pool per layer
    kmax[layer], kmin[layer]
                        [num_kv_heads, num_pages, page_size / logical_page_size, head_dim]
                        per-logical-page key statistics (empty tuples when not kept)
    page_table          [max_seqs, max_pages_per_seq] int32               shared by all layers
    seq_lens            [max_seqs] int32                                  tokens stored per slot
    num_reserved        [max_seqs] int32                                  pages owned per slot
    free                [num_pages] bool                                  page is unowned

The head axis comes first so a pool can later be sharded along KV heads. Page 0 is the reserved
null page (`NULL_PAGE`): it is never owned, every unused page-table entry points at it, and writes
for padding tokens or inactive slots land in it, so every index stays valid without branches.
Readers mask by `seq_lens`, so whatever the null page holds is never attended to.

Sequences are addressed by slot (row of the page table), never by batch position, so requests can
later join and leave a running batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

NULL_PAGE = 0


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
    def max_pages_per_seq(self) -> int:
        return self.page_table.shape[1]


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVCacheSpec:
    """Capacities of a cache. `num_pages` counts the null page."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_pages: int
    page_size: int
    max_seqs: int
    max_pages_per_seq: int
    dtype: str = "float32"
    logical_page_size: int | None = None  # keep key statistics at this granularity

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_dim", "page_size", "max_seqs",
                     "max_pages_per_seq"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_pages < 2:
            raise ValueError(f"num_pages={self.num_pages} must be >= 2 (page 0 is the null page)")
        lps = self.logical_page_size
        if lps is not None and (lps < 1 or self.page_size % lps):
            raise ValueError(f"logical_page_size={lps} must divide page_size={self.page_size}")

    @property
    def max_seq_len(self) -> int:
        return self.max_pages_per_seq * self.page_size


def init_cache(spec: KVCacheSpec) -> KVCache:
    """An empty cache: zero pools, all pages free except the null page, all slots empty."""
    shape = (spec.num_kv_heads, spec.num_pages, spec.page_size, spec.head_dim)
    zeros = lambda: jnp.zeros(shape, jnp.dtype(spec.dtype))  # noqa: E731
    stats = 0 if spec.logical_page_size is None else spec.num_layers
    stats_shape = (spec.num_kv_heads, spec.num_pages,
                   spec.page_size // (spec.logical_page_size or 1), spec.head_dim)
    return KVCache(
        k=tuple(zeros() for _ in range(spec.num_layers)),
        v=tuple(zeros() for _ in range(spec.num_layers)),
        # Statistics are kept in f32 from the unquantized keys (DESIGN §1.6).
        kmax=tuple(jnp.full(stats_shape, -jnp.inf) for _ in range(stats)),
        kmin=tuple(jnp.full(stats_shape, jnp.inf) for _ in range(stats)),
        page_table=jnp.full((spec.max_seqs, spec.max_pages_per_seq), NULL_PAGE, jnp.int32),
        seq_lens=jnp.zeros((spec.max_seqs,), jnp.int32),
        num_reserved=jnp.zeros((spec.max_seqs,), jnp.int32),
        free=jnp.arange(spec.num_pages) != NULL_PAGE,
    )


def reserve(cache: KVCache, slot: jax.Array, num_tokens: jax.Array) -> tuple[KVCache, jax.Array]:
    """Own enough pages in `slot` to hold `num_tokens` tokens in total.

    Pages are taken lowest-id first from the free set. Returns `(cache, ok)`; when the pool or the
    slot's page-table row is too small, `ok` is False and the cache comes back unchanged, so a
    failed request never disturbs other sequences. Usable inside and outside jit.
    """
    page_size = cache.page_size
    have = cache.num_reserved[slot]
    need = jnp.maximum((num_tokens + page_size - 1) // page_size - have, 0)
    fits_row = have + need <= cache.max_pages_per_seq
    fits_pool = need <= jnp.sum(cache.free)
    ok = fits_row & fits_pool & (num_tokens >= 0)
    # The i-th free page (ascending) goes to row entry have + i, for i < need.
    rank = jnp.cumsum(cache.free) - 1  # rank of each free page among free pages
    take = cache.free & (rank < need) & ok
    cols = jnp.where(take, have + rank, cache.max_pages_per_seq)  # out of range -> dropped
    row = cache.page_table[slot].at[cols].set(jnp.arange(cache.num_pages, dtype=jnp.int32),
                                              mode="drop")
    return cache.replace(
        page_table=cache.page_table.at[slot].set(row),
        num_reserved=cache.num_reserved.at[slot].add(jnp.where(ok, need, 0)),
        free=cache.free & ~take,
    ), ok


def release(cache: KVCache, slot: jax.Array) -> KVCache:
    """Free every page of `slot` and empty it. Page contents are left as they are: a page is
    only read below its owner's `seq_lens`, and the next owner overwrites before reading."""
    row = cache.page_table[slot]
    owned = jnp.arange(cache.max_pages_per_seq) < cache.num_reserved[slot]
    freed = jnp.zeros_like(cache.free).at[jnp.where(owned, row, NULL_PAGE)].set(True)
    freed = freed.at[NULL_PAGE].set(False)
    return cache.replace(
        page_table=cache.page_table.at[slot].set(NULL_PAGE),
        seq_lens=cache.seq_lens.at[slot].set(0),
        num_reserved=cache.num_reserved.at[slot].set(0),
        free=cache.free | freed,
    )


def token_pages(cache: KVCache, slots: jax.Array, positions: jax.Array,
                valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Physical (page, offset) of each token; invalid tokens go to the null page.

    slots [B], positions [B, T], valid [B, T] -> pages [B, T], offsets [B, T].
    """
    col = jnp.clip(positions // cache.page_size, 0, cache.max_pages_per_seq - 1)
    pages = jnp.take_along_axis(cache.page_table[slots], col, axis=1)
    pages = jnp.where(valid, pages, NULL_PAGE)
    return pages, positions % cache.page_size


def write_layer(pool: jax.Array, pages: jax.Array, offsets: jax.Array, x: jax.Array) -> jax.Array:
    """Scatter new keys or values into one layer's pool.

    pool [Hkv, P, S, D]; pages, offsets [B, T]; x [B, T, Hkv, D] -> pool.
    """
    # [B, T, Hkv, D] -> [Hkv, B, T, D] to line up with pool[:, pages, offsets].
    return pool.at[:, pages, offsets].set(jnp.moveaxis(x, 2, 0).astype(pool.dtype))


def update_key_stats(kmax: jax.Array, kmin: jax.Array, pages: jax.Array, offsets: jax.Array,
                     k: jax.Array, valid: jax.Array, *,
                     logical_page_size: int) -> tuple[jax.Array, jax.Array]:
    """Fold new post-RoPE keys into the per-logical-page key statistics (DESIGN §1.3).

    kmax, kmin [H, P, L, D] with L = page_size // logical_page_size; pages, offsets [B, T] (from
    `token_pages`); k [B, T, H, D]; valid [B, T].

    A logical page restarts at −inf/+inf when its first token is written, so a page reused after
    `release` never carries a previous owner's keys into the bound; writes that continue a
    logical page (decode, chunked prefill) keep what is there. Invalid tokens only touch the
    null page, whose statistics are never read.
    """
    logical = offsets // logical_page_size  # [B, T]
    starts = valid & (offsets % logical_page_size == 0)
    restart = jnp.where(starts, pages, NULL_PAGE)
    kmax = kmax.at[:, restart, logical].set(-jnp.inf)
    kmin = kmin.at[:, restart, logical].set(jnp.inf)
    keys = jnp.moveaxis(k, 2, 0).astype(kmax.dtype)  # [H, B, T, D]
    live = valid[None, :, :, None]
    kmax = kmax.at[:, pages, logical].max(jnp.where(live, keys, -jnp.inf))
    kmin = kmin.at[:, pages, logical].min(jnp.where(live, keys, jnp.inf))
    return kmax, kmin
