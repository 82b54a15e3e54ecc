"""The attention seam: every attention call of the model goes through these two functions.

`prefill_attention` runs over a whole (right-padded) prompt, `decode_attention` over the paged
cache for one new token per sequence. `AttentionConfig.impl` picks the Pallas kernels or their
plain-jnp references; `mode` picks dense attention or LServe's head split (DESIGN §1.2, §1.4).

Einsum alphabet used in models/: b batch, t query position, s key position, h query head,
k KV head, g query head within a GQA group, d head dim, e model (hidden) dim.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from pallas_kernels import sparse_prefill_attention

ATTENTION_MODES = ("dense", "lserve")
ATTENTION_IMPLS = ("xla", "pallas")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    """Static attention settings, passed to jit as a static argument.

    `streaming_heads[layer][kv_head]` marks LServe streaming heads (Λ mask in prefill); None means
    every head is dense. `ctx_sink_tokens`/`ctx_local_tokens` are the prefill Λ window.
    """

    mode: str = "dense"
    impl: str = "xla"
    interpret: bool = False
    ctx_sink_tokens: int = 128
    ctx_local_tokens: int = 8192
    streaming_heads: tuple[tuple[bool, ...], ...] | None = None

    def __post_init__(self):
        if self.mode not in ATTENTION_MODES:
            raise ValueError(f"attention mode={self.mode!r} must be one of {ATTENTION_MODES}")
        if self.impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention impl={self.impl!r} must be one of {ATTENTION_IMPLS}")
        if self.ctx_sink_tokens < 0:
            raise ValueError(f"{self.ctx_sink_tokens=} must be >= 0")
        if self.ctx_local_tokens < 1:
            raise ValueError(f"{self.ctx_local_tokens=} must be >= 1")

    def layer_streaming(self, layer: int, num_kv_heads: int) -> tuple[bool, ...]:
        """Streaming flags of one layer's KV heads (all False in dense mode)."""
        if self.mode == "dense" or self.streaming_heads is None:
            return (False,) * num_kv_heads
        flags = self.streaming_heads[layer]
        if len(flags) != num_kv_heads:
            raise ValueError(
                f"layer {layer}: head pattern has {len(flags)} KV heads, model has {num_kv_heads}"
            )
        return tuple(bool(f) for f in flags)


def prefill_attention(q: jax.Array, k: jax.Array, v: jax.Array, seq_lens: jax.Array, *,
                      layer: int, config: AttentionConfig) -> jax.Array:
    """Causal self-attention over right-padded prompts.

    q [B, T, Hq, D]; k, v [B, T, Hkv, D]; seq_lens [B] -> [B, T, Hq, D].
    Dense heads see all earlier tokens; in LServe mode, streaming heads see the sink and the
    local window only (DESIGN §1.2). One kernel launch serves both kinds of head.
    """
    streaming = jnp.asarray(config.layer_streaming(layer, k.shape[2]), jnp.int32)
    return sparse_prefill_attention(
        q, k, v, streaming,
        sink_tokens=config.ctx_sink_tokens, local_tokens=config.ctx_local_tokens,
        seq_lens=seq_lens, impl=config.impl, interpret=config.interpret)


def decode_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, page_table: jax.Array,
                     lengths: jax.Array, *, layer: int, config: AttentionConfig) -> jax.Array:
    """Attention of one new query per sequence over its pages (dense; LServe decode comes with
    the paged decode kernel).

    q [B, Hq, D]; k_pool, v_pool [Hkv, P, S, D]; page_table [B, max_pages]; lengths [B]
    (tokens to attend, including the new one) -> [B, Hq, D].
    """
    del layer
    b, hq, d = q.shape
    hkv, _, page_size, _ = k_pool.shape
    # Gathered pages stay in the pool's head-major layout (no transpose copy on CPU).
    keys, values = k_pool[:, page_table], v_pool[:, page_table]  # [Hkv, B, n, S, D]
    qg = q.reshape(b, hkv, hq // hkv, d).transpose(1, 0, 2, 3)  # [Hkv, B, G, D]
    # [k,b,g,d] x [k,b,n,s,d] -> [k,b,g,n,s]
    scores = jnp.einsum("kbgd,kbnsd->kbgns", qg, keys, preferred_element_type=jnp.float32)
    scores = scores.reshape(*scores.shape[:3], -1) / math.sqrt(d)  # [Hkv, B, G, n * S]
    visible = jnp.arange(scores.shape[-1])[None, :] < lengths[:, None]  # [B, n * S]
    scores = jnp.where(visible[None, :, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).reshape(*scores.shape[:3], -1, page_size)
    # [k,b,g,n,s] x [k,b,n,s,d] -> [k,b,g,d]
    out = jnp.einsum("kbgns,kbnsd->kbgd", probs.astype(values.dtype), values,
                     preferred_element_type=jnp.float32)
    return out.transpose(1, 0, 2, 3).reshape(b, hq, d).astype(q.dtype)
