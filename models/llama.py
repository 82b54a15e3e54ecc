"""Functional Llama: pure forward passes over a params pytree and a paged KV cache.

Two entry points share the layer code (`layer_step`, one pure function per layer):

    prefill(params, cache, tokens [B, T], seq_lens [B], slots [B]) -> (cache, logits)
    decode(params, cache, tokens [B], slots [B], active [B])        -> (cache, logits [B, V])

Both write the new keys/values into the cache's pages and return the updated cache; nothing is
stored anywhere else. Layers are unrolled in Python (see models/params.py for why). A layer's
linear weights are float arrays or int8 `Int8Weight`s (models/weight_quant.py: `linear`); the
embedding and LM head are always float. Every entry point takes `shard`: under tensor
parallelism (models/parallel.py) it runs inside `shard_map` on one device's part of the
weights and cache, with `config` and `attention` that device's (`parallel.local_config`,
`parallel.local_attention`).
Einsum alphabet: see models/attention.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from models import kv_cache, parallel
from models.attention import AttentionConfig, LayerStep, attend_layer, check_cache_pages
from models.config import LlamaConfig, rope_inv_freq
from models.kv_cache import KVCache
from models.weight_quant import linear


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in f32, cast back before the weight (as HF Llama does)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def rope_cos_sin(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """positions [...] -> cos, sin [..., D] in f32 (half-split layout, frequencies repeated)."""
    inv_freq = jnp.asarray(np.array(rope_inv_freq(config), np.float32))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, D]; cos, sin [B, T, D] -> x rotated (HF's rotate_half convention)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x.astype(jnp.float32) * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def _mlp(layer: dict, x: jax.Array) -> jax.Array:
    gate = linear(x, layer["w_gate"])
    return linear(jax.nn.silu(gate) * linear(x, layer["w_up"]), layer["w_down"])


def _qkv(layer: dict, config: LlamaConfig, h: jax.Array, cos, sin):
    """h [B, T, E] -> q [B, T, Hq, D], k, v [B, T, Hkv, D] with RoPE applied to q and k."""
    b, t, _ = h.shape
    d = config.head_dim
    q = linear(h, layer["wq"]).reshape(b, t, config.num_heads, d)
    k = linear(h, layer["wk"]).reshape(b, t, config.num_kv_heads, d)
    v = linear(h, layer["wv"]).reshape(b, t, config.num_kv_heads, d)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _block(layer: dict, config: LlamaConfig, x: jax.Array, cos, sin, attend, state,
           shard: parallel.Shard | None = None):
    """The decoder block around an attention: (x [B, T, E], state) -> (x, state).

    `attend(state, q, k, v) -> (state, out [B, T, Hq, D])` is the only part that differs between
    a cached step (`layer_step`, state = the layer's cache) and calibration (`hidden_states`).
    Under tensor parallelism (`shard`, models/parallel.py) the layer's weights, heads and
    cache are this device's; wo and w_down give partial sums, all-reduced.
    """
    b, t, _ = x.shape
    h = rms_norm(x, layer["attn_norm"], config.rms_norm_eps)
    q, k, v = _qkv(layer, config, h, cos, sin)
    state, attn = attend(state, q, k, v)
    x = x + parallel.all_reduce(linear(attn.reshape(b, t, -1), layer["wo"]), shard)
    mlp = _mlp(layer, rms_norm(x, layer["mlp_norm"], config.rms_norm_eps))
    return x + parallel.all_reduce(mlp, shard), state


def layer_step(layer: dict, x: jax.Array, cache: KVCache, step: LayerStep, *,
               config: LlamaConfig, attention: AttentionConfig,
               shard: parallel.Shard | None = None) -> tuple[jax.Array, KVCache]:
    """One decoder layer of a cached forward step, pure: (layer params, x [B, T, E], the layer's
    cache, the step's inputs) -> (x, the layer's cache).

    `cache` is a one-layer view (`KVCache.layer_view`) and `attention` the layer's config
    (`AttentionConfig.for_layer`); the layer stores its keys and values and attends
    (`attend_layer`). Prefill, decode, the accuracy harness and the benchmarks all run layers
    through this function (or `run_layers`). With `shard` (models/parallel.py) it runs on
    one device's part of the layer (`config` and `attention` that device's).
    """
    return _block(layer, config, x, step.cos, step.sin,
                  lambda c, q, k, v: attend_layer(c, q, k, v, step, config=attention), cache,
                  shard)


def run_layers(params: dict, cache: KVCache, x: jax.Array, step: LayerStep, *,
               config: LlamaConfig, attention: AttentionConfig,
               shard: parallel.Shard | None = None) -> tuple[jax.Array, KVCache]:
    """Every layer's `layer_step` in order, each on its view of `cache`."""
    for i, layer in enumerate(params["layers"]):
        x, view = layer_step(layer, x, cache.layer_view(i), step, config=config,
                             attention=attention.for_layer(i, config.num_kv_heads), shard=shard)
        cache = cache.with_layer(i, view)
    return x, cache


