"""Host-side scheduler of the serving engine: continuous batching, chunked prefill, preemption by
recompute and prefix caching, over a `PagePool` (in the style of vLLM v1's scheduler).

Plain Python; nothing here touches a JAX array or imports JAX. Each engine step is

    plan = scheduler.schedule()             # which rows run, which tokens, which pages
    ...device step on plan...               # writes K/V of plan rows, samples where row.sample
    scheduler.update(plan, sampled, finished)

and `schedule` / `update` strictly alternate (so pages freed by an abort or a finish are not
handed out again before the device step that may still read them has ended).

One rule for every request. A request's tokens are prompt_ids + output_ids; the first
`num_computed_tokens` of them have keys and values in its pages. A step computes the next
`num_new` tokens, tokens[num_computed : num_computed + num_new], at positions starting at
num_computed, and samples a token exactly when that reaches the end of the known tokens. A
prefill chunk, the last chunk of a prompt, and a decode step (num_computed = len(tokens) - 1, so
the one new token is the last generated one) are all this rule; a running request always has at
least one token left to compute.

Several decode steps per call. `schedule(decode_steps=K)` with K > 1, when nobody waits and every
planned row is a decode row that samples, gives each row num_steps = min(K, outputs left)
(fewer if the free pages do not hold them; never a preemption for it): the row computes its
input token and then up to num_steps - 1 tokens it samples itself, stopping early at a stop token.
`update` then takes the list of tokens each row sampled. A request arriving meanwhile waits for
the call to end, so K trades host round trips against time to first token.

Budget and order (FCFS by arrival). The step's `max_num_batched_tokens` budget is shared by all
rows; at most `max_num_seqs` requests run. While requests wait, a prompt chunk takes at most
`long_prefill_token_threshold` tokens (0: no cap), so requests queued behind a long prompt are
admitted in the same step instead of after its whole prefill. Running requests come first,
oldest first: each gets min(tokens left, budget left) tokens (1 when decoding). Then waiting
requests in order while budget and seats remain; admission looks up the prefix cache, and a
request that does not fit in the free pages stops admission (no request overtakes an older
one). A step that preempted admits nobody (the pages just freed would only be taken back).

Pages. Before a row is planned its request owns pages for num_computed + num_new tokens. When
the pool cannot provide them, the most recently arrived running request is preempted and the
allocation retried; when that is the requesting row itself, it is preempted and skipped. Rows
already planned this step arrived earlier than any victim, so they are never preempted. The
oldest running request can always get its pages (`add` refuses requests that cannot fit the
whole pool alone, and every other page can be freed), so the engine never deadlocks.

Preemption by recompute. A preempted request frees its pages and its slot, keeps its
output_ids, goes back to WAITING at the front of the waiting queue with num_computed = 0. When
admitted again it computes prompt_ids + output_ids by the rule above: the keys and values of
prompt + output_ids[:-1] are rebuilt (its own pages, released into the prefix cache at
preemption, usually match again) and output_ids[-1] is the input of the chunk that samples, so
the next sampled token is output number len(output_ids), exactly as without preemption. For
sampled (not greedy) decoding to be unchanged too, the device must key each row's randomness by
(request seed, `row.num_output_tokens`), never by the engine step.

Prefix caching. At admission the longest cached chain of full pages of the request's tokens is
matched (never the whole sequence: the last token is computed for its logits); those pages are
shared read-only, and num_computed starts at the matched length. After each step, the pages that
became full (all their tokens known and computed: prompt or generated) are registered. `extra`
keys the cache by configuration.

Prefill window (`PrefillWindow`, LServe's streaming heads). A streaming head's prefill query at
position i sees keys j < sink and i - local < j <= i (the Λ mask), but its decode pool keeps
only a short sink and ring per slot (models/streaming_pool.py). So while a prompt is prefilled,
its streaming heads also store their keys in pages of a second pool, the window pool, one page
per page-table column (`Request.window_pages`, column -> page; `ScheduledRow.window_pages` is
the row's column -> page table, NULL_PAGE where nothing is held). A chunk starting at `start`
reads the columns of keys [0, sink_tokens) and [start - local_tokens + 1, start)
(`PrefillWindow.read_columns`) and writes its own; after each step the columns no later chunk
reads go back to the window pool, and all of them when the prompt is done. Every prompt takes
a window (a chunk reads its own keys back from it, and with prefix caching its full pages are
cached). At admission a request reserves `PrefillWindow.quota` pages (the
sink's, plus the columns that a chunk of up to max_num_batched_tokens tokens and the
local_tokens - 1 keys before it overlap) and is admitted only while the running requests'
quotas fit the window pool; a request never holds more than its quota and evictable cached
pages can always be taken back, so allocating a chunk's window pages never fails.

Prefix caching with a prefill window. Full prompt columns' window pages are registered under the
same block hashes as the main pool's pages and evicted by the same LRU rule, in their own pool.
A hit of m tokens needs the window columns a chunk starting at m reads, so it is shortened to
the longest one whose window columns are all still cached; those window pages are shared
read-only. The sink and ring of the decode pool are rebuilt by the chunk at m itself: the
engine's window holds [0, max(ctx, dec sink)) and at least the decode ring's span before m, and
a chunk copies the decode pool's entries before its start from the window (`write_tokens`). A
hit therefore always leaves a prompt token to a chunk (at most (prompt - 1) // page_size pages).

Slots. A running request holds a slot, a row index in [0, max_num_seqs) of the device page
table, assigned at admission (lowest free slot) and freed at finish, abort or preemption; the
device addresses sequences by slot. A row with `admitted=True` is its request's first step in
that slot: the device resets the slot's per-sequence state (length, selector clock, streaming
pages) before writing.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import enum
import heapq
import numbers
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from lserve_jax.engine.pages import NULL_PAGE, PagePool, extra_digest, pages_for


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


FINISH_REASONS = {"stop": RequestStatus.FINISHED_STOPPED, "length": RequestStatus.FINISHED_LENGTH,
                  "abort": RequestStatus.FINISHED_ABORTED, "error": RequestStatus.FINISHED_ERROR}


def _check_token(name: str, t) -> int:
    if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0:
        raise ValueError(f"{name}: token id {t!r} must be an int >= 0")
    return int(t)


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request and its scheduling state.

    `sampling_params` is opaque here except for its `max_tokens` (an int >= 1); stop tokens
    are decided by whoever calls `Scheduler.update`. `arrival` is set by `Scheduler.add`.
    `num_prefix_hit_tokens` counts prompt tokens served from the prefix cache at the first
    admission (later re-admissions after preemption are counted in the pool's counters only).
    """

    request_id: Hashable
    prompt_ids: Sequence[int]
    sampling_params: Any
    arrival: int | None = None
    output_ids: list[int] = dataclasses.field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    num_computed_tokens: int = 0
    pages: list[int] = dataclasses.field(default_factory=list)
    slot: int | None = None
    num_prefix_hit_tokens: int = 0
    num_preemptions: int = 0
    num_cached_pages: int = 0  # leading pages already handed to cache_full_pages
    window_pages: dict[int, int] = dataclasses.field(default_factory=dict)  # column -> window page
    window_quota: int = 0  # window pages reserved for the request's prefill (PrefillWindow.quota)
    num_window_cached: int = 0  # leading columns whose window pages were handed to the cache
    block_hashes: list[bytes] = dataclasses.field(default_factory=list)  # memo of page hashes
    _admitted_once: bool = dataclasses.field(default=False, init=False, repr=False)

    def __post_init__(self):
        ids = tuple(_check_token(f"request {self.request_id!r}", t) for t in self.prompt_ids)
        if not ids:
            raise ValueError(f"request {self.request_id!r}: the prompt is empty")
        self.prompt_ids = ids
        mt = getattr(self.sampling_params, "max_tokens", None)
        if isinstance(mt, bool) or not isinstance(mt, numbers.Integral) or mt < 1:
            raise ValueError(f"request {self.request_id!r}: sampling_params.max_tokens={mt!r} "
                             "must be an int >= 1")

    @property
    def max_tokens(self) -> int:
        return int(self.sampling_params.max_tokens)

    @property
    def num_tokens(self) -> int:
        """Known tokens: prompt plus generated."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return list(self.prompt_ids) + self.output_ids

    def token_slice(self, start: int, stop: int) -> list[int]:
        """tokens[start:stop] of prompt + output, without building the whole list."""
        p = len(self.prompt_ids)
        if stop <= p:
            return list(self.prompt_ids[start:stop])
        if start >= p:
            return self.output_ids[start - p:stop - p]
        return list(self.prompt_ids[start:]) + self.output_ids[:stop - p]


@dataclasses.dataclass(frozen=True)
class ScheduledRow:
    """One request's work in a step.

    slot: its page-table row; start: position of token_ids[0] (= num_computed before the step);
    sample: the chunk ends the known tokens, so the logits of its last token are needed and one
    token is sampled; pages: the slot's whole page list (page-table row, NULL_PAGE-padded by the
    device), covering start + len(token_ids) tokens; admitted: first step in this slot (reset
    the slot's per-sequence state); num_output_tokens: tokens generated so far, the index of the
    token this row samples (key sampling randomness by it). window_pages: with a prefill window,
    the window-pool page of each page-table column the row's streaming heads read or write
    (NULL_PAGE elsewhere; empty when the request holds no window pages). num_steps: decode
    steps the row may run in this call (pages cover start + num_steps tokens).
    """

    request_id: Hashable
    slot: int
    start: int
    token_ids: tuple[int, ...]
    sample: bool
    pages: tuple[int, ...]
    admitted: bool
    num_output_tokens: int
    num_prompt_tokens: int
    window_pages: tuple[int, ...] = ()
    num_steps: int = 1

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_decode(self) -> bool:
        """One token past the prompt: a decode step (a generated token is the input)."""
        return len(self.token_ids) == 1 and self.start >= self.num_prompt_tokens


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Everything the device step needs, and what the scheduler did to get there.

    rows: running requests oldest first, then newly admitted ones; preempted: ids preempted
    while planning (their slots are free, they are waiting again); prefix_hits: (request id,
    matched tokens) for admissions that hit the prefix cache.
    """

    step: int
    rows: tuple[ScheduledRow, ...]
    preempted: tuple[Hashable, ...]
    prefix_hits: tuple[tuple[Hashable, int], ...]

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.rows)

    @property
    def is_empty(self) -> bool:
        return not self.rows

    def page_table(self, num_slots: int, max_pages_per_seq: int) -> np.ndarray:
        """[num_slots, max_pages_per_seq] int32 page table of the planned rows, NULL_PAGE
        elsewhere (slots not in the plan are not read by this step)."""
        table = np.full((num_slots, max_pages_per_seq), NULL_PAGE, np.int32)
        for r in self.rows:
            if len(r.pages) > max_pages_per_seq:
                raise ValueError(f"row of {r.request_id!r} has {len(r.pages)} pages > "
                                 f"{max_pages_per_seq=}")
            table[r.slot, :len(r.pages)] = r.pages
        return table


