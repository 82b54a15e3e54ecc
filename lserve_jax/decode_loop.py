"""Jitted device steps of generation: prefill + first token, then many decode steps in one loop.

The whole state is one pytree (`DecodeState`) that goes in and comes out donated. The host only
ever pulls back `out_tokens`, `num_generated`, `done` and `error_at`.

Every step checks each row's logits with one `isfinite` reduction: a row whose logits hold a NaN
or an inf (a damaged checkpoint, an overflow) stops there without emitting that token, and
`error_at` records which generated token it was; the other rows go on unaffected.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from lserve_jax.sampling import (SamplingArrays, TokenCounts, add_tokens, sample,
                                 token_logprobs)
from models import llama, parallel
from models.attention import AttentionConfig
from models.config import LlamaConfig
from models.kv_cache import KVCache


@struct.dataclass
class DecodeState:
    """Loop state for B sequences (one per row), all arrays:

    cache        the paged KV cache (rows addressed by `slots`)
    slots        [B] int32   cache slot of each row
    last_token   [B] int32   token to feed next
    out_tokens   [B, N] int32 generated ids (N = capacity), -1 past `num_generated`
    num_generated[B] int32
    max_tokens   [B] int32   per-row generation limit (<= N)
    stop_ids     [B, M] int32 ids that end a row (EOS and user stops), -1 padded
    done         [B] bool
    error_at     [B] int32   index of the generated token whose logits were not finite, -1: none
    sampling     per-row sampling settings (keys drawn by each row's output index)
    index_offset [B] int32   output index of out_tokens[:, 0] (tokens the row generated before
                             this state; 0 from `start`), so a row's output number n is keyed
                             by n wherever the loop starts
    entries      [E, 2] int32 or None: (row, page-table column) of every page a row may read
                             in the loop, for the CPU path of dense decode attention
                             (`models.attention.decode_attention`); None: every column
    counts       the rows' `TokenCounts` when a row has penalties (updated as tokens are
                 generated), else None
    logprobs     None, or (of the token [B, N], its rank [B, N], top-K ids [B, N, K], their
                 log-probabilities [B, N, K]) of each generated token (`logprob_buffers`)
    """

    cache: KVCache
    slots: jax.Array
    last_token: jax.Array
    out_tokens: jax.Array
    num_generated: jax.Array
    max_tokens: jax.Array
    stop_ids: jax.Array
    done: jax.Array
    error_at: jax.Array
    sampling: SamplingArrays
    index_offset: jax.Array
    entries: jax.Array | None = None
    counts: TokenCounts | None = None
    logprobs: tuple | None = None


def logprob_buffers(rows: int, capacity: int, k: int) -> tuple | None:
    """Empty `DecodeState.logprobs` for K = k top log-probabilities (None for k < 0)."""
    if k < 0:
        return None
    return (jnp.zeros((rows, capacity), jnp.float32), jnp.zeros((rows, capacity), jnp.int32),
            jnp.zeros((rows, capacity, k), jnp.int32), jnp.zeros((rows, capacity, k), jnp.float32))


def _is_stop(tokens: jax.Array, stop_ids: jax.Array) -> jax.Array:
    return jnp.any(tokens[:, None] == stop_ids, axis=-1)


def _not_finite(logits: jax.Array) -> jax.Array:
    """[B, V] -> [B] bool: the row holds a NaN or an inf."""
    return ~jnp.all(jnp.isfinite(logits), axis=-1)


@functools.partial(jax.jit, static_argnames=("config", "attention", "capacity"),
                   donate_argnames=("cache",))
def start(params: dict, cache: KVCache, tokens: jax.Array, seq_lens: jax.Array, slots: jax.Array,
          sampling: SamplingArrays, max_tokens: jax.Array, stop_ids: jax.Array, *,
          config: LlamaConfig, attention: AttentionConfig, capacity: int) -> DecodeState:
    """Prefill right-padded prompts tokens [B, T] (lengths seq_lens [B]) into `slots`, sample
    each row's first token, and return the loop state."""
    cache, logits = llama.prefill(params, cache, tokens, seq_lens, slots,
                                  config=config, attention=attention)
    first = sample(logits, sampling, jnp.int32(0))
    bad = _not_finite(logits)
    b = tokens.shape[0]
    out = jnp.full((b, capacity), -1, jnp.int32).at[:, 0].set(jnp.where(bad, -1, first))
    return DecodeState(
        cache=cache, slots=slots, last_token=first, out_tokens=out,
        num_generated=jnp.where(bad, 0, 1).astype(jnp.int32), max_tokens=max_tokens,
        stop_ids=stop_ids, done=bad | _is_stop(first, stop_ids) | (max_tokens <= 1),
        error_at=jnp.where(bad, 0, -1).astype(jnp.int32), sampling=sampling,
        index_offset=jnp.zeros((b,), jnp.int32))


@functools.partial(jax.jit, static_argnames=("config", "attention", "num_steps", "shard"),
                   donate_argnames=("state",))
def run(params: dict, state: DecodeState, *, config: LlamaConfig, attention: AttentionConfig,
        num_steps: int, shard: parallel.Shard | None = None) -> DecodeState:
    """Decode up to `num_steps` tokens per row inside one `lax.while_loop`, stopping early when
    every row is done (stop token or `max_tokens`). `shard`: one device's part of a
    tensor-parallel step, inside `shard_map` (models/parallel.py)."""

    def cond(carry):
        i, s = carry
        return (i < num_steps) & ~jnp.all(s.done)

    def body(carry):
        i, s = carry
        active = ~s.done
        cache, logits = llama.decode(params, s.cache, s.last_token, s.slots, active,
                                     config=config, attention=attention, entries=s.entries,
                                     shard=shard)
        token = sample(logits, s.sampling, s.index_offset + s.num_generated, s.stop_ids,
                       s.counts)
        bad = active & _not_finite(logits)
        emit = active & ~bad
        token = jnp.where(emit, token, s.last_token)
        rows = jnp.arange(token.shape[0])
        col = jnp.where(emit, s.num_generated, s.out_tokens.shape[1])  # out of range: dropped
        out = s.out_tokens.at[rows, col].set(token, mode="drop")
        num_generated = s.num_generated + emit.astype(jnp.int32)
        done = s.done | bad | (emit & (_is_stop(token, s.stop_ids)
                                       | (num_generated >= s.max_tokens)))
        error_at = jnp.where(bad, s.num_generated, s.error_at)
        counts = None if s.counts is None else add_tokens(s.counts, token, emit)
        logprobs = s.logprobs
        if logprobs is not None:
            k = logprobs[2].shape[-1]
            logprobs = tuple(buf.at[rows, col].set(new, mode="drop") for buf, new in
                             zip(logprobs, token_logprobs(logits, token, k)))
        return i + 1, s.replace(cache=cache, last_token=token, out_tokens=out,
                                num_generated=num_generated, done=done, error_at=error_at,
                                counts=counts, logprobs=logprobs)

    _, state = jax.lax.while_loop(cond, body, (jnp.int32(0), state))
    return state