def cache_spec(config: LlamaConfig, attention: AttentionConfig, *, num_pages: int,
               max_seqs: int, max_pages_per_seq: int, dtype: str = "float32",
               page_size: int | None = None, logical_page_size: int | None = None,
               kv_cache_dtype: str = "auto",
               kv_scales: tuple[tuple[float, float], ...] | None = None
               ) -> kv_cache.KVCacheSpec:
    """The cache this model needs under `attention`: pages of `attention.sparsity.page_size`
    tokens and, in LServe mode, the dense/streaming head split of the pattern, key statistics
    per `sparsity.logical_page_size` tokens and the page selector's state (LServe §4).

    `page_size` and `logical_page_size` may be given to state what the caller expects; they must
    then equal the config's (the page sizes have one source, the `SparsityConfig`).
    kv_cache_dtype "int8" stores the pools quantized with `kv_scales` (pallas_kernels/quant.py)."""
    s = attention.sparsity
    for name, value in (("page_size", page_size), ("logical_page_size", logical_page_size)):
        if value is not None and value != getattr(s, name):
            raise ValueError(f"cache {name}={value} != the attention config's sparsity.{name}="
                             f"{getattr(s, name)}; set it in the SparsityConfig instead")
    lserve = attention.mode == "lserve"
    streaming = attention.has_streaming
    per_query_head = lserve and s.page_selection == "query_head"
    return kv_cache.KVCacheSpec(
        num_layers=config.num_layers, num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim, num_pages=num_pages, page_size=s.page_size,
        max_seqs=max_seqs, max_pages_per_seq=max_pages_per_seq, dtype=dtype,
        logical_page_size=s.logical_page_size if lserve else None,
        streaming_heads=attention.streaming_heads if streaming else None,
        streaming_layout=s.streaming_layout if streaming else None,
        budget_pages=s.budget_pages if lserve else None,
        selection_lists_per_head=config.num_heads // config.num_kv_heads if per_query_head else 1,
        kv_cache_dtype=kv_cache_dtype, kv_scales=kv_scales)


def _logits(params: dict, config: LlamaConfig, x: jax.Array,
            shard: parallel.Shard | None = None) -> jax.Array:
    x = rms_norm(x, params["final_norm"], config.rms_norm_eps)
    w = params["embed"].T if config.tie_word_embeddings else params["lm_head"]
    logits = jnp.matmul(x, w, preferred_element_type=jnp.float32)
    return parallel.gather_vocab(logits, shard, config.vocab_size)


