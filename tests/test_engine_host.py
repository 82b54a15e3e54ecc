"""Host bookkeeping of the serving engine (lserve_jax/engine): PagePool and Scheduler.

Unit tests pin each rule; property tests drive the scheduler with random arrivals, shared
prefixes, aborts and a pool small enough to force preemptions, against a fake device that keeps
a token-level copy of the KV pages, so a wrong page table, a page overwritten while shared, or a
cache hit on stale contents shows up as a wrong context. No JAX anywhere.
"""

import collections
import dataclasses
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lserve_jax.engine import (NULL_PAGE, PagePool, PrefillWindow, Request, RequestStatus,
                               Scheduler, block_hash, extra_digest)
from lserve_jax.engine.pages import ROOT_HASH

REPO = Path(__file__).resolve().parents[1]
VOCAB = 16  # the fake device's output vocabulary
STOP = 0  # the fake device's stop token (handled outside the scheduler, as in the engine)


@dataclasses.dataclass(frozen=True)
class Params:
    """Stand-in sampling params: the scheduler only reads max_tokens."""
    max_tokens: int


def req(rid, prompt, max_tokens=4):
    return Request(rid, list(prompt), Params(max_tokens))


def fake_token(rid, context) -> int:
    """The fake device's deterministic sample: a function of the request and its whole context
    (so any corruption of the stored tokens changes the output)."""
    return hashlib.sha256(repr((rid, tuple(context))).encode()).digest()[0] % VOCAB


def reference_output(rid, prompt, max_tokens) -> list[int]:
    """What the fake device generates for a request run alone."""
    ctx, out = list(prompt), []
    while True:
        t = fake_token(rid, ctx)
        out.append(t)
        if t == STOP or len(out) == max_tokens:
            return out
        ctx.append(t)


def ids_without_stop(prompt, max_tokens, k):
    """The first k request ids whose fake outputs do not stop before max_tokens."""
    ids = (f"r{i}" for i in range(1000))
    return [i for i in ids if STOP not in reference_output(i, prompt, max_tokens)][:k]


