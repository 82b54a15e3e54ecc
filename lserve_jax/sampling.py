"""Sampling parameters and on-device token sampling.

Every sequence of a batch carries its own settings as arrays (temperature, top-k, top-p, min-p,
penalties, minimum length, PRNG key), so one compiled step serves any mix of requests. The
order of the logit processing is vLLM's: stop tokens masked below `min_tokens`, then the
repetition, frequency and presence penalties on the raw logits, then temperature, then the
top-k / top-p / min-p filters, then the draw (greedy rows take the argmax of the penalized
logits). Log-probabilities are those of the raw logits (`log_softmax` of the model's output),
computed from the same logits the token is drawn from.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lserve_jax import inputs

MAX_LOGPROBS = 20  # top log-probabilities one token may ask for (OpenAI's top_logprobs limit)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to generate for one prompt (vLLM's names, defaults and meanings).

    n: completions of the prompt (each its own sequence; with a `seed`, completion i draws
    from a key derived from (seed, i), so all n are reproducible).
    max_tokens: at most this many generated tokens (None: until the context is full);
    min_tokens: stop tokens (EOS and `stop_token_ids`) and `stop` strings do not end a
    completion before this many.
    temperature 0 means greedy; top_k 0 (or -1), top_p 1.0 and min_p 0 mean no truncation
    (min_p keeps tokens whose probability is at least min_p times the most likely one's).
    presence_penalty / frequency_penalty (in [-2, 2]) subtract from the logit of every token
    already generated, once / per occurrence; repetition_penalty (> 0, 1 is off) divides a
    positive logit, multiplies a negative one, for every token in the prompt or the output.
    seed: an int in [0, 2**63) makes sampling reproducible.
    stop: strings that end a completion when its text contains them (matched on the
    detokenized text across token boundaries; the text is cut before the stop string unless
    `include_stop_str_in_output`); stop_token_ids end it besides the model's EOS (unless
    `ignore_eos`).
    logprobs: return the log-probabilities of each generated token and of the `logprobs` most
    likely ones (0: only the generated token's; None: none), at most MAX_LOGPROBS.
    skip_special_tokens: leave special tokens out of the text.
    Values are checked here (lserve_jax/inputs.py); token ids against the vocabulary when the
    model is known.
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        inputs.check_int("n", self.n, minimum=1, maximum=inputs.MAX_N)
        if self.max_tokens is not None:
            inputs.check_int("max_tokens", self.max_tokens, minimum=1)
        inputs.check_int("min_tokens", self.min_tokens, minimum=0,
                         maximum=self.max_tokens)
        inputs.check_float("temperature", self.temperature, minimum=0)
        if inputs.check_int("top_k", self.top_k) < -1:
            raise ValueError(f"top_k={self.top_k!r} must be >= 0 (0 or -1: disabled)")
        inputs.check_float("top_p", self.top_p, above=0, maximum=1)
        inputs.check_float("min_p", self.min_p, minimum=0, maximum=1)
        inputs.check_float("presence_penalty", self.presence_penalty, minimum=-2, maximum=2)
        inputs.check_float("frequency_penalty", self.frequency_penalty, minimum=-2, maximum=2)
        inputs.check_float("repetition_penalty", self.repetition_penalty, above=0)
        if self.seed is not None:
            set_("seed", inputs.check_seed(self.seed))
        set_("stop", inputs.check_stop_strings(self.stop))
        stops = inputs.check_token_ids("stop_token_ids", self.stop_token_ids)
        bad = [t for t in stops if not 0 <= t < 2**31]
        if bad:
            raise ValueError(f"stop_token_ids {bad[:5]} are not token ids (must be >= 0; the "
                             "model's vocabulary bounds them further)")
        set_("stop_token_ids", tuple(stops))
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"{name}={getattr(self, name)!r} must be a bool")
        if self.logprobs is not None:
            inputs.check_int("logprobs", self.logprobs, minimum=0, maximum=MAX_LOGPROBS)

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)


@struct.dataclass
class SamplingArrays:
    """Per-sequence sampling settings on device: all [B]; keys [B, 2] uint32.

    min_p and min_tokens may be None (off for every row); the penalties (presence, frequency,
    repetition) are given together or not at all, and with them the rows' `TokenCounts`.
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    keys: jax.Array
    min_p: jax.Array | None = None
    min_tokens: jax.Array | None = None
    presence: jax.Array | None = None
    frequency: jax.Array | None = None
    repetition: jax.Array | None = None


@struct.dataclass
class TokenCounts:
    """What the penalties look at, per row: output [B, V] int32 occurrences of each token in
    the generated tokens; prompt [B, V] bool tokens of the prompt."""

    output: jax.Array
    prompt: jax.Array


