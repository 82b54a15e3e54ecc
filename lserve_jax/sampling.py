"""Sampling parameters and on-device token sampling.

Every sequence of a batch carries its own temperature, top-k, top-p and PRNG key as arrays, so
one compiled step serves any mix of requests.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lserve_jax import inputs


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick tokens for one prompt (vLLM's names and defaults).

    temperature 0 means greedy; top_k 0 (or -1) and top_p 1.0 mean no truncation; `seed` (an
    int in [0, 2**63)) makes a sampled continuation reproducible; `stop_token_ids` end generation
    besides the model's EOS. Values are checked here (lserve_jax/inputs.py); stop ids are checked
    against the vocabulary when the model is known.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        inputs.check_int("max_tokens", self.max_tokens, minimum=1)
        inputs.check_float("temperature", self.temperature, minimum=0)
        if inputs.check_int("top_k", self.top_k) < -1:
            raise ValueError(f"top_k={self.top_k!r} must be >= 0 (0 or -1: disabled)")
        inputs.check_float("top_p", self.top_p, above=0, maximum=1)
        if self.seed is not None:
            object.__setattr__(self, "seed", inputs.check_seed(self.seed))
        stops = inputs.check_token_ids("stop_token_ids", self.stop_token_ids)
        bad = [t for t in stops if not 0 <= t < 2**31]
        if bad:
            raise ValueError(f"stop_token_ids {bad[:5]} are not token ids (must be >= 0; the "
                             "model's vocabulary bounds them further)")
        object.__setattr__(self, "stop_token_ids", tuple(stops))
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            raise TypeError(f"ignore_eos={self.ignore_eos!r} must be a bool")


@struct.dataclass
class SamplingArrays:
    """Per-sequence sampling settings on device: all [B]; keys [B, 2] uint32."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    keys: jax.Array


def sample(logits: jax.Array, s: SamplingArrays, index: jax.Array) -> jax.Array:
    """Pick one token per row. logits [B, V] f32 -> tokens [B] int32.

    Greedy rows (temperature 0) take the argmax. Others scale by 1/temperature, keep the top_k
    largest logits and the smallest prefix whose probability reaches top_p, then draw with the
    row's key folded with `index` ([B] or a scalar): the index of the output token being drawn.
    Keyed by the row's own output index, never by a step of the batch, a request draws the same
    tokens whatever batch it runs in, and again after being recomputed. The sort only runs
    when some row samples.
    """
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
        ranked = jnp.where(before < s.top_p[:, None], ranked, -jnp.inf)
        index_b = jnp.broadcast_to(jnp.asarray(index, jnp.int32), (logits.shape[0],))
        keys = jax.vmap(jax.random.fold_in)(s.keys, index_b)
        choice = jax.vmap(jax.random.categorical)(keys, ranked)
        picked = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
        return jnp.where(s.temperature > 0, picked, greedy)

    return jax.lax.cond(jnp.any(s.temperature > 0), draw, lambda _: greedy, None)
