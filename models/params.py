"""The Llama parameter pytree: its layout, shapes, and random initialisation.

Layout (weights stored `[in, out]` so that `x @ w` needs no transpose)::

    {"embed": [V, H],
     "layers": [  # one dict per layer, num_layers entries
        {"attn_norm": [H], "wq": [H, Hq*D], "wk": [H, Hkv*D], "wv": [H, Hkv*D],
         "wo": [Hq*D, H], "mlp_norm": [H], "w_gate": [H, I], "w_up": [H, I], "w_down": [I, H]}],
     "final_norm": [H],
     "lm_head": [H, V]}  # absent when tie_word_embeddings (logits use embed.T)

Layers are a Python list, not a stacked array: the LServe head split gives every layer its own
number of dense/streaming KV heads, so per-layer state has per-layer shapes (README,
"Layers unrolled in Python").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.config import LlamaConfig

LAYER_KEYS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")


def param_shapes(config: LlamaConfig, dtype=jnp.float32) -> dict:
    """The parameter pytree as `jax.ShapeDtypeStruct`s (no memory allocated)."""
    c = config
    H, D, I = c.hidden_size, c.head_dim, c.intermediate_size

    def s(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))

    layer = {
        "attn_norm": s(H),
        "wq": s(H, c.num_heads * D),
        "wk": s(H, c.num_kv_heads * D),
        "wv": s(H, c.num_kv_heads * D),
        "wo": s(c.num_heads * D, H),
        "mlp_norm": s(H),
        "w_gate": s(H, I),
        "w_up": s(H, I),
        "w_down": s(I, H),
    }
    params = {
        "embed": s(c.vocab_size, H),
        "layers": [dict(layer) for _ in range(c.num_layers)],
        "final_norm": s(H),
    }
    if not c.tie_word_embeddings:
        params["lm_head"] = s(H, c.vocab_size)
    return params


def init_params(config: LlamaConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> dict:
    """Random parameters (tests and benchmarks): normal(0, scale) weights, unit norms."""
    shapes = param_shapes(config, dtype)
    leaves, treedef = jax.tree.flatten_with_path(shapes)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, sd), k in zip(leaves, keys):
        name = getattr(path[-1], "key", None)
        if name in ("attn_norm", "mlp_norm", "final_norm"):
            out.append(jnp.ones(sd.shape, sd.dtype))
        else:
            out.append((scale * jax.random.normal(k, sd.shape, jnp.float32)).astype(sd.dtype))
    return jax.tree.unflatten(treedef, out)