def cdiv(a, b):
    return -(-a // b)


class FakeDevice:
    """Executes plans on a token-level model of the paged cache: kv[page, offset] = token id.

    Checks what a real device relies on: rows address their own slot with the length the slot
    has, every written page is exclusively owned and not cached, and the context read back
    through the page table is exactly prompt + outputs. With a prefill window, every key a
    prompt chunk's streaming heads see (Λ mask) is read back through the row's window table from
    window pages the request owns.
    """

    def __init__(self, sched: Scheduler):
        self.sched, self.pool = sched, sched.pool
        self.kv = np.full((self.pool.num_pages, self.pool.page_size), -1, np.int64)
        self.slot_state = {}  # slot -> [request object, stored length]
        if sched.window is not None:
            self.wkv = np.full((sched.window.pool.num_pages, self.pool.page_size), -1, np.int64)
            self.ring = {}  # slot -> {position: token} of the slot's decode sink and ring

    def _decode_held(self, length):
        """Positions a slot's decode sink and ring hold after `length` tokens: modelled as
        large as the window allows (the engine's window covers the decode pool's span)."""
        w = self.sched.window
        return {q for q in range(length) if q < w.sink_tokens or q > length - w.local_tokens}

    def _window(self, row, r):
        """Store the chunk's window keys, check the window keys the chunk reads, and model the
        slot's decode sink and ring (a chunk restores its entries before `start` from the
        window, as `kv_cache.restore_stream_pages` does)."""
        w, ps, wpool = self.sched.window, self.pool.page_size, self.sched.window.pool
        end = row.start + len(row.token_ids)
        if row.admitted:
            self.ring[row.slot] = {}
        ring = self.ring.setdefault(row.slot, {})
        if row.start >= row.num_prompt_tokens:
            assert not row.window_pages, "a decode row has a window table"
            ring[row.start] = row.token_ids[0]
            return
        assert row.window_pages, "a prompt chunk has no window table"
        if row.window_pages:
            assert len(row.window_pages) == cdiv(end, ps)
            if r is not None:
                owned = set(r.window_pages.values())
                assert all(p in owned for p in row.window_pages if p != NULL_PAGE)
            for i, tok in enumerate(row.token_ids):  # stored before the layer attends
                page = row.window_pages[(row.start + i) // ps]
                assert page != NULL_PAGE, "a chunk token has no window page"
                if r is not None:
                    assert wpool.refcount(page) == 1, f"write into shared window page {page}"
                    assert wpool.page_hash(page) is None, f"write into cached window page {page}"
                self.wkv[page, (row.start + i) % ps] = tok
            if r is not None:
                tokens = r.all_token_ids
                for j in range(row.start):
                    if j < w.sink_tokens or j > row.start - w.local_tokens:
                        page = row.window_pages[j // ps]
                        assert page != NULL_PAGE, f"window key {j} of {row.request_id} unmapped"
                        assert self.wkv[page, j % ps] == tokens[j], f"window key {j} is stale"
            for q in self._decode_held(end):
                if q < row.start and row.window_pages[q // ps] != NULL_PAGE:
                    ring[q] = int(self.wkv[row.window_pages[q // ps], q % ps])
        for i, tok in enumerate(row.token_ids):
            ring[row.start + i] = tok

    def _check_ring(self, row, ctx):
        """The slot's decode sink and ring hold exactly the context's tokens they should."""
        ring = self.ring[row.slot]
        for q in self._decode_held(len(ctx)):
            assert ring.get(q) == ctx[q], f"{row.request_id}: decode ring position {q} wrong"

    def _live(self, row):
        try:
            r = self.sched.get(row.request_id)
        except KeyError:
            return None
        return r if r.status is RequestStatus.RUNNING and r.slot == row.slot else None

    def step(self, plan):
        ps = self.pool.page_size
        sampled, finished = {}, {}
        for row in plan.rows:
            r = self._live(row)
            end = row.start + len(row.token_ids)
            assert len(row.pages) >= cdiv(end, ps)
            if r is not None:
                assert row.pages == tuple(r.pages) and row.start == r.num_computed_tokens
                assert list(row.token_ids) == r.token_slice(row.start, end)
                assert row.sample == (end == r.num_tokens)
                assert row.num_output_tokens == len(r.output_ids)
                if row.admitted:
                    self.slot_state[row.slot] = [r, row.start]
                else:
                    owner, length = self.slot_state[row.slot]
                    assert owner is r and length == row.start, "slot state does not continue"
                self.slot_state[row.slot][1] = end
            if self.sched.window is not None:
                self._window(row, r)
            for i, tok in enumerate(row.token_ids):
                pos = row.start + i
                page = row.pages[pos // ps]
                assert page != NULL_PAGE
                if r is not None:
                    assert self.pool.refcount(page) == 1, f"write into shared page {page}"
                    assert self.pool.page_hash(page) is None, f"write into cached page {page}"
                self.kv[page, pos % ps] = tok
        for row in plan.rows:
            if not row.sample:
                continue
            r = self._live(row)
            end = row.start + len(row.token_ids)
            ctx = [int(self.kv[row.pages[p // ps], p % ps]) for p in range(end)]
            if r is not None:
                assert ctx == r.all_token_ids, f"request {row.request_id} reads a wrong context"
                if self.sched.window is not None:
                    self._check_ring(row, ctx)
            toks = []
            while True:  # a row of several decode steps feeds its own samples back
                toks.append(fake_token(row.request_id, ctx))
                if toks[-1] == STOP:
                    finished[row.request_id] = "stop"
                    break
                if len(toks) == row.num_steps:
                    break
                pos = len(ctx)
                assert pos < len(row.pages) * ps, "decode steps beyond the row's pages"
                page = row.pages[pos // ps]
                if r is not None:
                    assert self.pool.refcount(page) == 1 and self.pool.page_hash(page) is None
                self.kv[page, pos % ps] = toks[-1]
                ctx.append(toks[-1])
                if self.sched.window is not None:
                    self.ring[row.slot][pos] = toks[-1]
            assert row.num_steps == 1 or (row.is_decode and row.sample)
            if r is not None:
                self.slot_state[row.slot][1] = len(ctx)
            sampled[row.request_id] = toks if row.num_steps > 1 else toks[0]
        return sampled, finished


def check_state(sched: Scheduler, *, after_update=True):
    """Every structural invariant of scheduler + pool that holds between steps."""
    pool, ps = sched.pool, sched.pool.page_size
    pool.check_invariants()
    holders = collections.Counter()
    slots = set()
    assert len(sched.running) <= sched.max_num_seqs
    assert [r.arrival for r in sched.running] == sorted(r.arrival for r in sched.running)
    for r in sched.running:
        assert r.status is RequestStatus.RUNNING
        assert 0 <= r.slot < sched.max_num_seqs and r.slot not in slots
        slots.add(r.slot)
        assert len(set(r.pages)) == len(r.pages), "a request holds a page twice"
        holders.update(r.pages)
        assert r.num_computed_tokens < r.num_tokens
        if after_update:
            assert len(r.pages) == cdiv(r.num_computed_tokens, ps)
        else:
            assert len(r.pages) >= cdiv(r.num_computed_tokens, ps)
        assert r.num_cached_pages <= r.num_computed_tokens // ps
    for page in range(1, pool.num_pages):
        assert pool.refcount(page) == holders[page], f"page {page}: refcount != holders"
        if holders[page] > 1:
            assert pool.page_hash(page) is not None, f"page {page} shared but not cached"
    for r in sched.waiting:
        assert r.status is RequestStatus.WAITING and not r.pages and r.slot is None
        assert r.num_computed_tokens == 0 and r.num_cached_pages == 0
    if sched.window is not None:
        wpool = sched.window.pool
        wpool.check_invariants()
        wholders = collections.Counter(p for r in sched.running for p in r.window_pages.values())
        for page in range(1, wpool.num_pages):
            assert wpool.refcount(page) == wholders[page], f"window page {page}: refcount"
            if wholders[page] > 1:
                assert wpool.page_hash(page) is not None, f"window page {page} shared, uncached"
        assert sched._window_reserved == sum(r.window_quota for r in sched.running)
        assert sched._window_reserved <= wpool.num_usable_pages
        for r in sched.running:
            assert len(r.window_pages) <= r.window_quota, "more window pages than the quota"
            if after_update and r.num_computed_tokens >= len(r.prompt_ids):
                assert not r.window_pages and not r.window_quota, "window kept after the prompt"
        assert not any(r.window_pages or r.window_quota for r in sched.waiting)
    live = {r.request_id for r in sched.running} | {r.request_id for r in sched.waiting}
    assert live == set(sched._live)
    assert len(live) == len(sched.running) + len(sched.waiting)


def check_plan(sched: Scheduler, plan):
    assert plan.num_scheduled_tokens <= sched.max_num_batched_tokens
    assert len(plan.rows) <= sched.max_num_seqs
    assert len({r.request_id for r in plan.rows}) == len(plan.rows)
    assert len({r.slot for r in plan.rows}) == len(plan.rows)
    assert all(len(r.token_ids) >= 1 for r in plan.rows)
    arrivals = {r.request_id: sched.get(r.request_id).arrival for r in plan.rows}
    ps = sched.pool.page_size
    for r in plan.rows:
        if r.admitted:  # a prefix hit is whole cached pages, never the last token
            assert r.start % ps == 0 and r.start < sched.get(r.request_id).num_tokens
            assert all(sched.pool.page_hash(p) is not None for p in r.pages[:r.start // ps])
    running_part = [arrivals[r.request_id] for r in plan.rows if not r.admitted]
    assert running_part == sorted(running_part), "running rows not oldest first"
    if plan.preempted:
        assert not any(r.admitted for r in plan.rows), "admitted in a step that preempted"
        victims = [sched.get(rid).arrival for rid in plan.preempted]
        assert victims == sorted(victims, reverse=True), "victims not most recent first"
        assert min(victims) > max(arrivals.values(), default=-1)
        assert [r.request_id for r in list(sched.waiting)[:len(victims)]] == \
            list(reversed(plan.preempted)), "victims not at the front of the waiting queue"


def drive(sched, arrivals, aborts=(), max_steps=3000, dev=None, decode_steps=1):
    """Run until everything finished. arrivals: {step: [Request]}; aborts: {(step, when): [id]}
    with when "before" (before schedule) or "mid" (between schedule and update). Returns
    (finished requests by id, rejected ids, plans). `dev` keeps the cache contents of an
    earlier drive of the same scheduler."""
    dev = FakeDevice(sched) if dev is None else dev
    done, rejected, plans = {}, [], []
    last = max(list(arrivals) + [s for s, _ in aborts] + [0])
    aborts = dict(aborts)
    for step in range(max_steps):
        for r in arrivals.get(step, ()):
            try:
                sched.add(r)
            except ValueError:
                rejected.append(r.request_id)
        for rid in aborts.get((step, "before"), ()):
            if rid in sched._live:
                done[rid] = sched.abort(rid)
        check_state(sched)
        had_work = sched.has_unfinished()
        plan = sched.schedule(decode_steps)
        plans.append(plan)
        check_plan(sched, plan)
        check_state(sched, after_update=False)
        assert bool(plan.rows) == had_work, "live requests but nothing scheduled"
        for rid in aborts.get((step, "mid"), ()):
            if rid in sched._live:
                done[rid] = sched.abort(rid)
        sampled, finished = dev.step(plan)
        for r in sched.update(plan, sampled, finished):
            done[r.request_id] = r
        check_state(sched)
        if step >= last and not sched.has_unfinished():
            break
    else:
        raise AssertionError("requests did not finish")
    pool = sched.pool
    pool.check_invariants()
    assert pool.num_free == pool.num_usable_pages, "pages leaked"
    assert all(pool.refcount(p) == 0 for p in range(pool.num_pages))
    if sched.window is not None:
        assert sched.window.pool.num_free == sched.window.pool.num_usable_pages
    return done, rejected, plans


def check_outputs(done):
    for rid, r in done.items():
        if r.status is RequestStatus.FINISHED_ABORTED:
            continue
        assert r.num_prefix_hit_tokens < len(r.prompt_ids)
        want = reference_output(rid, r.prompt_ids, r.max_tokens)
        assert r.output_ids == want, f"request {rid}: output differs from its run alone"
        assert r.finish_reason == ("stop" if want[-1] == STOP else "length")


# --------------------------------------------------------------------------------- PagePool
def test_null_page_never_handed_out_and_lowest_ids_first():
    pool = PagePool(5, 4)
    assert pool.num_free == 4 and pool.num_usable_pages == 4
    assert pool.allocate(2) == [1, 2]
    assert pool.allocate(2) == [3, 4]
    assert pool.allocate(1) is None
    assert pool.allocate(0) == []
    pool.check_invariants()
    with pytest.raises(ValueError):
        PagePool(1, 4)
    with pytest.raises(ValueError):
        pool.allocate(-1)


def test_allocate_failure_changes_nothing():
    pool = PagePool(4, 2)
    pool.allocate(1)
    before = (pool.num_free, [pool.refcount(p) for p in range(4)])
    assert pool.allocate(3) is None
    assert (pool.num_free, [pool.refcount(p) for p in range(4)]) == before
    pool.check_invariants()


def test_double_free_null_page_and_out_of_range_raise_and_change_nothing():
    pool = PagePool(6, 2)
    a, b = pool.allocate(2)
    pool.free([a])
    for bad in ([a], [b, a], [b, b], [NULL_PAGE], [b, 0], [6], [-1], [b, 99], [True], ["1"]):
        with pytest.raises(ValueError):
            pool.free(bad)
        assert pool.refcount(b) == 1 and pool.refcount(a) == 0
        pool.check_invariants()
    pool.free([b])
    assert pool.num_free == 5
    pool.check_invariants()


def test_free_order_uncached_fifo():
    pool = PagePool(6, 2)
    pages = pool.allocate(5)
    pool.free([pages[3], pages[1]])
    assert pool.allocate(2) == [pages[3], pages[1]]  # freed pages reused in the order freed


def test_refcount_and_sharing():
    pool = PagePool(6, 2)
    pages = pool.allocate(2)
    toks = [5, 6, 7, 8, 9]
    assert pool.cache_full_pages(pages, toks[:4], "x", 0) == 2
    hit = pool.match_prefix(toks, "x")
    assert hit == pages and [pool.refcount(p) for p in pages] == [2, 2]
    pool.free(pages)
    assert pool.num_cached == 2 and pool.num_evictable == 0
    pool.free(hit)
    assert pool.num_evictable == 2 and pool.num_free == 5
    pool.check_invariants()
    with pytest.raises(ValueError):
        pool.free(hit)  # refcount 0 now: a double free


def test_reset_prefix_cache_forgets_only_pages_nobody_holds():
    pool = PagePool(8, 4)
    a, b = list(range(10, 19)), list(range(30, 39))  # two full pages each, and one token
    pa, pb = pool.allocate(3), pool.allocate(3)
    pool.cache_full_pages(pa, a, None, 0)
    pool.cache_full_pages(pb, b, None, 0)
    pool.free(pa)  # a's pages: cached, evictable; b's: still held
    free = pool.num_free
    assert pool.reset_prefix_cache() == 2
    pool.check_invariants()
    assert pool.num_free == free and pool.num_cached == 2 and pool.num_evictable == 0
    assert pool.match_prefix(a, None) == []
    assert pool.match_prefix(b, None) == pb[:2]  # held pages keep their hashes
    assert pool.reset_prefix_cache() == 0


def test_match_never_covers_the_whole_sequence():
    pool = PagePool(8, 4)
    toks = list(range(10, 18))  # exactly two pages
    pages = pool.allocate(2)
    pool.cache_full_pages(pages, toks, None, 0)
    pool.free(pages)
    assert pool.match_prefix(toks, None) == pages[:1]  # last token left to compute
    assert pool.prefix_query_tokens == 8 and pool.prefix_hit_tokens == 4
    assert pool.match_prefix(toks + [1], None) == pages
    assert pool.match_prefix(toks[:4], None) == []  # a one-page prompt never hits
    assert pool.match_prefix(toks[:5], None) == pages[:1]
    assert PagePool.max_prefix_pages(1, 4) == 0 and PagePool.max_prefix_pages(0, 4) == 0


def test_lru_eviction_order():
    ps = 2
    pool = PagePool(7, ps)
    seqs = {name: [i * 10 + j for j in range(4)] for i, name in enumerate("ABC")}
    held = {}
    for name, toks in seqs.items():
        held[name] = pool.allocate(2)
        pool.cache_full_pages(held[name], toks, None, 0)
    for name in "ABC":
        pool.free(held[name])  # released A, then B, then C
    assert pool.num_evictable == 6 and pool.num_free_uncached == 0
    # Least recently released first, and within a sequence its deepest page first.
    a0, a1 = held["A"]
    assert pool.allocate(1) == [a1]
    assert pool.page_hash(a1) is None and pool.num_evictions == 1
    assert pool.match_prefix(seqs["A"] + [0], None) == [a0]  # only the root survives
    pool.free([a0])  # A's root is now the most recently released
    b0, b1 = held["B"]
    assert pool.allocate(2) == [b1, b0]
    c0, c1 = held["C"]
    assert pool.allocate(2) == [c1, c0]
    assert pool.allocate(1) == [a0]
    assert pool.num_cached == 0
    pool.check_invariants()


def test_uncached_pages_go_before_cached_ones_are_evicted():
    pool = PagePool(5, 2)
    cached = pool.allocate(1)
    pool.cache_full_pages(cached, [1, 2], None, 0)
    pool.free(cached)
    assert pool.allocate(3) == [2, 3, 4] and pool.num_cached == 1
    assert pool.allocate(1) == cached and pool.num_cached == 0


def test_touched_page_is_not_evictable():
    pool = PagePool(3, 2)
    pages = pool.allocate(2)
    pool.cache_full_pages(pages, [1, 2, 3, 4], None, 0)
    pool.free(pages)
    hit = pool.match_prefix([1, 2, 3, 4, 5], None)
    assert hit == pages and pool.num_free == 0 and pool.allocate(1) is None
    for bad in ([0], [3], [pages[0], 7]):  # the null page, out of range
        with pytest.raises(ValueError):
            pool.touch(bad)
    assert [pool.refcount(p) for p in pages] == [1, 1]


def test_extra_keys_separate_caches_and_hash_is_canonical():
    pool = PagePool(6, 2)
    pages = pool.allocate(1)
    pool.cache_full_pages(pages, [1, 2], ("lserve", "pattern-a"), 0)
    pool.free(pages)
    assert pool.match_prefix([1, 2, 3], ("lserve", "pattern-b")) == []
    assert pool.match_prefix([1, 2, 3], ("dense",)) == []
    assert pool.match_prefix([1, 2, 3], ["lserve", "pattern-a"]) == pages  # lists == tuples
    key = extra_digest(None)
    assert len(key) == 16 and extra_digest(None) == key != extra_digest(0) != extra_digest(False)
    assert extra_digest("1") != extra_digest(1) != extra_digest(1.0)
    assert extra_digest(("a", "b")) != extra_digest(("ab",))
    h = block_hash(ROOT_HASH, [1, 2], key)
    assert h == block_hash(ROOT_HASH, np.array([1, 2], np.int32), key)  # canonical bytes
    assert h != block_hash(ROOT_HASH, [2, 1], key) != block_hash(h, [1, 2], key)
    assert h == hashlib.sha256(ROOT_HASH + key + np.array([1, 2], "<i8").tobytes()).digest()[:16]
    with pytest.raises(TypeError):
        extra_digest({"a": 1})
    with pytest.raises(TypeError):
        block_hash(ROOT_HASH, [1.5, 2.0], key)


def test_duplicate_page_registration_keeps_the_first():
    pool = PagePool(6, 2)
    a, b = pool.allocate(1), pool.allocate(1)
    assert pool.cache_full_pages(a, [7, 7], None, 0) == 1
    assert pool.cache_full_pages(b, [7, 7], None, 0) == 1
    assert pool.page_hash(a[0]) is not None and pool.page_hash(b[0]) is None
    pool.free(b)
    assert pool.num_free_uncached == 4  # the duplicate went back uncached
    assert pool.cache_full_pages(a, [7, 7], None, 1) == 1  # nothing new: a no-op
    with pytest.raises(ValueError):
        pool.cache_full_pages(a, [7, 7, 1, 2], None, 0)  # more full pages than pages
    with pytest.raises(ValueError):
        pool.cache_full_pages(b, [7, 7], None, 0)  # b is not held any more
    pool.check_invariants()


# -------------------------------------------------------------------------------- Scheduler
def make(num_pages=33, ps=4, seqs=4, budget=64, max_len=64, **kw):
    return Scheduler(PagePool(num_pages, ps), max_num_seqs=seqs, max_num_batched_tokens=budget,
                     max_model_len=max_len, **kw)


def test_add_rejects_never_fit_requests_and_changes_nothing():
    s = make(num_pages=5, ps=4, max_len=32)  # 4 usable pages = 16 stored tokens
    with pytest.raises(ValueError, match="max_model_len"):
        s.add(req("long", range(30), max_tokens=3))
    with pytest.raises(ValueError, match="could never run"):
        s.add(req("big", range(15), max_tokens=3))  # 17 stored tokens > 16
    s.add(req("fits", range(14), max_tokens=3))  # 16 stored tokens: fits exactly
    with pytest.raises(ValueError, match="already"):
        s.add(req("fits", [1], max_tokens=1))
    with pytest.raises(ValueError):
        req("empty", [], 1)
    with pytest.raises(ValueError):
        req("neg", [1, -2], 1)
    with pytest.raises(ValueError):
        req("mt", [1], 0)
    assert [r.request_id for r in s.waiting] == ["fits"] and s.pool.num_free == 4
    done, rejected, _ = drive(s, {})
    check_outputs(done)
    with pytest.raises(ValueError):
        make(seqs=4, budget=3)


def test_chunked_prefill_then_decode():
    s = make(budget=4, seqs=1)
    s.add(req("a", range(1, 11), max_tokens=3))
    dev = FakeDevice(s)
    got = []
    while s.has_unfinished():
        plan = s.schedule()
        (row,) = plan.rows
        got.append((row.start, len(row.token_ids), row.sample, row.admitted))
        s.update(plan, *dev.step(plan))
    n = len(reference_output("a", range(1, 11), 3))
    assert got[:3] == [(0, 4, False, True), (4, 4, False, False), (8, 2, True, False)]
    assert got[3:] == [(10 + i, 1, True, False) for i in range(n - 1)]


def test_several_decode_steps_per_call_only_when_nobody_waits():
    s = make(budget=64, seqs=2)
    s.add(req("a", range(1, 6), max_tokens=8))
    dev = FakeDevice(s)
    plan = s.schedule(4)
    assert [r.num_steps for r in plan.rows] == [1]  # a prefill row
    s.update(plan, *dev.step(plan))
    plan = s.schedule(4)
    (row,) = plan.rows
    assert row.is_decode and row.num_steps == 4 and len(row.pages) * 4 >= row.start + 4
    sampled, finished = dev.step(plan)
    with pytest.raises(ValueError, match="without finishing"):
        s.update(plan, {"a": sampled["a"][:1]}, {})
    s.update(plan, sampled, finished)
    s.add(req("b", range(1, 4), max_tokens=2))
    plan = s.schedule(4)  # "b" is admitted: one step for everyone
    assert all(r.num_steps == 1 for r in plan.rows)
    s.update(plan, *dev.step(plan))
    with pytest.raises(ValueError, match="decode_steps"):
        s.schedule(0)


def test_long_prompt_chunks_are_capped_while_others_wait():
    s = make(budget=16, seqs=4, long_prefill_token_threshold=4)
    s.add(req("long", range(1, 41), max_tokens=2))
    plan = s.schedule()
    assert [len(r.token_ids) for r in plan.rows] == [16]  # nobody waits: the whole budget
    s.update(plan, {}, {})
    s.add(req("short", range(50, 55), max_tokens=2))
    plan = s.schedule()
    assert [(r.request_id, len(r.token_ids)) for r in plan.rows] == [("long", 4), ("short", 5)]
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        make(long_prefill_token_threshold=-1)


def test_decode_rows_and_prefill_chunks_share_the_budget():
    s = make(budget=6, seqs=3)
    s.add(req("a", [1, 2, 3], max_tokens=10))
    plan = s.schedule()
    s.update(plan, {"a": 1})
    s.add(req("b", range(20, 40), max_tokens=2))
    s.add(req("c", [5, 6], max_tokens=2))
    plan = s.schedule()
    assert [(r.request_id, len(r.token_ids)) for r in plan.rows] == [("a", 1), ("b", 5)]
    assert plan.num_scheduled_tokens == 6  # c waits: no budget left (FCFS, no overtaking)
    assert [r.request_id for r in s.waiting] == ["c"]
    s.update(plan, {"a": 2})
    plan = s.schedule()  # b's next chunk is planned before c is admitted
    assert [(r.request_id, len(r.token_ids)) for r in plan.rows] == [("a", 1), ("b", 5)]


def test_prefix_hit_at_admission():
    s = make(ps=4)
    shared = list(range(100, 112))  # three pages
    s.add(req("a", shared + [1], max_tokens=2))
    dev = FakeDevice(s)
    drive(s, {}, dev=dev)
    s.add(req("b", shared + [2, 3], max_tokens=2))
    plan = s.schedule()
    (row,) = plan.rows
    assert row.admitted and row.start == 12 and row.token_ids == (2, 3)
    assert plan.prefix_hits == (("b", 12),)
    b = s.get("b")
    assert b.num_prefix_hit_tokens == 12 and s.prefix_hit_tokens == 12
    assert [s.pool.page_hash(p) for p in row.pages[:3]] == b.block_hashes[:3]
    assert [s.pool.refcount(p) for p in row.pages] == [1, 1, 1, 1]
    s.update(plan, *dev.step(plan))
    # One pool, two configurations: no hit across `extra` keys.
    pool = PagePool(33, 4)
    dense = Scheduler(pool, max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64,
                      extra="dense")
    dense.add(req("a", shared + [1], max_tokens=1))
    drive(dense, {})
    assert pool.num_cached == 3
    other = Scheduler(pool, max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64,
                      extra="lserve")
    other.add(req("b", shared + [1], max_tokens=1))
    assert other.schedule().prefix_hits == ()


def test_prefix_caching_can_be_disabled():
    s = make(ps=4, enable_prefix_caching=False)
    shared = list(range(100, 112))
    s.add(req("a", shared + [1], max_tokens=2))
    drive(s, {})
    assert s.pool.num_cached == 0
    s.add(req("b", shared + [1], max_tokens=2))
    plan = s.schedule()
    assert plan.rows[0].start == 0 and plan.prefix_hits == ()


def test_preemption_picks_most_recent_and_recompute_keeps_outputs():
    # 6 usable pages of 2 tokens; each request stores up to 3 + 8 - 1 = 10 tokens (5 pages).
    s = make(num_pages=7, ps=2, seqs=2, budget=8, max_len=16)
    a, b = ids_without_stop([1, 2, 3], 8, 2)  # neither stops early: the pool must run out
    prompts = {a: [1, 2, 3], b: [1, 2, 3]}
    for rid, p in prompts.items():
        s.add(req(rid, p, max_tokens=8))
    dev = FakeDevice(s)
    first = None
    while s.has_unfinished():
        plan = s.schedule()
        check_plan(s, plan)
        if plan.preempted and first is None:
            first = plan
            assert plan.preempted == (b,)
            victim = s.get(b)
            assert victim.status is RequestStatus.WAITING and s.waiting[0] is victim
            assert victim.pages == [] and victim.slot is None
            assert victim.num_computed_tokens == 0
            kept = list(victim.output_ids)
            assert kept and victim.num_preemptions == 1
        if first is not None and any(r.request_id == b and r.admitted for r in plan.rows):
            row = next(r for r in plan.rows if r.request_id == b)
            # Recompute: prompt + every output; the last output is the final input token.
            tokens = prompts[b] + kept
            assert row.start + len(row.token_ids) == len(tokens) and row.sample
            assert list(row.token_ids) == tokens[row.start:]
            assert row.token_ids[-1] == kept[-1] and row.num_output_tokens == len(kept)
            assert row.start > 0  # its own released pages came back from the prefix cache
        sampled, finished = dev.step(plan)
        s.update(plan, sampled, finished)
        check_state(s)
    assert first is not None and s.num_preemptions >= 1
    assert s.pool.num_free == s.pool.num_usable_pages


def test_preempting_itself_when_most_recent_and_no_deadlock():
    # Pool fits exactly one full request; two requests must take turns without deadlock.
    s = make(num_pages=4, ps=2, seqs=2, budget=8, max_len=8)
    for rid in ids_without_stop([3, 1, 4], 4, 3):
        s.add(req(rid, [3, 1, 4], max_tokens=4))  # 6 stored tokens = 3 pages
    done, _, plans = drive(s, {})
    check_outputs(done)
    assert s.num_preemptions >= 1 and len(done) == 3


def test_slots_are_lowest_free_and_stable():
    s = make(seqs=3, budget=64)
    for i in range(3):
        s.add(req(i, [10 + i] * 3, max_tokens=20))
    plan = s.schedule()
    assert [(r.request_id, r.slot) for r in plan.rows] == [(0, 0), (1, 1), (2, 2)]
    s.update(plan, {r.request_id: 1 for r in plan.rows})
    s.abort(1)
    s.add(req(3, [9, 9], max_tokens=20))
    plan = s.schedule()
    assert {r.request_id: r.slot for r in plan.rows} == {0: 0, 2: 2, 3: 1}
    assert {r.request_id: r.admitted for r in plan.rows} == {0: False, 2: False, 3: True}
    table = plan.page_table(3, s.max_pages_per_seq)
    assert table.shape == (3, 16) and table.dtype == np.int32
    for r in plan.rows:
        assert list(table[r.slot, :len(r.pages)]) == list(r.pages)
        assert (table[r.slot, len(r.pages):] == NULL_PAGE).all()


def test_abort_waiting_and_running_frees_everything():
    s = make(num_pages=9, ps=2, seqs=1, budget=8)
    s.add(req("run", range(1, 8), max_tokens=4))
    s.add(req("wait", range(1, 8), max_tokens=4))
    plan = s.schedule()
    s.update(plan, {"run": 1})
    assert s.get("run").status is RequestStatus.RUNNING and s.pool.num_free == 4
    assert s.get("wait").status is RequestStatus.WAITING
    r = s.abort("run")
    assert r.status is RequestStatus.FINISHED_ABORTED and r.finish_reason == "abort"
    assert r.pages == [] and r.slot is None and s.pool.num_free == 8
    w = s.abort("wait")
    assert w.status is RequestStatus.FINISHED_ABORTED and not s.waiting
    check_state(s)
    for rid in ("run", "nope"):
        with pytest.raises(KeyError, match="no waiting or running"):
            s.abort(rid)
    # A request aborted between schedule and update: update skips its row.
    s.add(req("m", range(1, 8), max_tokens=4))
    plan = s.schedule()
    s.abort("m")
    assert s.update(plan, {"m": 3}) == [] and s.pool.num_free == 8
    s.add(req("m", [1, 2], max_tokens=1))  # the id is free again
    check_state(s)


def test_update_validates_before_changing_anything():
    s = make()
    s.add(req("a", [1, 2, 3], max_tokens=3))
    s.add(req("b", range(40), max_tokens=3))
    s2 = make(budget=8)
    s2.add(req("a", range(20), max_tokens=3))
    plan = s.schedule()
    with pytest.raises(RuntimeError):
        s.schedule()
    for sampled, finished in (({}, {}), ({"a": 1}, {}), ({"a": 1, "zz": 2}, {}),
                              ({"a": 1, "b": 2}, {"a": "weird"}), ({"a": -1, "b": 2}, {}),
                              ({"a": 1, "b": 2}, {"zz": "stop"})):
        with pytest.raises(ValueError):
            s.update(plan, sampled, finished)
        assert s.get("a").num_computed_tokens == 0 and s.get("a").output_ids == []
    other = s2.schedule()
    with pytest.raises(ValueError, match="not the plan"):
        s.update(other, {})
    with pytest.raises(ValueError, match="no sampling row"):
        s2.update(other, {"a": 1})  # a partial prefill chunk samples nothing
    s2.update(other, {})
    done = s.update(plan, {"a": 5}, {"b": "error"})  # b ends without a token (e.g. NaN logits)
    assert [r.request_id for r in done] == ["b"] and done[0].output_ids == []
    assert done[0].status is RequestStatus.FINISHED_ERROR
    assert s.get("a").output_ids == [5]


def test_length_and_stop_finishes():
    s = make()
    s.add(req("l", [1, 2], max_tokens=2))
    s.add(req("s", [1, 2], max_tokens=5))
    plan = s.schedule()
    assert s.update(plan, {"l": 7, "s": 8}) == []
    plan = s.schedule()
    done = s.update(plan, {"l": 7, "s": 8}, {"s": "stop"})
    assert {r.request_id: (r.status, r.output_ids) for r in done} == {
        "l": (RequestStatus.FINISHED_LENGTH, [7, 7]), "s": (RequestStatus.FINISHED_STOPPED, [8, 8])}
    assert not s.has_unfinished() and s.pool.num_free == s.pool.num_usable_pages
    assert s.num_scheduled_tokens == 6 and s.num_steps == 2
    st_ = s.stats()
    assert (st_["scheduled_tokens"], st_["preemptions"], st_["running"], st_["waiting"]) == \
        (6, 0, 0, 0)


def test_alone_run_through_the_scheduler_matches_the_reference():
    s = make()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    s.add(req("solo", prompt, max_tokens=12))
    done, _, _ = drive(s, {})
    check_outputs(done)
    assert done["solo"].output_ids == reference_output("solo", prompt, 12)


def test_engine_modules_do_not_import_jax():
    """Host bookkeeping never touches a tensor: the engine's host modules (and the package,
    whose public names load lazily) import without JAX."""
    code = (
        "import sys\n"
        "import lserve_jax, lserve_jax.engine, lserve_jax.engine.pages, lserve_jax.engine.scheduler\n"
        "import lserve_jax.inputs\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax'))\n"
        "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@settings(max_examples=300, deadline=None)
@given(ps=st.sampled_from([1, 2, 4, 8]), sink=st.integers(0, 20), local=st.integers(1, 40),
       max_chunk=st.integers(1, 24), prompt=st.integers(1, 160), data=st.data())
def test_prefill_window_keeps_every_visible_key_within_its_quota(ps, sink, local, max_chunk,
                                                                  prompt, data):
    """Chunks of random sizes through one prompt's window by the scheduler's rule (take the
    chunk's columns, read, drop the columns `keeps` lets go): every key a chunk's streaming
    heads see (j < sink or j > start - local) is in a column still held, and the held columns
    never exceed the quota."""
    w = PrefillWindow(PagePool(400, ps), sink_tokens=sink, local_tokens=local)
    quota = w.quota(prompt, max_chunk)
    held, start = set(), 0
    while start < prompt:
        end = start + data.draw(st.integers(1, min(max_chunk, prompt - start)))
        held |= set(range(start // ps, cdiv(end, ps)))
        assert len(held) <= quota
        seen = {j // ps for j in range(start) if j < sink or j > start - local}
        assert seen <= held and set(w.read_columns(start)) == seen, (start, end)
        held = {c for c in held if w.keeps(c, end)}
        start = end


@settings(max_examples=200, deadline=None)
@given(ps=st.sampled_from([1, 2, 4]), sink=st.integers(0, 9), local=st.integers(1, 20),
       cached=st.lists(st.booleans(), min_size=1, max_size=24))
def test_window_prefix_match_is_the_longest_with_its_window_cached(ps, sink, local, cached):
    """A prefix hit of k pages needs the window pages of the columns a chunk at k * ps reads;
    with an arbitrary set of columns' window pages cached, the hit is shortened to the longest
    k for which all of them are (brute force over every k), and those pages are returned."""
    n = len(cached)
    prompt = list(range(1, n * ps + 2))
    window = PrefillWindow(PagePool(n + 2, ps), sink_tokens=sink, local_tokens=local)
    s = Scheduler(PagePool(n + 4, ps), max_num_seqs=1, max_num_batched_tokens=4,
                  max_model_len=len(prompt) + 4, replay_outputs=True, window=window)
    r = req("r", prompt)
    s._extend_hashes(r, n)
    pages = window.pool.allocate(n)
    window.pool.cache_pages([p for p, c in zip(pages, cached) if c],
                            [h for h, c in zip(r.block_hashes, cached) if c])
    window.pool.free(pages)
    best = max(k for k in range(n + 1) if all(cached[c] for c in window.read_columns(k * ps)))
    matched, hit = s._window_match(r, list(range(100, 100 + n)))
    assert matched == list(range(100, 100 + best))
    assert hit == {c: pages[c] for c in window.read_columns(best * ps)}


# ------------------------------------------------------------------------ property tests
BASES = [list(np.random.default_rng(i).integers(1, 30, 24)) for i in range(3)]

request_spec = st.fixed_dictionaries({
    "base": st.integers(0, len(BASES) - 1),
    "shared": st.integers(0, 20),
    "suffix": st.lists(st.integers(1, 30), max_size=8),
    "max_tokens": st.integers(1, 12),
    "arrive": st.integers(0, 12),
    "abort": st.one_of(st.none(), st.none(), st.none(),
                       st.tuples(st.integers(0, 15), st.sampled_from(["before", "mid"]))),
})

config = st.fixed_dictionaries({
    "ps": st.sampled_from([1, 2, 4]),
    # The pool, relative to the largest request that fits max_model_len: below 1 some requests
    # can never run (rejected at add); near 1 it holds about one request, forcing preemptions.
    "pool_factor": st.sampled_from([0.7, 1.0, 1.0, 1.3, 1.6, 2.0, 3.0]),
    "seqs": st.integers(1, 4),
    "extra_budget": st.integers(0, 10),
    "max_len": st.integers(8, 48),
    "caching": st.sampled_from([True, True, True, False]),
    # plain; generated tokens replayed one per step (LServe); replay with a prefill window
    # (sink, local tokens) and no prefix caching (LServe with streaming heads)
    "mode": st.sampled_from(["plain", "plain", "replay", "window", "window"]),
    "window": st.tuples(st.integers(0, 6), st.integers(1, 12)),
    "window_factor": st.sampled_from([1, 1, 2, 4]),  # window pool, in requests' quotas
    "decode_steps": st.sampled_from([1, 1, 3]),
    "long_prefill": st.sampled_from([0, 0, 1, 3]),  # chunk cap while others wait
})


def prompt_of(sp):
    return [int(t) for t in BASES[sp["base"]][:sp["shared"]]] + sp["suffix"] or [7]


def build(cfg, specs):
    ps = cfg["ps"]
    needs = [cdiv(len(prompt_of(sp)) + sp["max_tokens"] - 1, ps) for sp in specs
             if len(prompt_of(sp)) + sp["max_tokens"] <= cfg["max_len"]]
    num_pages = 1 + max(1, round(max(needs, default=1) * cfg["pool_factor"]))
    budget = cfg["seqs"] + cfg["extra_budget"]
    window = None
    if cfg["mode"] == "window":
        sink, local = cfg["window"]
        # Room for about one to four requests' windows: admission sometimes waits for window
        # pages, and cached window pages are sometimes evicted.
        quota = cdiv(sink, ps) + cdiv(local - 1 + budget, ps) + 1
        window = PrefillWindow(PagePool(1 + quota * cfg["window_factor"], ps), sink_tokens=sink,
                               local_tokens=local)
    s = Scheduler(PagePool(num_pages, ps), max_num_seqs=cfg["seqs"],
                  max_num_batched_tokens=budget, max_model_len=cfg["max_len"],
                  extra=("test", cfg["ps"]),
                  enable_prefix_caching=cfg["caching"],
                  replay_outputs=cfg["mode"] != "plain", window=window,
                  long_prefill_token_threshold=cfg["long_prefill"])
    arrivals, aborts, never_fit = collections.defaultdict(list), collections.defaultdict(list), []
    for i, sp in enumerate(specs):
        prompt = prompt_of(sp)
        r = Request(i, prompt, Params(sp["max_tokens"]))
        arrivals[sp["arrive"]].append(r)
        total = len(prompt) + sp["max_tokens"]
        if total > cfg["max_len"] or cdiv(total - 1, ps) > num_pages - 1:
            never_fit.append(i)
        if sp["abort"] is not None:
            aborts[sp["abort"]].append(i)
    return s, arrivals, aborts, never_fit


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=config, specs=st.lists(request_spec, min_size=1, max_size=10))
def test_random_serving_keeps_invariants_and_outputs(cfg, specs):
    s, arrivals, aborts, never_fit = build(cfg, specs)
    done, rejected, plans = drive(s, arrivals, aborts, decode_steps=cfg["decode_steps"])
    assert sorted(rejected) == never_fit
    assert set(done) | set(rejected) == set(range(len(specs)))
    check_outputs(done)
    assert s.num_scheduled_tokens == sum(p.num_scheduled_tokens for p in plans)
    assert s.num_preemptions == sum(len(p.preempted) for p in plans)
    hits = sum(n for p in plans for _, n in p.prefix_hits)
    assert s.prefix_hit_tokens == hits <= s.prefix_query_tokens
    event(f"preempted: {s.num_preemptions > 0}")
    event(f"prefix hit: {hits > 0}")
    event(f"evicted: {s.pool.num_evictions > 0}")
    event(f"aborted: {any(r.status is RequestStatus.FINISHED_ABORTED for r in done.values())}")
    event(f"mode: {cfg['mode']}")
    event(f"window prefix hit: {cfg['mode'] == 'window' and hits > 0}")
    event(f"multi-step rows: {any(r.num_steps > 1 for p in plans for r in p.rows)}")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n=st.integers(4, 10), ps=st.sampled_from([1, 2, 4]),
       window=st.sampled_from([None, (2, 3), (4, 6), (0, 9)]))
def test_tight_pool_with_shared_prefixes_preempts_and_hits(data, n, ps, window):
    """Many requests on one shared prefix and a pool that fits only about two of them: every
    example exercises preemption and prefix hits, and outputs still match runs alone; with a
    prefill window (streaming heads), hits share window pages and the fake device checks that
    every chunk reads its window keys and that every slot's decode sink and ring are whole."""
    max_tokens = data.draw(st.integers(4, 10))
    prompt_len = data.draw(st.integers(2 * ps + 1, 16))
    need = cdiv(prompt_len + max_tokens - 1, ps)
    win = None
    if window is not None:
        sink, local = window
        win = PrefillWindow(PagePool(1 + 3 * (cdiv(sink, ps) + cdiv(local + 7, ps) + 1), ps),
                            sink_tokens=sink, local_tokens=local)
    s = Scheduler(PagePool(need + need // 2 + 1, ps), max_num_seqs=4, max_num_batched_tokens=8,
                  max_model_len=64, replay_outputs=win is not None, window=win)
    base = [int(t) for t in BASES[0][:prompt_len]]
    arrivals = collections.defaultdict(list)
    for i in range(n):
        tail = data.draw(st.lists(st.integers(1, 30), max_size=2))
        arrivals[data.draw(st.integers(0, 3))].append(Request(i, base + tail, Params(max_tokens)))
    done, rejected, plans = drive(s, arrivals)
    assert not rejected
    check_outputs(done)
    assert s.prefix_hit_tokens > 0
    event(f"preempted: {s.num_preemptions > 0}")