def prefill(params: dict, cache: KVCache, tokens: jax.Array, seq_lens: jax.Array,
            slots: jax.Array, *, config: LlamaConfig, attention: AttentionConfig,
            all_logits: bool = False, shard: parallel.Shard | None = None
            ) -> tuple[KVCache, jax.Array]:
    """Run whole prompts, store their keys/values in the slots' pages.

    tokens [B, T] right-padded; seq_lens [B] prompt lengths; slots [B] cache rows, whose pages
    must already be reserved for `seq_lens` tokens. Returns the cache with `seq_lens` set and
    logits [B, T, V] if `all_logits`, else the logits of each prompt's last token [B, V] (f32).
    """
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cos, sin = rope_cos_sin(config, positions)
    step = LayerStep(slots=slots, positions=positions, valid=positions < seq_lens[:, None],
                     lengths=seq_lens, cos=cos, sin=sin)
    x, cache = run_layers(params, cache, parallel.embed_tokens(params["embed"], tokens, shard),
                          step, config=config, attention=attention, shard=shard)
    if not all_logits:
        last = jnp.clip(seq_lens - 1, 0, t - 1)
        x = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]  # [B, E]
    cache = cache.replace(seq_lens=cache.seq_lens.at[slots].set(seq_lens),
                          decode_steps=cache.decode_steps.at[slots].set(0),
                          selected_num_pages=cache.selected_num_pages.at[slots].set(-1))
    return cache, _logits(params, config, x, shard)


def prefill_chunk(params: dict, cache: KVCache, tokens: jax.Array, starts: jax.Array,
                  chunk_lens: jax.Array, slots: jax.Array, *, config: LlamaConfig,
                  attention: AttentionConfig, fresh: bool = False,
                  shard: parallel.Shard | None = None) -> tuple[KVCache, jax.Array]:
    """Continue prompts by one chunk each: tokens [B, T] right-padded at positions starts [B]
    onwards, chunk_lens [B] real tokens (a row with 0 is left untouched). The slots' pages must
    be reserved for starts + chunk_lens tokens and hold the first `starts` tokens already; with
    streaming heads, the slots' prefill windows (`KVCache.window_table`) must map the columns
    the chunk reads (the sink and the last `ctx_local_tokens` before `starts`) and the columns
    it writes (it reads its own keys back from them). `fresh` (static) promises every row starts at 0: the
    chunk then attends within itself (`prefill_attention`, the sparse prefill kernel on a GPU).
    Returns the cache with seq_lens = starts + chunk_lens and the logits of each chunk's last
    token [B, V] (f32). Chunked prefill equals one-shot `prefill` (tests/test_chunked_prefill.py).
    """
    b, t = tokens.shape
    offsets = jnp.arange(t, dtype=jnp.int32)
    positions = starts[:, None] + offsets[None]
    lengths = starts + chunk_lens
    cos, sin = rope_cos_sin(config, positions)
    step = LayerStep(slots=slots, positions=positions, valid=offsets[None] < chunk_lens[:, None],
                     lengths=lengths, cos=cos, sin=sin, chunk=True, fresh=fresh)
    x, cache = run_layers(params, cache, parallel.embed_tokens(params["embed"], tokens, shard),
                          step, config=config, attention=attention, shard=shard)
    last = jnp.clip(chunk_lens - 1, 0, t - 1)
    x = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    moved = chunk_lens > 0
    cache = cache.replace(
        seq_lens=cache.seq_lens.at[slots].set(jnp.where(moved, lengths, cache.seq_lens[slots])),
        decode_steps=cache.decode_steps.at[slots].set(
            jnp.where(moved, 0, cache.decode_steps[slots])),
        selected_num_pages=cache.selected_num_pages.at[slots].set(
            jnp.where(moved, -1, cache.selected_num_pages[slots])))
    return cache, _logits(params, config, x, shard)


