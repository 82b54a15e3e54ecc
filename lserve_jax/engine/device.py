"""The serving engine's jitted device steps and the one dataclass that crosses to them.

The host (`lserve_jax/engine/scheduler.py`) owns every page id; the device cache keeps storage
and selector state only. Each call gets a `StepBatch` of NumPy arrays built from the step's
plan: R rows (bucketed; padding rows have `num_tokens` 0 and the out-of-range slot `max_seqs`),
their page-table rows [R, W] (W bucketed), tokens [R, T], start positions and sampling settings.
A step works on a batch-local view of the cache (`local_view`): the shared pools as they are,
and the per-slot state (selection lists, their page counts) gathered into batch order; after
the layers it is scattered back to the slots (`merge_view`). So the model code
(`models/llama.py`) runs unchanged, on slots 0..R-1 of the view, and the device never
allocates. The cache goes in and comes out donated (the pools are updated in place).

Two kinds of call: `prefill_step` (one prompt chunk per row; `fresh=True` when every row starts
at position 0) and `decode_step` (up to `num_steps` generated tokens per row, in one
`decode_loop.run`). Both sample the next token of every row and report rows whose logits are
not finite; the host decides finishes (a decode row also stops early at its stop ids).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec as P

from lserve_jax import decode_loop, inputs
from lserve_jax.sampling import SamplingArrays, TokenCounts, sample, token_counts, token_logprobs
from models import kv_cache, llama, parallel
from models.attention import AttentionConfig
from models.config import LlamaConfig
from models.kv_cache import KVCache


@struct.dataclass
class StepBatch:
    """One device call's inputs (host NumPy arrays; R rows, T tokens, W page-table columns).

    slots [R] int32       cache slot of each row; padding rows: max_seqs (their writes drop)
    tokens [R, T] int32   the row's tokens, right-padded
    starts [R] int32      position of tokens[:, 0] (tokens already stored for the row)
    num_tokens [R] int32  real tokens of the row (0: padding)
    page_table [R, W]     the row's pages in order, NULL_PAGE-padded
    window_table [R, W]   prefill rows with streaming heads: each column's prefill window page
                          (a streaming-pool id), NULL_PAGE where the window keeps nothing
    admitted [R] bool     first step of the row's request in this slot (fresh selector state)
    clock [R] int32       decode rows: decode steps since the prompt ended (the selector's
                          clock, so a recomputed request reselects on the same steps)
    out_index [R] int32   index of the output token the row samples (keys its randomness)
    steps [R] int32       decode rows: decode steps the row may run in this call (0: padding)
    stop_ids [R, M] int32 decode rows: ids that end the row within the call, -1 padded
    entries [E, 2] int32  dense decode on the CPU: (row, column) of every page a row may read
                          in the call, padded with row R (E 0: not used; see
                          `models.attention.decode_attention`)
    prompt_history [R, P] int32, output_history [R, O] int32: with penalties (P > 0), each
                          row's prompt ids and the ids it generated before the call, -1 padded
    sampling              per-row temperature, top-k, top-p, min-p, minimum length, penalties
                          (None unless a row of the call has one) and PRNG key
    """

    slots: jax.Array
    tokens: jax.Array
    starts: jax.Array
    num_tokens: jax.Array
    page_table: jax.Array
    window_table: jax.Array
    admitted: jax.Array
    clock: jax.Array
    out_index: jax.Array
    steps: jax.Array
    stop_ids: jax.Array
    entries: jax.Array
    prompt_history: jax.Array
    output_history: jax.Array
    sampling: SamplingArrays

    @property
    def shape(self) -> tuple[int, int, int]:
        """(R, T, W): the bucketed shape the call is compiled for."""
        return (self.tokens.shape[0], self.tokens.shape[1], self.page_table.shape[1])


def local_view(cache: KVCache, batch: StepBatch, *, clock: bool = False) -> KVCache:
    """The cache as a step on slots 0..R-1 sees it: the batch's page-table rows and lengths
    (`starts`), and each slot's selection state gathered into batch order; the selector clock
    from the batch (`clock=True`, decode) and a fresh selection for admitted rows."""
    rows = jnp.clip(batch.slots, 0, cache.max_seqs - 1)  # padding rows read slot max_seqs - 1
    selected_num_pages = jnp.where(batch.admitted, -1, cache.selected_num_pages[rows])
    return cache.replace(
        page_table=batch.page_table, seq_lens=batch.starts,
        window_table=batch.window_table if cache.window_table.shape[1] else cache.window_table,
        num_reserved=jnp.zeros_like(batch.starts), stream_table=cache.stream_table[rows],
        selected=tuple(s[rows] for s in cache.selected),
        selected_num_pages=selected_num_pages,
        decode_steps=batch.clock if clock else jnp.zeros_like(batch.starts))


def merge_view(cache: KVCache, view: KVCache, batch: StepBatch) -> KVCache:
    """The cache with the view's pools and its per-slot state scattered back to the batch's
    slots (padding rows' slot is out of range: their writes are dropped)."""
    put = lambda whole, part: whole.at[batch.slots].set(part, mode="drop")  # noqa: E731
    return view.replace(
        page_table=cache.page_table, window_table=cache.window_table,
        seq_lens=put(cache.seq_lens, view.seq_lens),
        num_reserved=cache.num_reserved, stream_table=cache.stream_table,
        selected=tuple(put(c, v) for c, v in zip(cache.selected, view.selected)),
        selected_num_pages=put(cache.selected_num_pages, view.selected_num_pages),
        decode_steps=put(cache.decode_steps, view.decode_steps))


def _counts(batch: StepBatch, vocab: int) -> TokenCounts | None:
    """The rows' token counts for the penalties (None when no row of the call has one)."""
    if batch.sampling.presence is None:
        return None
    return token_counts(batch.prompt_history, batch.output_history, vocab)


def _per_device(body, params, cache, batch, shard: parallel.Shard | None, num_outputs: int):
    """`body(params, cache, batch, shard)` run once (shard None), or under tensor parallelism
    on every device of `shard.mesh` on its part of the weights and cache (`jax.shard_map`):
    the cache comes out split as it went in, the other outputs replicated (each device samples
    the same tokens from the gathered logits)."""
    if shard is None:
        return body(params, cache, batch, None)
    specs = parallel.cache_specs(cache)
    return jax.shard_map(
        lambda p, c, b: body(p, c, b, shard), mesh=shard.mesh,
        in_specs=(parallel.param_specs(params), specs, P()),
        out_specs=(specs,) + (P(),) * (num_outputs - 1), check_vma=False)(params, cache, batch)


def _local(config: LlamaConfig, attention: AttentionConfig, shard: parallel.Shard | None):
    """The model and attention configs one device runs."""
    if shard is None:
        return config, attention
    return (parallel.local_config(config, shard.size),
            parallel.local_attention(attention, shard.size))


@functools.partial(jax.jit, static_argnames=("config", "attention", "fresh", "num_logprobs",
                                             "shard"),
                   donate_argnames=("cache",))
def prefill_step(params: dict, cache: KVCache, batch: StepBatch, *, config: LlamaConfig,
                 attention: AttentionConfig, fresh: bool = False, num_logprobs: int = -1,
                 shard: parallel.Shard | None = None
                 ) -> tuple[KVCache, jax.Array, jax.Array, tuple]:
    """Prefill one chunk per row (`llama.prefill_chunk`; `fresh`: every row starts at 0).
    Returns (cache, tokens [R], bad [R], logprobs) sampled from each row's last token;
    logprobs: with `num_logprobs` K >= 0, (of the token [R], rank [R], top-K ids [R, K],
    top-K log-probabilities [R, K]) of the raw logits, else (). `shard`: tensor parallelism
    over its mesh (`params` and `cache` placed as `models.parallel` splits them)."""
    def body(params, cache, batch, shard):
        return _prefill(params, cache, batch, *_local(config, attention, shard), fresh=fresh,
                        num_logprobs=num_logprobs, shard=shard)

    return _per_device(body, params, cache, batch, shard, 4)


def _prefill(params, cache, batch, config, attention, *, fresh, num_logprobs, shard):
    view = local_view(cache, batch)
    local = jnp.arange(batch.slots.shape[0], dtype=jnp.int32)
    view, logits = llama.prefill_chunk(params, view, batch.tokens, batch.starts,
                                       batch.num_tokens, local, config=config,
                                       attention=attention, fresh=fresh, shard=shard)
    tokens = sample(logits, batch.sampling, batch.out_index, batch.stop_ids,
                    _counts(batch, logits.shape[-1]))
    bad = ~jnp.all(jnp.isfinite(logits), axis=-1)
    logprobs = token_logprobs(logits, tokens, num_logprobs) if num_logprobs >= 0 else ()
    return merge_view(cache, view, batch), tokens, bad, logprobs


@functools.partial(jax.jit, static_argnames=("config", "attention", "num_steps", "num_logprobs",
                                             "shard"),
                   donate_argnames=("cache",))
def decode_step(params: dict, cache: KVCache, batch: StepBatch, *, config: LlamaConfig,
                attention: AttentionConfig, num_steps: int = 1, num_logprobs: int = -1,
                shard: parallel.Shard | None = None
                ) -> tuple[KVCache, jax.Array, jax.Array, jax.Array, tuple]:
    """Decode steps (`llama.decode`: page selection, sink + ring for streaming heads) inside
    one `decode_loop.run`: each row from its token tokens[:, 0] for `steps` steps at most,
    stopping early at one of its `stop_ids` or at non-finite logits; sampling keyed by each
    row's output index. Returns (cache, tokens [R, num_steps] (-1 past each row's count),
    counts [R], error_at [R]: the index within the call of the token whose logits were not
    finite, -1 for none, logprobs: as `prefill_step`'s with a step axis after the row's, or
    ()). Penalties count the tokens generated within the call too. `shard`: as
    `prefill_step`'s."""
    def body(params, cache, batch, shard):
        return _decode(params, cache, batch, *_local(config, attention, shard),
                       num_steps=num_steps, num_logprobs=num_logprobs, shard=shard)

    return _per_device(body, params, cache, batch, shard, 5)


def _decode(params, cache, batch, config, attention, *, num_steps, num_logprobs, shard):
    view = local_view(cache, batch, clock=True)
    r = batch.slots.shape[0]
    state = decode_loop.DecodeState(
        cache=view, slots=jnp.arange(r, dtype=jnp.int32), last_token=batch.tokens[:, 0],
        out_tokens=jnp.full((r, num_steps), -1, jnp.int32),
        num_generated=jnp.zeros((r,), jnp.int32), max_tokens=batch.steps,
        stop_ids=batch.stop_ids, done=batch.steps <= 0, error_at=jnp.full((r,), -1, jnp.int32),
        sampling=batch.sampling, index_offset=batch.out_index,
        entries=batch.entries if batch.entries.shape[0] else None,
        counts=_counts(batch, config.vocab_size),
        logprobs=decode_loop.logprob_buffers(r, num_steps, num_logprobs))
    state = decode_loop.run(params, state, config=config, attention=attention,
                            num_steps=num_steps, shard=shard)
    return (merge_view(cache, state.cache, batch), state.out_tokens, state.num_generated,
            state.error_at, state.logprobs or ())


# ---------------------------------------------------------------------------- memory budget
@dataclasses.dataclass(frozen=True)
class PoolSize:
    """How a memory budget is spent: `num_pages` pages (the null page included) of `page_size`
    tokens; `page_bytes` per page over all layers (dense pool and key statistics),
    `fixed_bytes` for the streaming pool (the slots' sink and ring pages, the prefill window)
    and the selector's lists."""

    num_pages: int
    page_size: int
    page_bytes: int
    fixed_bytes: int

    @property
    def capacity_tokens(self) -> int:
        return (self.num_pages - 1) * self.page_size


def pool_bytes(spec: kv_cache.KVCacheSpec) -> tuple[int, int]:
    """(bytes per page over all layers, bytes independent of the page count) of a cache."""
    token = spec.token_head_bytes  # keys and values of a token of a head, with int4's scales
    stat_item = spec.stats_dtype.itemsize  # key statistics keep the model's float dtype
    s, d = spec.page_size, spec.head_dim
    per_page = fixed = 0
    for layer in range(spec.num_layers):
        dense = len(spec.dense_heads(layer))
        per_page += dense * s * token
        if spec.kv_cache_dtype != "auto":  # static f32 scales (or int4's smoothing factors)
            fixed += 2 * spec.num_kv_heads * d * 4
        if spec.logical_page_size is not None:
            per_page += 2 * dense * (s // spec.logical_page_size) * d * stat_item
        if spec.has_streaming:
            stream = spec.num_kv_heads - dense
            pages = 1 + spec.max_seqs * spec.streaming_layout.num_pages + spec.num_window_pages
            fixed += stream * pages * s * token
        if spec.budget_pages is not None:
            fixed += 4 * spec.max_seqs * dense * spec.selection_lists_per_head * spec.budget_pages
    return per_page, fixed


def size_pool(spec: kv_cache.KVCacheSpec, memory_bytes: int) -> PoolSize:
    """The most pages `spec` can have within `memory_bytes` (`spec.num_pages` is ignored)."""
    per_page, fixed = pool_bytes(spec)
    if not per_page:  # every head streams: pages hold no bytes, any number fits
        pages = 2**31 - 1 if memory_bytes >= fixed else 0
    else:
        pages = (memory_bytes - fixed) // per_page
    if pages < 2:
        raise ValueError(f"kv cache memory {memory_bytes / 2**30:.3f} GiB holds {max(pages, 0)} "
                         f"pages of {spec.page_size} tokens ({per_page} bytes each, plus "
                         f"{fixed} bytes of streaming pages); at least 2 are needed")
    return PoolSize(num_pages=int(pages), page_size=spec.page_size, page_bytes=per_page,
                    fixed_bytes=fixed)


def memory_stats() -> dict | None:
    """The default device's memory statistics; None where the backend keeps none (the CPU)."""
    try:
        return jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory statistics
        return None


def device_memory_for_cache(fraction: float) -> int | None:
    """Bytes the KV cache may take on the default device: `fraction` of its memory limit minus
    what is in use (the weights as loaded, int8 ones with `weight_dtype="int8"`: the engine
    sizes its pool after quantizing); None when the device does not report memory (the CPU)."""
    stats = memory_stats()
    if not stats or "bytes_limit" not in stats:
        return None
    return max(int(fraction * stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), 0)


def bucket(n: int, cap: int, minimum: int = 1) -> int:
    """The shape bucket of `n`: the next power of two at least `minimum`, at most `cap`."""
    return min(max(1 << max(n - 1, 0).bit_length(), minimum), cap)


def token_bucket(n: int, minimum: int = 16) -> int:
    """Chunk-length bucket: a power of two up to 128, then also 1.5 times one (192, 384, 768)
    up to 1024, then a multiple of 512."""
    n = max(n, minimum)
    if n > 1024:
        return math.ceil(n / 512) * 512
    power = 1 << (n - 1).bit_length()
    if power > 128 and n <= 3 * power // 4:
        return 3 * power // 4
    return power


CALL_OVERHEAD_TOKENS = 64  # what one more device call costs, in padded token slots


def group_prefill_rows(lengths: list[int], max_rows: int) -> list[list[int]]:
    """Split a step's prefill rows (chunk lengths) into calls that waste few padded slots: a
    call of R rows and longest chunk T costs bucket(R) * token_bucket(T) slots (plus
    CALL_OVERHEAD_TOKENS), and rows sorted by length are cut where the total is least (one long
    chunk beside many short ones is two calls, not R * T slots of padding). Returns lists of
    row indices, longest chunks first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    best = [0.0] + [math.inf] * n  # best[j]: cost of the first j rows (sorted)
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # rows i..j-1 in one call; the longest is row i
            cost = (best[i] + CALL_OVERHEAD_TOKENS
                    + bucket(j - i, max_rows) * token_bucket(lengths[order[i]]))
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def build_batch(rows: list, *, max_seqs: int, num_rows: int, num_tokens: int, num_columns: int,
                sampling: dict, stop_ids: dict | None = None, history: dict | None = None,
                first_window_page: int = 1, num_entries: int = 0) -> StepBatch:
    """A StepBatch (NumPy) of `rows` (scheduler `ScheduledRow`s) padded to the bucket
    (num_rows, num_tokens, num_columns). sampling: request id -> `RowSampling`; stop_ids:
    request id -> its stop token ids (padded with -1 to `inputs.stop_id_width`); history:
    request id -> (prompt ids, generated ids before the call) of the rows with penalties (the
    call carries penalties only if one of its rows has them). Window page p >= 1 of the host's
    window pool is streaming-pool page first_window_page + p - 1 (`KVCache.first_window_page`).
    `num_entries` > 0: the (row, column) entries of every row's pages, padded to that many (at
    least their count)."""
    r, t, w = num_rows, num_tokens, num_columns
    slots = np.full(r, max_seqs, np.int32)
    tokens = np.zeros((r, t), np.int32)
    starts = np.zeros(r, np.int32)
    lengths = np.zeros(r, np.int32)
    table = np.zeros((r, w), np.int32)
    window = np.zeros((r, w), np.int32)
    admitted = np.zeros(r, bool)
    clock = np.zeros(r, np.int32)
    out_index = np.zeros(r, np.int32)
    steps = np.zeros(r, np.int32)
    stop_ids = stop_ids or {}
    width = inputs.stop_id_width(max((len(stop_ids.get(row.request_id, ())) for row in rows),
                                     default=0))
    stops = np.full((r, width), -1, np.int32)
    settings = np.zeros((r, len(RowSampling._fields) - 1), np.float64)
    settings[:, RowSampling._fields.index("top_p")] = 1.0
    settings[:, RowSampling._fields.index("repetition")] = 1.0
    keys = np.zeros((r, 2), np.uint32)
    history = {rid: h for rid, h in (history or {}).items()
               if rid in {row.request_id for row in rows}}
    width_p = bucket(max((len(h[0]) for h in history.values()), default=0), 1 << 30, 16)
    width_o = bucket(max((len(h[1]) for h in history.values()), default=0), 1 << 30, 16)
    prompt_hist = np.full((r, width_p if history else 0), -1, np.int32)
    output_hist = np.full((r, width_o if history else 0), -1, np.int32)
    for i, row in enumerate(rows):
        n = len(row.token_ids)
        slots[i], starts[i], lengths[i] = row.slot, row.start, n
        tokens[i, :n] = row.token_ids
        table[i, :len(row.pages)] = row.pages
        if row.window_pages:
            ids = np.asarray(row.window_pages, np.int32)
            window[i, :len(ids)] = np.where(ids > 0, ids + (first_window_page - 1), 0)
        admitted[i] = row.admitted
        clock[i] = max(row.start - row.num_prompt_tokens, 0)
        out_index[i] = row.num_output_tokens
        steps[i] = row.num_steps
        ids = sorted(stop_ids.get(row.request_id, ()))
        stops[i, :len(ids)] = ids
        row_sampling = sampling[row.request_id]
        keys[i] = row_sampling.key
        settings[i] = row_sampling[:-1]
        if row.request_id in history:
            prompt, output = history[row.request_id]
            prompt_hist[i, :len(prompt)] = prompt
            output_hist[i, :len(output)] = output
    entries = np.zeros((num_entries, 2), np.int32)
    if num_entries:
        pairs = [(i, c) for i, row in enumerate(rows) for c in range(len(row.pages))]
        if len(pairs) > num_entries:
            raise ValueError(f"{len(pairs)} page entries exceed num_entries={num_entries}")
        entries[:, 0] = r
        entries[:len(pairs)] = pairs
    col = {name: settings[:, i] for i, name in enumerate(RowSampling._fields[:-1])}
    penalties = dict(presence=col["presence"].astype(np.float32),
                     frequency=col["frequency"].astype(np.float32),
                     repetition=col["repetition"].astype(np.float32)) if history else {}
    return StepBatch(slots=slots, tokens=tokens, starts=starts, num_tokens=lengths,
                     page_table=table, window_table=window, admitted=admitted, clock=clock,
                     out_index=out_index, steps=steps, stop_ids=stops, entries=entries,
                     prompt_history=prompt_hist, output_history=output_hist,
                     sampling=SamplingArrays(
                         temperature=col["temperature"].astype(np.float32),
                         top_k=col["top_k"].astype(np.int32),
                         top_p=col["top_p"].astype(np.float32), keys=keys,
                         min_p=col["min_p"].astype(np.float32),
                         min_tokens=col["min_tokens"].astype(np.int32), **penalties))


class RowSampling(NamedTuple):
    """One request's sampling settings as the device takes them (`SamplingArrays`' fields):
    top_k 0 is off; key the raw PRNG key [2] uint32 (last)."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    min_tokens: int
    presence: float
    frequency: float
    repetition: float
    key: np.ndarray
