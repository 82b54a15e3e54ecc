"""Streaming pages: sink + ring wraparound keep exactly the sink and the last local tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax.sparsity import SparsityConfig
from models.streaming_pool import (StreamingLayout, page_ranges, slot_positions, survives,
                                   token_slot)


@pytest.mark.parametrize("page_size, sink, local", [(4, 8, 8), (4, 0, 4), (8, 8, 16), (2, 2, 6)])
def test_ring_keeps_sink_and_last_local_tokens(page_size, sink, local):
    layout = StreamingLayout(page_size=page_size, sink_tokens=sink, local_tokens=local)
    held = np.full((layout.num_pages, page_size), -1)  # what a pool would hold, written in order
    slot = jax.jit(lambda p: token_slot(layout, p))
    read = jax.jit(lambda n: slot_positions(layout, n))
    kept_after = jax.jit(lambda n: survives(layout, jnp.arange(6 * (sink + local) + 2), n))
    for n in range(1, 6 * (sink + local) + 3):
        k, o = slot(jnp.int32(n - 1))
        held[int(k), int(o)] = n - 1  # overwrite in place
        positions, visible = (np.asarray(x)[0] for x in read(jnp.asarray([n])))
        np.testing.assert_array_equal(positions, held, err_msg=f"n={n}")
        want = {j for j in range(n) if j < sink or j > n - 1 - local}
        assert sorted(positions[visible].tolist()) == sorted(want), n
        kept = np.nonzero(np.asarray(kept_after(jnp.int32(n))))[0]
        assert sorted(held[held >= 0].tolist()) == kept.tolist(), n


def test_batch_of_lengths_and_prefill_writes():
    layout = StreamingLayout(page_size=4, sink_tokens=4, local_tokens=8)
    lengths = jnp.asarray([1, 4, 5, 13, 30])
    positions, visible = slot_positions(layout, lengths)
    for b, n in enumerate(np.asarray(lengths)):
        want = {j for j in range(n) if j < 4 or j > n - 1 - 8}
        assert sorted(np.asarray(positions[b])[np.asarray(visible[b])].tolist()) == sorted(want)
        # A prefill writes only the surviving tokens, in one scatter without duplicate slots.
        keep = np.asarray(survives(layout, jnp.arange(n), n))
        k, o = (np.asarray(x)[keep] for x in token_slot(layout, jnp.arange(n)))
        assert len(set(zip(k.tolist(), o.tolist()))) == keep.sum()
        held = np.full((layout.num_pages, 4), -1)
        held[k, o] = np.arange(n)[keep]
        np.testing.assert_array_equal(np.asarray(positions[b]), held)


def test_layout_sizes_and_validation():
    layout = StreamingLayout(page_size=64, sink_tokens=128, local_tokens=256)
    assert (layout.num_sink_pages, layout.num_ring_pages, layout.num_pages) == (2, 5, 7)
    assert SparsityConfig().streaming_layout == layout  # LServe's decode defaults
    assert SparsityConfig(token_budget=192).budget_pages == 3
    with pytest.raises(ValueError, match="minimum budget of 3 pages"):
        SparsityConfig(token_budget=64)  # LServe never attends fewer than 3 pages
    for kwargs in (dict(sink_tokens=100, local_tokens=256), dict(sink_tokens=128, local_tokens=0),
                   dict(sink_tokens=-64, local_tokens=256)):
        with pytest.raises(ValueError):
            StreamingLayout(page_size=64, **kwargs)


@pytest.mark.parametrize("page_size, sink, local", [(4, 8, 8), (4, 0, 4), (8, 8, 16), (2, 2, 6)])
def test_page_ranges_are_exactly_the_visible_slots(page_size, sink, local):
    """The decode kernel reads (page, lo, hi) ranges; they cover the Λ-visible slots exactly."""
    layout = StreamingLayout(page_size=page_size, sink_tokens=sink, local_tokens=local)
    lengths = jnp.arange(1, 6 * (sink + local) + 3)
    _, visible = slot_positions(layout, lengths)
    lo, hi = (np.asarray(x)[..., None] for x in page_ranges(layout, lengths))
    offsets = np.arange(page_size)
    np.testing.assert_array_equal((offsets >= lo) & (offsets < hi), np.asarray(visible))
