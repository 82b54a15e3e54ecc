"""Where streaming heads keep their KV in decode: sink pages plus a ring (LServe, arXiv 2502.14866).

A streaming head only ever attends to the first `dec_sink_tokens` tokens and the last
`dec_local_tokens` (Λ mask, LServe / DuoAttention), so each sequence owns a constant number of
streaming pages: `num_sink_pages = dec_sink_tokens / page_size` sink pages, then a ring of
`num_ring_pages = dec_local_tokens / page_size + 1` pages overwritten in place. The extra ring page
lets the window straddle a page boundary: the ring always holds the last
`(num_ring_pages - 1) * page_size + 1 >= dec_local_tokens` tokens at least.

A sequence's streaming pages are addressed by index k in [0, num_sink_pages + num_ring_pages):
sink pages first, then the ring. These functions map token positions to (k, offset) for writes
and, for reads, give the position held by every (k, offset) and whether the current query sees it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, kw_only=True)
class StreamingLayout:
    """Static shape of one sequence's streaming pages."""

    page_size: int
    sink_tokens: int
    local_tokens: int

    def __post_init__(self):
        if self.sink_tokens < 0 or self.sink_tokens % self.page_size:
            raise ValueError(f"sink_tokens={self.sink_tokens} must be a non-negative multiple "
                             f"of page_size={self.page_size}")
        if self.local_tokens < self.page_size or self.local_tokens % self.page_size:
            raise ValueError(f"local_tokens={self.local_tokens} must be a positive multiple "
                             f"of page_size={self.page_size}")

    @property
    def num_sink_pages(self) -> int:
        return self.sink_tokens // self.page_size

    @property
    def num_ring_pages(self) -> int:
        return self.local_tokens // self.page_size + 1

    @property
    def num_pages(self) -> int:
        return self.num_sink_pages + self.num_ring_pages


def token_slot(layout: StreamingLayout, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Streaming page index k and offset where the token at `positions` is written (any shape).

    Sink tokens fill the sink pages once; later tokens cycle through the ring, overwriting the
    oldest ring page (eviction = overwrite in place).
    """
    s = layout.page_size
    ring = positions - layout.sink_tokens
    ring_page = layout.num_sink_pages + (ring // s) % layout.num_ring_pages
    k = jnp.where(ring < 0, positions // s, ring_page)
    return k.astype(jnp.int32), (jnp.where(ring < 0, positions, ring) % s).astype(jnp.int32)


def slot_positions(layout: StreamingLayout, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
    """What the streaming pages hold after `lengths` tokens, and what the newest token sees.

    lengths [B] (tokens written, the query being the last of them) ->
    positions [B, num_pages, page_size] int32 (position of the token in each slot; -1 if empty),
    visible [B, num_pages, page_size] bool: the slot holds key j with j < sink_tokens or
    j > (length - 1) - local_tokens, i.e. the Λ mask of the decode query.
    """
    s, r = layout.page_size, layout.num_ring_pages
    k = jnp.arange(layout.num_pages)[:, None]
    o = jnp.arange(s)[None, :]
    n = lengths[:, None, None]
    sink_pos = jnp.broadcast_to(k * s + o, (1,) + (layout.num_pages, s))
    # Ring slot (k, o) holds ring index q * s + o modulo r * s; the newest such index <= last.
    last = n - 1 - layout.sink_tokens
    residue = (k - layout.num_sink_pages) * s + o
    ring_pos = last - (last - residue) % (r * s) + layout.sink_tokens
    is_sink = k < layout.num_sink_pages
    positions = jnp.where(is_sink, sink_pos, ring_pos)
    filled = jnp.where(is_sink, positions < jnp.minimum(n, layout.sink_tokens),
                       (last >= 0) & (ring_pos >= layout.sink_tokens))
    positions = jnp.where(filled, positions, -1)
    visible = filled & ((positions < layout.sink_tokens) |
                        (positions > n - 1 - layout.local_tokens))
    return positions.astype(jnp.int32), visible


def survives(layout: StreamingLayout, positions: jax.Array, lengths: jax.Array) -> jax.Array:
    """Whether the token at `positions` is still held after `lengths` tokens (broadcasting).

    A prefill writes only these tokens (LServe §4): then no two writes share a slot, so the
    result does not depend on the order a scatter applies duplicate indices in.
    """
    ring_capacity = layout.num_ring_pages * layout.page_size
    in_ring = positions - layout.sink_tokens > lengths - 1 - layout.sink_tokens - ring_capacity
    return (positions < lengths) & ((positions < layout.sink_tokens) | in_ring)


def page_ranges(layout: StreamingLayout, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The keys of each streaming page the newest token sees, as offset ranges [lo, hi).

    lengths [B] -> lo, hi [B, num_pages] int32 (lo = hi = 0 for a page with nothing visible).
    Within a page the visible slots are contiguous: a sink page is visible up to its fill, the
    oldest ring page from where the window starts, the newest ring page up to the newest token
    (its later slots hold tokens one ring older, outside the window). So a decode kernel can
    take the pages as (page, lo, hi) entries in any order: softmax does not depend on it.
    """
    _, visible = slot_positions(layout, lengths)
    s = layout.page_size
    seen = jnp.any(visible, axis=-1)
    lo = jnp.argmax(visible, axis=-1)
    hi = s - jnp.argmax(visible[..., ::-1], axis=-1)
    return (jnp.where(seen, lo, 0).astype(jnp.int32), jnp.where(seen, hi, 0).astype(jnp.int32))