def token_counts(prompt_ids: jax.Array, output_ids: jax.Array, vocab: int) -> TokenCounts:
    """Counts from each row's prompt ids [B, P] and generated ids [B, O] (-1 padded)."""
    b = prompt_ids.shape[0]
    rows = jnp.arange(b)[:, None]
    drop = lambda ids: jnp.where(ids >= 0, ids, vocab)  # noqa: E731 - out of range: dropped
    output = jnp.zeros((b, vocab), jnp.int32).at[rows, drop(output_ids)].add(1, mode="drop")
    prompt = jnp.zeros((b, vocab), bool).at[rows, drop(prompt_ids)].set(True, mode="drop")
    return TokenCounts(output=output, prompt=prompt)


def add_tokens(counts: TokenCounts, tokens: jax.Array, emit: jax.Array) -> TokenCounts:
    """Counts after each row with `emit` [B] generated `tokens` [B]."""
    rows = jnp.arange(tokens.shape[0])
    return counts.replace(output=counts.output.at[rows, tokens].add(emit.astype(jnp.int32)))


def process_logits(logits: jax.Array, s: SamplingArrays, index: jax.Array,
                   stop_ids: jax.Array | None = None,
                   counts: TokenCounts | None = None) -> jax.Array:
    """The logits [B, V] (f32) with stop tokens masked below `min_tokens` (`index`: the
    output index of the token being drawn; `stop_ids` [B, M], -1 padded) and the penalties
    applied (`counts` given with them). Temperature and filters come in `sample`."""
    logits = logits.astype(jnp.float32)
    b, vocab = logits.shape
    if s.min_tokens is not None and stop_ids is not None:
        index_b = jnp.broadcast_to(jnp.asarray(index, jnp.int32), (b,))
        early = (index_b < s.min_tokens)[:, None] & (stop_ids >= 0)
        cols = jnp.where(early, stop_ids, vocab)
        logits = logits.at[jnp.arange(b)[:, None], cols].set(-jnp.inf, mode="drop")
    if s.presence is not None:
        if counts is None:
            raise ValueError("penalties need the rows' TokenCounts")
        seen = counts.prompt | (counts.output > 0)
        rep = s.repetition[:, None]
        logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
        logits = (logits - s.frequency[:, None] * counts.output
                  - s.presence[:, None] * (counts.output > 0))
    return logits


def sample(logits: jax.Array, s: SamplingArrays, index: jax.Array,
           stop_ids: jax.Array | None = None, counts: TokenCounts | None = None) -> jax.Array:
    """Pick one token per row. logits [B, V] -> tokens [B] int32.

    After `process_logits`, greedy rows (temperature 0) take the argmax. Others scale by
    1/temperature, keep the top_k largest logits, the smallest prefix whose probability
    reaches top_p and the tokens at least min_p times as likely as the best, then draw with
    the row's key folded with `index` ([B] or a scalar): the index of the output token being
    drawn. Keyed by the row's own output index, never by a step of the batch, a request draws
    the same tokens whatever batch it runs in, and again after being recomputed. The sort only
    runs when some row samples.
    """
    logits = process_logits(logits, s, index, stop_ids, counts)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        vocab = logits.shape[-1]
        scaled = logits / jnp.maximum(s.temperature, 1e-6)[:, None]
        order = jnp.argsort(-scaled, axis=-1)
        ranked = jnp.take_along_axis(scaled, order, axis=-1)  # descending
        k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, vocab), vocab)
        rank = jnp.arange(vocab)[None, :]
        ranked = jnp.where(rank < k[:, None], ranked, -jnp.inf)
        probs = jax.nn.softmax(ranked, axis=-1)
        # Keep a token if the mass strictly before it is below top_p (the top token always).
        before = jnp.cumsum(probs, axis=-1) - probs
        keep = before < s.top_p[:, None]
        if s.min_p is not None:  # probs[:, 0] is the most likely token's
            keep &= probs >= s.min_p[:, None] * probs[:, :1]
        ranked = jnp.where(keep, ranked, -jnp.inf)
        index_b = jnp.broadcast_to(jnp.asarray(index, jnp.int32), (logits.shape[0],))
        keys = jax.vmap(jax.random.fold_in)(s.keys, index_b)
        choice = jax.vmap(jax.random.categorical)(keys, ranked)
        picked = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
        return jnp.where(s.temperature > 0, picked, greedy)

    return jax.lax.cond(jnp.any(s.temperature > 0), draw, lambda _: greedy, None)


def token_logprobs(logits: jax.Array, tokens: jax.Array, k: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Log-probabilities of the raw logits [B, V]: (of `tokens` [B], their rank [B] (1: the
    most likely), the top-k ids [B, k], their log-probabilities [B, k]), f32 / int32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    rank = 1 + jnp.sum(logp > chosen[:, None], axis=-1, dtype=jnp.int32)
    top_vals, top_ids = jax.lax.top_k(logp, k)
    return chosen, rank, top_ids.astype(jnp.int32), top_vals
