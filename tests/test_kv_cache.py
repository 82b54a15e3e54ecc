"""Page pool: exact page ids, capacity errors, invalid input (out-of-range slots, negative or
int32-limit token counts, double release) eagerly and under jit, and property tests over random
op sequences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import gather_pages
from hypothesis import given, settings, strategies as st

from models import kv_cache
from models.kv_cache import NULL_PAGE, KVCacheSpec

reserve = jax.jit(kv_cache.reserve)
release = jax.jit(kv_cache.release)


def _spec(num_pages=8, page_size=4, max_seqs=3, max_pages_per_seq=4):
    return KVCacheSpec(num_layers=1, num_kv_heads=2, head_dim=4, num_pages=num_pages,
                       page_size=page_size, max_seqs=max_seqs, max_pages_per_seq=max_pages_per_seq)


def _row(cache, slot):
    return np.asarray(cache.page_table[slot]).tolist()


def test_reserve_and_release_exact_page_ids():
    cache = kv_cache.init_cache(_spec())
    cache, ok = reserve(cache, 0, 10)  # 3 pages of 4
    assert bool(ok) and _row(cache, 0) == [1, 2, 3, NULL_PAGE]
    cache, ok = reserve(cache, 1, 4)
    assert bool(ok) and _row(cache, 1) == [4, 0, 0, 0]
    cache, ok = reserve(cache, 0, 12)  # still 3 pages: nothing new
    assert bool(ok) and _row(cache, 0) == [1, 2, 3, 0]
    cache, ok = reserve(cache, 0, 13)  # grows by one, keeps its pages
    assert bool(ok) and _row(cache, 0) == [1, 2, 3, 5]
    cache = release(cache, 0)
    assert _row(cache, 0) == [0, 0, 0, 0] and int(cache.num_reserved[0]) == 0
    cache, ok = reserve(cache, 2, 5)  # lowest free ids first
    assert bool(ok) and _row(cache, 2) == [1, 2, 0, 0]
    assert np.asarray(cache.free).tolist() == [False, False, False, True, False, True, True, True]


def test_capacity_errors_leave_cache_unchanged():
    cache = kv_cache.init_cache(_spec(num_pages=6, max_pages_per_seq=4))
    cache, ok = reserve(cache, 0, 8)
    assert bool(ok)
    before = jax.tree.map(np.asarray, cache)
    for slot, n in [(1, 17), (1, 4 * 4 + 1), (0, 8 + 4 * 3 + 1)]:  # pool full, row too short
        after, ok = reserve(cache, slot, n)
        assert not bool(ok)
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
            np.testing.assert_array_equal(a, np.asarray(b))


def test_write_then_gather_round_trip():
    spec = _spec(num_pages=10, page_size=4, max_seqs=2, max_pages_per_seq=3)
    cache = kv_cache.init_cache(spec)
    cache, _ = reserve(cache, 1, 9)
    cache, _ = reserve(cache, 0, 6)
    t = 9
    x = jax.random.normal(jax.random.key(0), (2, t, 2, 4))
    lens = jnp.array([6, 9])
    positions = jnp.broadcast_to(jnp.arange(t), (2, t))
    valid = positions < lens[:, None]
    pages, offsets = kv_cache.token_pages(cache, jnp.array([0, 1]), positions, valid)
    pool = kv_cache.write_layer(cache.k[0], pages, offsets, x)
    got = gather_pages(pool, cache.page_table)  # [2, Hkv, 12, D]
    for b in range(2):
        n = int(lens[b])
        np.testing.assert_array_equal(np.asarray(got[b, :, :n]), np.asarray(x[b, :n].transpose(1, 0, 2)))
    # Nothing but the two sequences' pages and the null page was touched.
    touched = np.nonzero(np.abs(np.asarray(pool)).sum(axis=(0, 2, 3)))[0].tolist()
    assert set(touched) <= set(_row(cache, 0)[:2] + _row(cache, 1) + [NULL_PAGE])


def _assert_same(a, b):
    """Every field of two cache pytrees is equal (same structure, same values)."""
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _two_slots_in_use():
    """max_seqs=3: slot 2 owns pages [1, 2] (8 tokens), slot 0 owns page [3]."""
    cache = kv_cache.init_cache(_spec())
    cache, ok2 = reserve(cache, 2, 8)
    cache, ok0 = reserve(cache, 0, 1)
    assert bool(ok2) and bool(ok0) and _row(cache, 2) == [1, 2, 0, 0]
    return cache


BAD_SLOTS = [-1, -3, -4, 3, 5, 2**31 - 1, -2**31]  # for max_seqs=3; -1/-3 would wrap to rows 2/0


@pytest.mark.parametrize("slot", BAD_SLOTS)
def test_out_of_range_slot_under_jit_changes_nothing(slot):
    """Traced out-of-range slots must not be clamped or wrapped onto a real row: reserve fails
    and release is a no-op, so no page is leaked or handed to two slots."""
    cache = _two_slots_in_use()
    after, ok = reserve(cache, slot, 4)
    assert not bool(ok)
    _assert_same(after, cache)
    _assert_same(release(cache, slot), cache)


@pytest.mark.parametrize("fn", ["reserve", "release"])
@pytest.mark.parametrize("slot", BAD_SLOTS)
def test_out_of_range_slot_eagerly_raises(fn, slot):
    """With a concrete slot the error is raised at once, naming the slot and the valid range
    (eagerly, -1 once reserved into / released the last slot like a Python index)."""
    cache = _two_slots_in_use()
    with pytest.raises(ValueError, match=rf"{fn}: slot={slot} is out of range; valid slots are "
                                         r"0\.\.2 \(max_seqs=3\)"):
        if fn == "reserve":
            kv_cache.reserve(cache, slot, 4)
        else:
            kv_cache.release(cache, slot)


@pytest.mark.parametrize("n", [-1, -2**31])
def test_negative_token_count(n):
    """Eagerly a ValueError naming the count; under jit ok=False with the cache unchanged."""
    cache = _two_slots_in_use()
    with pytest.raises(ValueError, match=rf"reserve: num_tokens={n} must be >= 0"):
        kv_cache.reserve(cache, 1, n)
    after, ok = reserve(cache, 1, n)
    assert not bool(ok)
    _assert_same(after, cache)


@pytest.mark.parametrize("n", [2**31 - 2, 2**31 - 1])
@pytest.mark.parametrize("jit, wrap", [
    (True, int), (True, np.int32), (True, jnp.int32), (False, np.int32), (False, jnp.int32)],
    ids=["jit-int", "jit-np.int32", "jit-jnp.int32", "eager-np.int32", "eager-jnp.int32"])
def test_token_count_near_int32_max_fails_without_overflow(n, jit, wrap):
    """Counts next to the int32 maximum fail cleanly: in int32, (n + page_size - 1) wraps
    negative, which once reserved nothing and reported success. (Eagerly, plain Python ints
    never wrapped; llm.py passes jnp.int32.)"""
    cache = _two_slots_in_use()
    after, ok = (reserve if jit else kv_cache.reserve)(cache, 1, wrap(n))
    assert not bool(ok)
    _assert_same(after, cache)


def test_eager_count_beyond_int32_fails_cleanly():
    """A Python int too large for int32 is just a request that does not fit (no OverflowError)."""
    cache = _two_slots_in_use()
    after, ok = kv_cache.reserve(cache, 1, 2**40)
    assert not bool(ok)
    _assert_same(after, cache)


# Slots: mostly valid (max_seqs=4), plus both signs out of range up to the int32 limits. Token
# counts: mostly small, plus the row limit (5 pages of 4), int32 extremes and negatives.
slots = st.one_of(st.integers(0, 3), st.sampled_from([-1, -4, -5, 4, 5, 2**31 - 1, -2**31]),
                  st.integers(-2**31, 2**31 - 1))
counts = st.one_of(st.integers(0, 30),
                   st.sampled_from([20, 21, 2**31 - 1, 2**31 - 2, 2**31 - 4, -1, -2**31]),
                   st.integers(-2**31, 2**31 - 1))
ops = st.lists(st.tuples(st.sampled_from(["reserve", "release"]), slots, counts),
               min_size=1, max_size=25)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@settings(max_examples=30, deadline=None)
@given(sequence=ops)
def test_random_reserve_release_never_double_books(jit, sequence):
    """Random reserve/release sequences, invalid input included, against a model of page counts.

    Invalid slots and negative counts raise ValueError eagerly; under jit they (and any request
    that does not fit) return ok=False / the cache unchanged, field by field. Releasing an empty
    slot changes nothing. After every op: no page owned twice, none leaked, the null page never
    owned, unused row entries point at the null page."""
    spec = _spec(num_pages=12, page_size=4, max_seqs=4, max_pages_per_seq=5)
    res, rel = (reserve, release) if jit else (kv_cache.reserve, kv_cache.release)
    cache = kv_cache.init_cache(spec)
    model = {s: 0 for s in range(4)}  # pages each slot should own
    free_count = spec.num_pages - 1
    for op, slot, n in sequence:
        bad_slot = not 0 <= slot < 4
        if op == "reserve":
            if not jit and (bad_slot or n < 0):
                with pytest.raises(ValueError, match="slot=" if bad_slot else "num_tokens="):
                    res(cache, slot, n)
                continue
            need = 0 if bad_slot else max(-(-n // 4) - model[slot], 0)
            expect_ok = not bad_slot and n >= 0 and model[slot] + need <= 5 and need <= free_count
            after, ok = res(cache, slot, n)
            assert bool(ok) == expect_ok, (slot, n)
            if expect_ok:
                model[slot] += need
                free_count -= need
            else:
                _assert_same(after, cache)
        else:
            if not jit and bad_slot:
                with pytest.raises(ValueError, match=f"slot={slot}"):
                    rel(cache, slot)
                continue
            after = rel(cache, slot)
            if bad_slot or model[slot] == 0:  # out of range, or a double release
                _assert_same(after, cache)
            else:
                free_count += model[slot]
                model[slot] = 0
        cache = after
        table, free = np.asarray(cache.page_table), np.asarray(cache.free)
        owned = [p for s in range(4) for p in table[s, :model[s]].tolist()]
        assert NULL_PAGE not in owned and not free[NULL_PAGE]
        assert len(owned) == len(set(owned)), "a page is owned twice"
        assert (table[:, :][np.arange(5)[None, :] >= np.array([model[s] for s in range(4)])[:, None]]
                == NULL_PAGE).all()
        assert sorted(owned + np.nonzero(free)[0].tolist()) == list(range(1, 12)), "page leaked"
        assert np.asarray(cache.num_reserved).tolist() == [model[s] for s in range(4)]


@jax.jit
def _append(cache, pool, slot, start, values):
    """Write values [T] as tokens start.. of `slot` (head 0, channel 0) into `pool`."""
    t = values.shape[0]
    positions = (start + jnp.arange(t))[None]
    pages, offsets = kv_cache.token_pages(cache, slot[None], positions, jnp.ones((1, t), bool))
    x = jnp.broadcast_to(values[None, :, None, None], (1, t, 2, 4)).astype(pool.dtype)
    return kv_cache.write_layer(pool, pages, offsets, x)


appends = st.lists(st.tuples(st.sampled_from(["append", "append", "release"]),
                             st.integers(0, 2), st.integers(1, 9)), min_size=1, max_size=20)


@settings(max_examples=25, deadline=None)
@given(appends)
def test_random_append_release_keeps_every_sequence_intact(sequence):
    """Sequences grow token by token (allocate on demand), are freed and their pages reused;
    after every operation each live sequence reads back exactly its own tokens, and a capacity
    error leaves the pool, the tables and every sequence as they were."""
    spec = _spec(num_pages=8, page_size=4, max_seqs=3, max_pages_per_seq=4)
    cache = kv_cache.init_cache(spec)
    pool = cache.k[0]
    history = {s: [] for s in range(3)}
    stamp = 1.0
    for op, slot, n in sequence:
        if op == "append":
            new_len = len(history[slot]) + n
            grown, ok = reserve(cache, slot, new_len)
            pages_needed = sum(-(-len(h) // 4) for h in history.values()) - \
                -(-len(history[slot]) // 4) + -(-new_len // 4)
            assert bool(ok) == (new_len <= 16 and pages_needed <= 7)
            if not ok:
                for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(grown)):
                    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
                continue
            cache = grown
            values = stamp + np.arange(n, dtype=np.float32)
            stamp += n
            pool = _append(cache, pool, jnp.int32(slot), jnp.int32(len(history[slot])),
                           jnp.asarray(values))
            history[slot] += values.tolist()
        else:
            cache = release(cache, slot)
            history[slot] = []
        table = np.asarray(cache.page_table)
        owned = [p for s in range(3) for p in table[s, :-(-len(history[s]) // 4)].tolist()]
        assert len(owned) == len(set(owned)) and NULL_PAGE not in owned
        assert sorted(owned + np.nonzero(np.asarray(cache.free))[0].tolist()) == list(range(1, 8))
        got = np.asarray(gather_pages(pool, cache.page_table))[:, 0, :, 0]  # [3, 16]
        for s in range(3):
            np.testing.assert_array_equal(got[s, :len(history[s])], history[s])


def test_spec_validation():
    with pytest.raises(ValueError, match="null page"):
        _spec(num_pages=1)


def test_key_stats_exact_across_boundaries_and_reuse():
    """Stats equal the true per-logical-page max/min after prefill, many decode appends across
    logical and physical page boundaries, and after a page is freed and reused by another slot."""
    spec = _spec(num_pages=6, page_size=8, max_seqs=2, max_pages_per_seq=3)
    h, d, lps = 2, 4, 4  # 2 logical pages per physical page
    cache = kv_cache.init_cache(spec)
    kmax = jnp.full((h, spec.num_pages, 2, d), -jnp.inf)
    kmin = jnp.full((h, spec.num_pages, 2, d), jnp.inf)
    update = jax.jit(kv_cache.update_key_stats, static_argnames="logical_page_size")
    rng = np.random.RandomState(0)

    def write(cache, kmax, kmin, slot, start, keys):
        t = keys.shape[0]
        positions = jnp.asarray(start + np.arange(t))[None]
        valid = jnp.ones((1, t), bool)
        pages, offsets = kv_cache.token_pages(cache, jnp.array([slot]), positions, valid)
        return update(kmax, kmin, pages, offsets, jnp.asarray(keys)[None], valid,
                      logical_page_size=lps)

    def check(cache, kmax, kmin, slot, keys):
        row = _row(cache, slot)
        for j in range(-(-len(keys) // lps)):
            chunk = keys[j * lps:(j + 1) * lps]  # [n, H, D]
            page, logical = row[j * lps // 8], (j * lps % 8) // lps
            np.testing.assert_array_equal(np.asarray(kmax[:, page, logical]), chunk.max(0))
            np.testing.assert_array_equal(np.asarray(kmin[:, page, logical]), chunk.min(0))

    keys0 = rng.randn(21, h, d).astype(np.float32)
    cache, _ = reserve(cache, 0, 21)
    kmax, kmin = write(cache, kmax, kmin, 0, 0, keys0[:6])        # prefill, mid logical page
    for i in range(6, 21):                                         # decode appends
        kmax, kmin = write(cache, kmax, kmin, 0, i, keys0[i:i + 1])
    check(cache, kmax, kmin, 0, keys0)
    cache = release(cache, 0)
    cache, _ = reserve(cache, 1, 11)                               # reuses slot 0's pages
    assert _row(cache, 1)[:2] == [1, 2]
    keys1 = rng.randn(11, h, d).astype(np.float32) - 5.0           # all below the old keys
    kmax, kmin = write(cache, kmax, kmin, 1, 0, keys1[:9])
    kmax, kmin = write(cache, kmax, kmin, 1, 9, keys1[9:])
    check(cache, kmax, kmin, 1, keys1)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_layer_view_round_trip_touches_only_its_layer(dtype):
    """A layer step sees a one-layer view and its writes go back to that layer only."""
    from models.streaming_pool import StreamingLayout

    spec = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=4, num_pages=6, page_size=4,
                       max_seqs=2, max_pages_per_seq=2, logical_page_size=2,
                       streaming_heads=((True, False), (False, False), (False, True)),
                       streaming_layout=StreamingLayout(page_size=4, sink_tokens=4,
                                                        local_tokens=4),
                       budget_pages=3, kv_cache_dtype=dtype,
                       kv_scales=((0.1, 0.2), (0.3, 0.4), (0.5, 0.6)))  # every per-layer tuple
    cache = kv_cache.init_cache(spec)
    view = cache.layer_view(2)
    static = "scale" if dtype == "int8" else "smooth"  # int4: per-token scales + smoothing
    assert getattr(view, f"k_{static}")[0].shape == (1, 4)  # per pool
    assert getattr(view, f"sk_{static}")[0].shape == (1, 4)
    assert (np.asarray(getattr(view, f"k_{static}")[0]) == np.float32(0.5)).all()
    assert (np.asarray(getattr(view, f"sv_{static}")[0]) == np.float32(0.6)).all()
    if dtype == "int4":
        assert view.k_scale[0].shape == (1, 6, 4, 2) and view.sv_scale[0].dtype == jnp.float16
    kept = [name for name in kv_cache.PER_LAYER if getattr(cache, name)]
    assert len(kept) == (11 if dtype == "int8" else 15)  # every per-layer tuple there is
    assert all(len(getattr(view, name)) == 1 for name in kept)
    assert view.k[0] is cache.k[2] and view.page_table is cache.page_table
    changed = view.replace_layer(0, k=view.k[0] + 1, sv=view.sv[0] - 1,
                                 selected=view.selected[0] + 7)
    out = cache.with_layer(2, changed.replace(seq_lens=cache.seq_lens + 5))
    for name in kept:
        for layer in range(3):
            expect = getattr(changed if layer == 2 else cache, name)[0 if layer == 2 else layer]
            np.testing.assert_array_equal(getattr(out, name)[layer], expect, f"{name}[{layer}]")
    np.testing.assert_array_equal(out.seq_lens, cache.seq_lens)  # shared arrays are the cache's
