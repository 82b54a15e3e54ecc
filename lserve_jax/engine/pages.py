"""Host-side page pool of the serving engine: page ownership, reference counts, prefix caching.

The device cache (`models/kv_cache.py`) stores keys and values in fixed-size pages addressed
through a per-slot page table. This module decides, on the host and in plain Python, which page
ids each sequence owns; the device only ever sees the resulting page-table rows. Nothing here
touches a JAX array or imports JAX.

Page states. Page 0 is the null page (`NULL_PAGE`, the same id as `models.kv_cache.NULL_PAGE`):
never handed out, never freed, never cached. Every other page is in exactly one state:

    free-uncached   refcount 0, no block hash; in the free queue (FIFO, lowest ids first at start)
    free-cached     refcount 0, has a block hash; in the evictable LRU (a prefix-cache entry that
                    no running sequence holds; it keeps its contents until it is evicted)
    referenced      refcount >= 1 (held by that many sequences), with or without a block hash

Sharing. Only full pages are shared, and only read: a sequence writes only into pages past its
matched prefix, which it owns alone. A shared page's refcount is exactly its number of holders.

Block hashes (prefix caching, in the style of vLLM v1's block pool). A full page's hash is

    sha256(parent_hash || extra_digest || token ids as little-endian int64)[:16]

where parent_hash is the previous page's hash in the sequence (16 zero bytes for the first page)
and extra_digest = sha256 of a canonical encoding of `extra` (what else determines a page's
contents besides its tokens: attention mode, head pattern, dtype, model), so caches of different
configurations never mix. Every field has a fixed width, so the encoding is unambiguous. sha256
rather than Python's `hash`: `hash` of ints and tuples is 64-bit and easy to collide on purpose
(hash(-1) == hash(-2)), and a collision here silently serves one request another request's keys
and values; str hashes also change per process. A 128-bit digest makes accidental collisions
practically impossible (birthday bound ~2**64 pages) and costs about a microsecond per page.

Registration and lookup. A page is registered (`cache_full_pages`) once all its tokens are known
and computed, i.e. when it is full. If another page already holds the same hash, the new page
stays uncached (the first copy wins, no entry is overwritten). `match_prefix` returns the longest
chain of cached pages for a token sequence but never all of it: at least the last token is left
to compute, because its logits are needed to sample the next token.

Eviction. `allocate` takes free-uncached pages first and evicts cached pages only when those run
out, least recently released first; an evicted page loses its hash entry. `free` receives a
sequence's pages in sequence order and appends the ones that become evictable to the LRU tail in
reverse order, so the deepest pages of a chain are evicted before its root (a chain can only be
matched from its root, so its tail is the cheapest loss).
"""

from __future__ import annotations

import collections
import hashlib
import numbers
import struct
from collections.abc import Iterable, Sequence

import numpy as np

NULL_PAGE = 0  # models.kv_cache.NULL_PAGE (not imported: that module imports JAX)
HASH_BYTES = 16
ROOT_HASH = bytes(HASH_BYTES)  # the parent of a sequence's first page


def _encode_key(obj, out: list[bytes]) -> None:
    """Append a canonical, self-delimiting byte encoding of `obj` (None, bool, int, float, str,
    bytes, or tuples/lists of these; lists and tuples encode alike)."""
    if obj is None:
        out.append(b"N")
    elif isinstance(obj, bool):
        out.append(b"T" if obj else b"F")
    elif isinstance(obj, numbers.Integral):
        raw = str(int(obj)).encode()
        out.append(b"I" + struct.pack(">I", len(raw)) + raw)
    elif isinstance(obj, float):
        out.append(b"D" + struct.pack(">d", obj))
    elif isinstance(obj, str):
        raw = obj.encode("utf-8")
        out.append(b"S" + struct.pack(">I", len(raw)) + raw)
    elif isinstance(obj, (bytes, bytearray)):
        out.append(b"B" + struct.pack(">I", len(obj)) + bytes(obj))
    elif isinstance(obj, (tuple, list)):
        out.append(b"L" + struct.pack(">I", len(obj)))
        for item in obj:
            _encode_key(item, out)
    else:
        raise TypeError(f"extra key parts must be None, bool, int, float, str, bytes or "
                        f"tuples/lists of these, not {type(obj).__name__}")