@dataclasses.dataclass(frozen=True)
class PrefillWindow:
    """The streaming heads' prefill window (see the module docstring): its page pool (of the
    same page size as the main pool), and the keys it keeps for later chunks: [0, sink_tokens)
    and, for a chunk starting at `start`, [start - local_tokens + 1, start)."""

    pool: PagePool
    sink_tokens: int
    local_tokens: int

    def __post_init__(self):
        for name in ("sink_tokens", "local_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
                raise ValueError(f"PrefillWindow.{name}={v!r} must be an int >= 0")
        if self.local_tokens < 1:
            raise ValueError(f"PrefillWindow.local_tokens={self.local_tokens} must be >= 1")

    @property
    def sink_pages(self) -> int:
        """Columns holding the sink tokens (kept for the whole prefill)."""
        return self.pool.pages_for(self.sink_tokens)

    def quota(self, num_prompt_tokens: int, max_chunk: int) -> int:
        """Most window pages a prompt holds at once when its chunks are at most `max_chunk`
        tokens (`window_quota`)."""
        return window_quota(self.pool.page_size, self.sink_tokens, self.local_tokens,
                            num_prompt_tokens, max_chunk)

    def first_kept(self, start: int) -> int:
        """The first column past the sink that a chunk starting at `start` reads: the one
        holding key start - local_tokens + 1."""
        return max(self.sink_pages, max(start - self.local_tokens + 1, 0) // self.pool.page_size)

    def read_columns(self, start: int) -> list[int]:
        """The columns holding keys a chunk starting at `start` reads: the sink's, then the
        window's."""
        sink = self.pool.pages_for(min(self.sink_tokens, start))
        if start - self.local_tokens + 1 >= start:
            return list(range(sink))
        return list(range(sink)) + list(range(self.first_kept(start), self.pool.pages_for(start)))

    def keeps(self, column: int, start: int) -> bool:
        """Whether a chunk starting at `start` (or a later one) may still read `column`."""
        return column < self.sink_pages or column >= self.first_kept(start)


def window_quota(page_size: int, sink_tokens: int, local_tokens: int, num_prompt_tokens: int,
                 max_chunk: int) -> int:
    """Window pages a prompt holds at most at once: the sink's, and the columns that a chunk of
    up to `max_chunk` tokens and the `local_tokens - 1` keys before it overlap; at most the
    prompt's pages."""
    pages = pages_for(num_prompt_tokens, page_size)
    sink = min(pages_for(sink_tokens, page_size), pages)
    return min(sink + pages_for(local_tokens - 1 + max_chunk, page_size) + 1, pages)


class Scheduler:
    """FCFS continuous-batching scheduler over a PagePool (see the module docstring), with a
    `PrefillWindow` when the model has streaming heads."""

    def __init__(self, pool: PagePool, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, extra=None, enable_prefix_caching: bool = True,
                 replay_outputs: bool = False, window: PrefillWindow | None = None,
                 long_prefill_token_threshold: int = 0):
        for name, v in (("max_num_seqs", max_num_seqs),
                        ("max_num_batched_tokens", max_num_batched_tokens),
                        ("max_model_len", max_model_len)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name}={v!r} must be an int >= 1")
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={max_num_batched_tokens} must be >= "
                             f"max_num_seqs={max_num_seqs} (every decoding row needs a token)")
        self.pool = pool
        self.max_num_seqs = int(max_num_seqs)
        self.max_num_batched_tokens = int(max_num_batched_tokens)
        self.max_model_len = int(max_model_len)
        self._extra = extra
        self._extra_key = extra_digest(extra)
        self.enable_prefix_caching = bool(enable_prefix_caching)
        if window is not None and window.pool.page_size != pool.page_size:
            raise ValueError(f"the window pool's page_size={window.pool.page_size} != the "
                             f"pool's {pool.page_size}")
        if window is not None and not replay_outputs:
            # A recompute that prefilled generated tokens would run past the window's prompt.
            raise ValueError("a prefill window needs replay_outputs=True")
        self.window = window
        self._window_reserved = 0  # sum of the running requests' window quotas
        if (isinstance(long_prefill_token_threshold, bool)
                or not isinstance(long_prefill_token_threshold, numbers.Integral)
                or long_prefill_token_threshold < 0):
            raise ValueError(f"long_prefill_token_threshold={long_prefill_token_threshold!r} "
                             "must be an int >= 0 (0: off)")
        self.long_prefill_token_threshold = int(long_prefill_token_threshold)
        self.replay_outputs = bool(replay_outputs)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # sorted by arrival
        self._live: dict[Hashable, Request] = {}
        self._free_slots = list(range(self.max_num_seqs))  # a heap: lowest slot first
        self._arrivals = 0
        self._pending: StepPlan | None = None
        self.num_steps = 0
        self.num_preemptions = 0
        self.num_scheduled_tokens = 0

    # ------------------------------------------------------------------------ queries
    @property
    def extra(self):
        """The prefix-cache configuration key (fixed: cached pages are only valid under it)."""
        return self._extra

    def stats(self) -> dict[str, int]:
        """Counters for metrics (cumulative since construction, except the gauges)."""
        return dict(steps=self.num_steps, scheduled_tokens=self.num_scheduled_tokens,
                    preemptions=self.num_preemptions,
                    prefix_hit_tokens=self.pool.prefix_hit_tokens,
                    prefix_query_tokens=self.pool.prefix_query_tokens,
                    evictions=self.pool.num_evictions, running=len(self.running),
                    waiting=len(self.waiting), free_pages=self.pool.num_free,
                    cached_pages=self.pool.num_cached)

    @property
    def max_pages_per_seq(self) -> int:
        """Page-table width that holds any request (ceil(max_model_len / page_size))."""
        return self.pool.pages_for(self.max_model_len)

    @property
    def prefix_hit_tokens(self) -> int:
        return self.pool.prefix_hit_tokens

    @property
    def prefix_query_tokens(self) -> int:
        return self.pool.prefix_query_tokens

    def has_unfinished(self) -> bool:
        return bool(self._live)

    def get(self, request_id: Hashable) -> Request:
        """The live (waiting or running) request with this id; KeyError otherwise."""
        try:
            return self._live[request_id]
        except KeyError:
            raise KeyError(f"no waiting or running request with id {request_id!r}") from None

    # ------------------------------------------------------------------------ intake
    def add(self, request: Request) -> None:
        """Queue a new request, or raise ValueError (nothing changed) if it can never run."""
        rid = request.request_id
        if rid in self._live:
            raise ValueError(f"request id {rid!r} is already waiting or running")
        if (request.status is not RequestStatus.WAITING or request.output_ids
                or request.num_computed_tokens or request.pages or request.arrival is not None):
            raise ValueError(f"request {rid!r} is not a fresh request")
        total = len(request.prompt_ids) + request.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"request {rid!r}: prompt ({len(request.prompt_ids)} tokens) + "
                             f"max_tokens ({request.max_tokens}) = {total} exceeds "
                             f"max_model_len={self.max_model_len}")
        # The last sampled token is never fed back, so at most total - 1 tokens are stored.
        need = self.pool.pages_for(total - 1)
        if need > self.pool.num_usable_pages:
            raise ValueError(f"request {rid!r}: up to {total - 1} stored tokens need {need} "
                             f"pages of {self.pool.page_size}; the pool has only "
                             f"{self.pool.num_usable_pages}, so it could never run")
        if self.window is not None:
            need = self._window_quota(request)
            if need > self.window.pool.num_usable_pages:
                raise ValueError(f"request {rid!r}: its prefill window needs {need} window "
                                 f"pages; the window pool has only "
                                 f"{self.window.pool.num_usable_pages}, so it could never run")
        request.arrival = self._arrivals
        self._arrivals += 1
        self.waiting.append(request)
        self._live[rid] = request

    # ------------------------------------------------------------------------ planning
    def _window_quota(self, req: Request) -> int:
        return self.window.quota(len(req.prompt_ids), self.max_num_batched_tokens)

    def _row(self, req: Request, num_new: int, admitted: bool) -> ScheduledRow:
        start = req.num_computed_tokens
        window = ()
        if req.window_quota:
            # Window pages for the chunk's columns (within the quota: never fails, see the
            # module docstring), then the column -> page table of every column up to its end.
            ps, held = self.pool.page_size, req.window_pages
            columns = pages_for(start + num_new, ps)
            new = [c for c in range(start // ps, columns) if c not in held]
            held.update(zip(new, self.window.pool.allocate(len(new))))
            window = tuple(held.get(c, NULL_PAGE) for c in range(columns))
        return ScheduledRow(request_id=req.request_id, slot=req.slot, start=start,
                            token_ids=tuple(req.token_slice(start, start + num_new)),
                            sample=start + num_new == req.num_tokens, pages=tuple(req.pages),
                            admitted=admitted, num_output_tokens=len(req.output_ids),
                            num_prompt_tokens=len(req.prompt_ids), window_pages=window)

    def _free_window(self, req: Request) -> None:
        if req.window_quota:
            self.window.pool.free(req.window_pages[c] for c in sorted(req.window_pages))
            req.window_pages = {}
            self._window_reserved -= req.window_quota
            req.window_quota = 0

    def _update_window(self, req: Request) -> None:
        """After a step: cache the window pages of newly full prompt pages, then give back the
        pages no later chunk reads (all of them once the prompt is done)."""
        ps, computed = self.pool.page_size, req.num_computed_tokens
        full = min(computed, len(req.prompt_ids)) // ps
        if self.enable_prefix_caching and full > req.num_window_cached:
            self._extend_hashes(req, full)
            done = [c for c in range(req.num_window_cached, full) if c in req.window_pages]
            self.window.pool.cache_pages([req.window_pages[c] for c in done],
                                         [req.block_hashes[c] for c in done])
            req.num_window_cached = full
        if computed >= len(req.prompt_ids):
            self._free_window(req)
            return
        gone = [c for c in sorted(req.window_pages) if not self.window.keeps(c, computed)]
        self.window.pool.free(req.window_pages.pop(c) for c in gone)

    def _window_match(self, req: Request, matched: list[int]) -> tuple[list[int], dict[int, int]]:
        """Shorten a prefix hit to the longest one whose window columns are cached too (the
        columns the next chunk reads: `PrefillWindow.read_columns`); returns (matched pages,
        column -> cached window page)."""
        ps, wpool = self.pool.page_size, self.window.pool
        pages = [wpool.cached_page(h) for h in req.block_hashes[:len(matched)]]
        missing_sink = next((c for c, p in enumerate(pages) if p is None), len(pages))
        runs, run = [], 0  # runs[c]: cached columns in a row ending at column c
        for p in pages:
            run = run + 1 if p is not None else 0
            runs.append(run)
        k = len(matched)
        while k:
            lo = self.window.first_kept(k * ps)
            if min(self.window.sink_pages, k) <= missing_sink and runs[k - 1] >= k - lo:
                break
            k -= 1
        return matched[:k], {c: pages[c] for c in self.window.read_columns(k * ps)}

    def _tokens_left(self, req: Request, computed: int) -> int:
        """Tokens the request's next row computes at most (before the step's budget): the rest
        of the prompt, then (with `replay_outputs`) one token at a time, else everything left."""
        p = len(req.prompt_ids)
        if self.replay_outputs:
            return p - computed if computed < p else 1
        return req.num_tokens - computed

    def _chunk(self, req: Request, computed: int, others_waiting: int) -> int:
        """`_tokens_left`, a prompt chunk capped at `long_prefill_token_threshold` while other
        requests wait (so they are admitted in the same step)."""
        left = self._tokens_left(req, computed)
        cap = self.long_prefill_token_threshold
        if cap and others_waiting and computed < len(req.prompt_ids):
            return min(left, cap)
        return left

    def _cacheable_tokens(self, req: Request) -> int:
        """Computed tokens whose full pages may be registered in the prefix cache."""
        n = req.num_computed_tokens
        return min(n, len(req.prompt_ids)) if self.replay_outputs else n

    def _release(self, req: Request) -> None:
        """Give back a running request's pages and slot."""
        self.pool.free(req.pages)
        req.pages = []
        self._free_window(req)
        heapq.heappush(self._free_slots, req.slot)
        req.slot = None
        self.running.remove(req)

    def _preempt(self, req: Request) -> None:
        self._release(req)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.num_cached_pages = 0
        req.num_window_cached = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _more_steps(self, row: ScheduledRow, decode_steps: int) -> ScheduledRow:
        """The decode row with up to `decode_steps` steps, as far as the free pages go."""
        req = self._live[row.request_id]
        steps = min(decode_steps, req.max_tokens - len(req.output_ids))
        room = (len(req.pages) + self.pool.num_free) * self.pool.page_size - row.start
        steps = max(1, min(steps, room))
        need = self.pool.pages_for(row.start + steps) - len(req.pages)
        if need > 0:
            req.pages.extend(self.pool.allocate(need))
        return dataclasses.replace(row, pages=tuple(req.pages), num_steps=steps)

    def schedule(self, decode_steps: int = 1) -> StepPlan:
        """Plan the next step (see the module docstring for the rules); `decode_steps` > 1
        lets decode rows run several steps when nobody waits."""
        if isinstance(decode_steps, bool) or not isinstance(decode_steps, numbers.Integral) \
                or decode_steps < 1:
            raise ValueError(f"decode_steps={decode_steps!r} must be an int >= 1")
        if self._pending is not None:
            raise RuntimeError("schedule: update() the previous plan before planning another")
        pool, ps = self.pool, self.pool.page_size
        budget = self.max_num_batched_tokens
        rows, preempted, hits = [], [], []
        for req in list(self.running):
            if budget <= 0:
                break
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(self._chunk(req, req.num_computed_tokens, len(self.waiting)), budget)
            need = pool.pages_for(req.num_computed_tokens + num_new) - len(req.pages)
            while need > pool.num_free and req.status is RequestStatus.RUNNING:
                victim = self.running[-1]  # the most recently arrived
                self._preempt(victim)
                preempted.append(victim.request_id)
            if req.status is not RequestStatus.RUNNING:
                break  # it was the most recent one: nothing after it is running
            req.pages.extend(pool.allocate(need))
            rows.append(self._row(req, num_new, admitted=False))
            budget -= num_new
        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.max_num_seqs):
            req = self.waiting[0]
            ntok = req.num_tokens
            matched = []
            if self.enable_prefix_caching:
                limit = PagePool.max_prefix_pages(ntok, ps)
                if self.replay_outputs:  # generated tokens are replayed, never shared
                    limit = min(limit, len(req.prompt_ids) // ps)
                if self.window is not None:  # a chunk restores the streaming heads' ring
                    limit = min(limit, (len(req.prompt_ids) - 1) // ps)
                self._extend_hashes(req, limit)
                matched = pool.lookup(req.block_hashes[:limit])
                if self.window is not None and matched:
                    matched, window_hit = self._window_match(req, matched)
            computed = len(matched) * ps
            num_new = min(self._chunk(req, computed, len(self.waiting) - 1), budget)
            need = pool.pages_for(computed + num_new) - len(matched)
            if need > pool.num_free - sum(pool.refcount(p) == 0 for p in matched):
                break  # FCFS: nobody overtakes the oldest waiting request
            quota = 0
            if self.window is not None and computed < len(req.prompt_ids):
                quota = self._window_quota(req)
                if self._window_reserved + quota > self.window.pool.num_usable_pages:
                    break
            if self.enable_prefix_caching:
                again = pool.match_prefix(req.token_slice(0, ntok), self.extra,
                                          hashes=req.block_hashes, max_pages=len(matched))
                assert again == matched
            self.waiting.popleft()
            req.pages = matched + pool.allocate(need)
            if quota:
                hit = window_hit if matched else {}
                self.window.pool.touch(hit.values())
                req.window_pages, req.window_quota = dict(hit), quota
                req.num_window_cached = len(matched)
                self._window_reserved += quota
            req.num_computed_tokens = computed
            req.num_cached_pages = len(matched)
            req.slot = heapq.heappop(self._free_slots)
            req.status = RequestStatus.RUNNING
            bisect.insort(self.running, req, key=lambda r: r.arrival)
            if not req._admitted_once:
                req.num_prefix_hit_tokens = computed
                req._admitted_once = True
            if computed:
                hits.append((req.request_id, computed))
            rows.append(self._row(req, num_new, admitted=True))
            budget -= num_new
        if (decode_steps > 1 and rows and not preempted and not self.waiting
                and all(r.is_decode and r.sample for r in rows)):
            rows = [self._more_steps(r, decode_steps) for r in rows]
        plan = StepPlan(step=self.num_steps, rows=tuple(rows), preempted=tuple(preempted),
                        prefix_hits=tuple(hits))
        self.num_steps += 1
        self.num_scheduled_tokens += plan.num_scheduled_tokens
        self._pending = plan
        return plan

    def _extend_hashes(self, req: Request, max_pages: int) -> None:
        """Make req.block_hashes cover its first `max_pages` full pages (hashed once each)."""
        if len(req.block_hashes) < max_pages:
            tokens = req.token_slice(0, max_pages * self.pool.page_size)
            self.pool.extend_hashes(req.block_hashes, tokens, self.extra, max_pages=max_pages,
                                    extra_key=self._extra_key)

    # ------------------------------------------------------------------------ results
    def update(self, plan: StepPlan, sampled: Mapping[Hashable, int],
               finished: Mapping[Hashable, str] | None = None) -> list[Request]:
        """Apply the device step's results; returns the requests that finished.

        sampled: request id -> token (or, for a row of several steps, the list of 1 to
        num_steps tokens it sampled, the last one possibly a stop) for rows with `sample` (a row
        whose token must not be emitted, e.g. non-finite logits, leaves it out and is listed in
        `finished`);
        finished: request id -> "stop" | "length" | "error" | "abort" for rows that end now
        (their sampled token, if any, is appended first). A request also finishes with
        "length" at max_tokens outputs. Rows of requests aborted since `schedule` are
        skipped. Inconsistent arguments raise ValueError before anything changes.
        """
        finished = {} if finished is None else finished
        if plan is not self._pending:
            raise ValueError("update: not the plan returned by the last schedule()")
        by_id = {r.request_id: r for r in plan.rows}
        tokens = {}
        for rid, tok in sampled.items():
            if rid not in by_id or not by_id[rid].sample:
                raise ValueError(f"update: request {rid!r} has no sampling row in this plan")
            toks = [tok] if isinstance(tok, numbers.Integral) else list(tok)
            if not 1 <= len(toks) <= by_id[rid].num_steps:
                raise ValueError(f"update: request {rid!r} sampled {len(toks)} tokens; its row "
                                 f"runs 1 to {by_id[rid].num_steps} steps")
            if len(toks) < by_id[rid].num_steps and rid not in finished:
                raise ValueError(f"update: request {rid!r} sampled {len(toks)} of its row's "
                                 f"{by_id[rid].num_steps} steps without finishing")
            tokens[rid] = [_check_token(f"update: sampled token of {rid!r}", t) for t in toks]
        for rid, reason in finished.items():
            if rid not in by_id:
                raise ValueError(f"update: request {rid!r} has no row in this plan")
            if reason not in FINISH_REASONS:
                raise ValueError(f"update: finish reason {reason!r} of {rid!r} is not one of "
                                 f"{sorted(FINISH_REASONS)}")
        live_rows = []
        for r in plan.rows:
            req = self._live.get(r.request_id)
            if req is None or req.status is not RequestStatus.RUNNING or req.slot != r.slot:
                continue  # aborted (and perhaps re-added) since schedule()
            if r.sample and r.request_id not in sampled and r.request_id not in finished:
                raise ValueError(f"update: sampling row of {r.request_id!r} got no token and "
                                 "no finish reason")
            live_rows.append((r, req))
        self._pending = None
        done = []
        for r, req in live_rows:
            req.num_computed_tokens += len(r.token_ids)
            if r.request_id in tokens:
                toks = tokens[r.request_id]
                req.num_computed_tokens += len(toks) - 1  # fed back within the call
                req.output_ids.extend(toks)
            if req.window_quota:
                self._update_window(req)
            if self.enable_prefix_caching:
                n = self._cacheable_tokens(req) // self.pool.page_size
                if n > req.num_cached_pages:
                    self._extend_hashes(req, n)
                    req.num_cached_pages = self.pool.cache_full_pages(
                        req.pages, req.token_slice(0, n * self.pool.page_size), self.extra,
                        req.num_cached_pages, hashes=req.block_hashes)
            reason = finished.get(r.request_id)
            if reason is None and len(req.output_ids) >= req.max_tokens:
                reason = "length"
            if reason is not None:
                self._finish(req, reason)
                done.append(req)
        return done

    def _finish(self, req: Request, reason: str) -> None:
        if req.status is RequestStatus.RUNNING:
            self._release(req)
        else:
            self.waiting.remove(req)
        req.status = FINISH_REASONS[reason]
        req.finish_reason = reason
        del self._live[req.request_id]

    def abort(self, request_id: Hashable) -> Request:
        """Finish a waiting or running request now ("abort"), freeing its pages and slot.
        Unknown or already finished ids raise KeyError."""
        req = self.get(request_id)
        self._finish(req, "abort")
        return req