def decode(params: dict, cache: KVCache, tokens: jax.Array, slots: jax.Array, active: jax.Array,
           *, config: LlamaConfig, attention: AttentionConfig,
           entries: jax.Array | None = None, shard: parallel.Shard | None = None
           ) -> tuple[KVCache, jax.Array]:
    """One decode step: append each active slot's new token and return next-token logits.

    tokens, slots [B] int32; active [B] bool (inactive rows write to the null page and do not
    advance); entries: optional [E, 2] (row, page-table column) pairs covering every page a row
    attends to (`decode_attention`). Returns (cache, logits [B, V] f32).

    In LServe mode the dense heads' page selection is recomputed for a row when its clock
    `decode_steps` is a multiple of `selector_interval` or when it has started a new page since
    its last selection (so the newest page is always in the list), and reused otherwise.
    """
    positions = cache.seq_lens[slots][:, None]  # [B, 1]: the new token's position
    lengths = positions[:, 0] + 1
    cos, sin = rope_cos_sin(config, positions)
    check_cache_pages(cache, attention)
    num_pages = (lengths + cache.page_size - 1) // cache.page_size
    need = active & ((cache.decode_steps[slots] % attention.sparsity.selector_interval == 0)
                     | (num_pages != cache.selected_num_pages[slots]))
    layer_inputs = LayerStep(slots=slots, positions=positions, valid=active[:, None],
                             lengths=lengths, cos=cos, sin=sin, need=need, decode=True,
                             entries=entries)
    x = parallel.embed_tokens(params["embed"], tokens, shard)[:, None]
    x, cache = run_layers(params, cache, x, layer_inputs, config=config, attention=attention,
                          shard=shard)
    step = active.astype(jnp.int32)
    cache = cache.replace(
        seq_lens=cache.seq_lens.at[slots].add(step),
        decode_steps=cache.decode_steps.at[slots].add(step),
        selected_num_pages=cache.selected_num_pages.at[slots].set(
            jnp.where(need, num_pages, cache.selected_num_pages[slots])))
    return cache, _logits(params, config, x[:, 0], shard)


def hidden_states(params: dict, tokens: jax.Array, *, config: LlamaConfig, attend,
                  remat: bool = False) -> jax.Array:
    """Final hidden states (after the final norm) of a causal forward without a cache.

    tokens [B, T] -> [B, T, E]. `attend(layer, q, k, v) -> out [B, T, Hq, D]` is the attention
    of each layer (q, k with RoPE applied). Calibration (lserve_jax/calibrate.py) passes gated
    attention here; `remat` recomputes each layer in the backward pass instead of storing it.
    """
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cos, sin = rope_cos_sin(config, positions)
    x = params["embed"][tokens]
    for i, layer in enumerate(params["layers"]):
        def run(layer, x, i=i):
            x, _ = _block(layer, config, x, cos, sin,
                          lambda state, q, k, v: (state, attend(i, q, k, v)), None)
            return x

        x = (jax.checkpoint(run) if remat else run)(layer, x)
    return rms_norm(x, params["final_norm"], config.rms_norm_eps)


@functools.partial(jax.jit, static_argnames=("config", "attention"))
def forward(params: dict, tokens: jax.Array, *, config: LlamaConfig,
            attention: AttentionConfig = AttentionConfig()) -> jax.Array:
    """Logits of a full causal forward, without a persistent cache (tests, scoring).

    tokens [B, T] -> logits [B, T, V] f32.
    """
    b, t = tokens.shape
    dtype = params["embed"].dtype
    pages_per_seq = -(-t // attention.sparsity.page_size)
    spec = cache_spec(config, attention, num_pages=b * pages_per_seq + 1, max_seqs=b,
                      max_pages_per_seq=pages_per_seq, dtype=jnp.dtype(dtype).name)
    cache = kv_cache.init_cache(spec)
    for slot in range(b):
        cache, _ = kv_cache.reserve(cache, jnp.int32(slot), jnp.int32(t))
    seq_lens = jnp.full((b,), t, jnp.int32)
    _, logits = prefill(params, cache, tokens, seq_lens, jnp.arange(b, dtype=jnp.int32),
                        config=config, attention=attention, all_logits=True)
    return logits