def extra_digest(extra) -> bytes:
    """The 16-byte digest of a configuration key `extra` (see the module docstring)."""
    out: list[bytes] = []
    _encode_key(extra, out)
    return hashlib.sha256(b"".join(out)).digest()[:HASH_BYTES]


def _token_bytes(tokens: Sequence[int]) -> bytes:
    arr = np.asarray(tokens)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise TypeError(f"token ids must be a flat sequence of ints, got dtype {arr.dtype}")
    return arr.astype("<i8").tobytes()


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages of `page_size` tokens needed to hold `num_tokens` tokens."""
    return -(-num_tokens // page_size)


def block_hash(parent: bytes, tokens: Sequence[int], extra_key: bytes) -> bytes:
    """Hash of one full page: its parent's hash, its configuration digest and its token ids."""
    if len(parent) != HASH_BYTES or len(extra_key) != HASH_BYTES:
        raise ValueError(f"parent and extra digests must be {HASH_BYTES} bytes")
    return hashlib.sha256(parent + extra_key + _token_bytes(tokens)).digest()[:HASH_BYTES]


class PagePool:
    """Page ids 1 .. num_pages-1 with reference counts, a free queue and a prefix cache.

    All methods either succeed or raise with nothing changed. See the module docstring for the
    page states, the hash and the eviction order.
    """

    def __init__(self, num_pages: int, page_size: int):
        if not isinstance(num_pages, numbers.Integral) or num_pages < 2:
            raise ValueError(f"num_pages={num_pages!r} must be an int >= 2 (page 0 is the null "
                             "page)")
        if not isinstance(page_size, numbers.Integral) or page_size < 1:
            raise ValueError(f"page_size={page_size!r} must be an int >= 1")
        self.num_pages = int(num_pages)
        self.page_size = int(page_size)
        self._refcount = [0] * self.num_pages
        self._free = collections.deque(range(1, self.num_pages))  # free-uncached, FIFO
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
        self._hash_of: dict[int, bytes] = {}  # page -> block hash (cached pages)
        self._page_of: dict[bytes, int] = {}  # block hash -> page
        self.prefix_query_tokens = 0  # tokens looked up by match_prefix
        self.prefix_hit_tokens = 0  # of those, tokens found cached
        self.num_evictions = 0

    # ----------------------------------------------------------------------------- counters
    @property
    def num_usable_pages(self) -> int:
        """Pages that can ever be handed out (all but the null page)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        """Pages `allocate` can hand out now: free-uncached plus evictable cached pages."""
        return len(self._free) + len(self._evictable)

    @property
    def num_free_uncached(self) -> int:
        return len(self._free)

    @property
    def num_evictable(self) -> int:
        """Cached pages no sequence holds (refcount 0), evicted LRU first when needed."""
        return len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Pages with a registered block hash, held or evictable."""
        return len(self._page_of)

    @property
    def usage(self) -> float:
        """Fraction of usable pages held by some sequence."""
        return 1.0 - self.num_free / self.num_usable_pages

    def refcount(self, page: int) -> int:
        self._check_page(page, "refcount")
        return self._refcount[page]

    def page_hash(self, page: int) -> bytes | None:
        """The block hash registered for `page`, or None when it is not cached."""
        self._check_page(page, "page_hash")
        return self._hash_of.get(page)

    def pages_for(self, num_tokens: int) -> int:
        """Pages needed to hold `num_tokens` tokens."""
        return pages_for(num_tokens, self.page_size)

    # ---------------------------------------------------------------------- ownership
    def _check_page(self, page, fn: str) -> None:
        if not isinstance(page, numbers.Integral) or isinstance(page, bool):
            raise ValueError(f"{fn}: page id {page!r} is not an int")
        if not 0 <= page < self.num_pages:
            raise ValueError(f"{fn}: page id {page} is out of range [0, {self.num_pages})")

    def allocate(self, n: int) -> list[int] | None:
        """`n` pages with refcount 1, or None (nothing changed) when fewer are obtainable.

        Free-uncached pages go first, in queue order; then the least recently released cached
        pages are evicted (they lose their hash entries).
        """
        if not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"allocate: n={n!r} must be an int >= 0")
        if n > self.num_free:
            return None
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.popleft()
            else:
                page, _ = self._evictable.popitem(last=False)
                del self._page_of[self._hash_of.pop(page)]
                self.num_evictions += 1
            self._refcount[page] = 1
            pages.append(page)
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Drop one reference to each page (a sequence's pages, in sequence order).

        Pages reaching refcount 0 become free: uncached ones go to the free-queue tail in the
        given order, cached ones to the evictable LRU tail in reverse order (see the module
        docstring). The null page, an out-of-range id, or more releases of a page than it has
        references (a double free) raise ValueError and change nothing.
        """
        pages = list(pages)
        counts = collections.Counter()
        for page in pages:
            self._check_page(page, "free")
            if page == NULL_PAGE:
                raise ValueError("free: page 0 is the null page; it is never owned")
            counts[page] += 1
        for page, c in counts.items():
            if self._refcount[page] < c:
                raise ValueError(f"free: page {page} has refcount {self._refcount[page]}, "
                                 f"cannot release it {c} time(s) (double free)")
        released = []
        for page in pages:
            self._refcount[page] -= 1
            if self._refcount[page] == 0:
                released.append(page)
        for page in released:
            if page not in self._hash_of:
                self._free.append(page)
        for page in reversed(released):
            if page in self._hash_of:
                self._evictable[page] = None

    def touch(self, pages: Iterable[int]) -> None:
        """Take one more reference to each cached page (a prefix hit); evictable ones leave the
        LRU. Pages that are not cached raise ValueError and nothing changes."""
        pages = list(pages)
        for page in pages:
            self._check_page(page, "touch")
            if page not in self._hash_of:
                raise ValueError(f"touch: page {page} is not a cached page")
        for page in pages:
            if self._refcount[page] == 0:
                del self._evictable[page]
            self._refcount[page] += 1

    # ---------------------------------------------------------------------- prefix cache
    def reset_prefix_cache(self) -> int:
        """Forget every cached page no sequence holds (they become free-uncached, in LRU
        order); pages still held keep their hashes. Returns how many were forgotten."""
        pages = list(self._evictable)
        for page in pages:
            del self._page_of[self._hash_of.pop(page)]
        self._evictable.clear()
        self._free.extend(pages)
        return len(pages)

    def extend_hashes(self, hashes: list[bytes], token_ids: Sequence[int], extra, *,
                      max_pages: int | None = None, extra_key: bytes | None = None) -> list[bytes]:
        """Extend `hashes` (the chain hashes of the first len(hashes) full pages of token_ids,
        possibly none) in place to cover every full page of `token_ids`, at most `max_pages`
        in all; returns it. `extra_key` (a precomputed `extra_digest(extra)`) skips encoding."""
        ps = self.page_size
        n = len(token_ids) // ps
        if max_pages is not None:
            n = min(n, max_pages)
        if len(hashes) < n:
            key = extra_digest(extra) if extra_key is None else extra_key
            parent = hashes[-1] if hashes else ROOT_HASH
            for i in range(len(hashes), n):
                parent = block_hash(parent, token_ids[i * ps:(i + 1) * ps], key)
                hashes.append(parent)
        return hashes

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """The pages of the longest cached chain prefix of `hashes`; changes nothing."""
        pages = []
        for h in hashes:
            page = self._page_of.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    @staticmethod
    def max_prefix_pages(num_tokens: int, page_size: int) -> int:
        """Most pages a prefix hit may cover for a sequence of `num_tokens` tokens: full pages
        of the first num_tokens - 1 tokens, so the last token is always computed."""
        return max(num_tokens - 1, 0) // page_size

    def match_prefix(self, token_ids: Sequence[int], extra, *,
                     hashes: list[bytes] | None = None,
                     max_pages: int | None = None) -> list[int]:
        """Longest chain of cached full pages that starts `token_ids`, each touched (refcount+1,
        out of the evictable LRU), never covering the last token; counted in prefix_*_tokens.

        `hashes`, when given, is the caller's memo of the sequence's page hashes (extended in
        place), so a sequence's pages are hashed once however often it is looked up.
        `max_pages` caps the match further.
        """
        hashes = [] if hashes is None else hashes
        limit = self.max_prefix_pages(len(token_ids), self.page_size)
        if max_pages is not None:
            limit = min(limit, max_pages)
        self.extend_hashes(hashes, token_ids, extra, max_pages=limit)
        pages = self.lookup(hashes[:limit])
        self.touch(pages)
        self.prefix_query_tokens += len(token_ids)
        self.prefix_hit_tokens += len(pages) * self.page_size
        return pages

    def cache_full_pages(self, pages: Sequence[int], token_ids: Sequence[int], extra,
                         num_cached_already: int, *, hashes: list[bytes] | None = None) -> int:
        """Register the full pages of a sequence that are not registered yet.

        pages: the sequence's pages in order; token_ids: its tokens whose keys and values are
        stored (at least every token of the pages to register); pages[:num_cached_already]
        were handled before. Pages num_cached_already .. len(token_ids) // page_size - 1 get
        their block hash, unless another page already holds that hash (then the page stays
        uncached and the existing entry is kept). Returns the number of full pages handled,
        the caller's next `num_cached_already`. `hashes` as in `match_prefix`.
        """
        n = len(token_ids) // self.page_size
        if not 0 <= num_cached_already <= n or n > len(pages):
            raise ValueError(f"cache_full_pages: {len(token_ids)} tokens fill {n} pages; the "
                             f"sequence has {len(pages)} pages and {num_cached_already} handled")
        if n == num_cached_already:
            return n
        hashes = [] if hashes is None else hashes
        self.extend_hashes(hashes, token_ids, extra, max_pages=n)
        self.cache_pages(pages[num_cached_already:n], hashes[num_cached_already:n])
        return n

    def cache_pages(self, pages: Sequence[int], hashes: Sequence[bytes]) -> None:
        """Register held pages under their block hashes (pages[i] under hashes[i]): a page
        already registered under its hash is left as it is; one whose hash another page holds
        stays uncached (the first copy wins). A page nobody holds, or one cached under
        another hash, raises ValueError and nothing changes."""
        todo = list(zip(pages, hashes, strict=True))
        for page, h in todo:
            self._check_page(page, "cache_pages")
            if page == NULL_PAGE or self._refcount[page] == 0:
                raise ValueError(f"cache_pages: page {page} is not held by the sequence")
            old = self._hash_of.get(page)
            if old is not None and old != h:
                raise ValueError(f"cache_pages: page {page} is already cached with another hash")
        for page, h in todo:
            if page not in self._hash_of and h not in self._page_of:
                self._page_of[h] = page
                self._hash_of[page] = h

    def cached_page(self, block_hash: bytes) -> int | None:
        """The page registered under `block_hash`, or None; changes nothing."""
        return self._page_of.get(block_hash)

    # ---------------------------------------------------------------------- checks
    def check_invariants(self) -> None:
        """Raise AssertionError unless every page is in exactly one state and the maps agree."""
        assert self._refcount[NULL_PAGE] == 0, "the null page has references"
        free = list(self._free)
        assert len(set(free)) == len(free), "a page is twice in the free queue"
        free_set, evict_set = set(free), set(self._evictable)
        assert NULL_PAGE not in free_set and NULL_PAGE not in evict_set, "null page handed out"
        assert NULL_PAGE not in self._hash_of, "the null page is cached"
        assert not free_set & evict_set, "a page is both free-uncached and evictable"
        for page in range(1, self.num_pages):
            rc = self._refcount[page]
            assert rc >= 0, f"page {page} has refcount {rc}"
            states = (page in free_set) + (page in evict_set) + (rc > 0)
            assert states == 1, f"page {page} is in {states} states (refcount {rc})"
            if page in free_set:
                assert page not in self._hash_of, f"free-uncached page {page} has a hash"
            if page in evict_set:
                assert page in self._hash_of, f"evictable page {page} has no hash"
        assert len(self._hash_of) == len(self._page_of), "hash maps differ in size"
        for page, h in self._hash_of.items():
            assert self._page_of.get(h) == page, f"hash maps disagree on page {page}"
