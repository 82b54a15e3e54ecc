"""Real model sizes traced with `jax.eval_shape` (no memory), and reduced precision end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import AttentionConfig, KVCacheSpec, LlamaConfig, init_params, kv_cache, llama, param_shapes

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0)
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                 bos_token_id=128000, eos_token_id=128001)
LLAMA31_8B = dict(LLAMA3_8B, max_position_embeddings=131072, eos_token_id=[128001, 128008, 128009],
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                    high_freq_factor=4.0, original_max_position_embeddings=8192))
# transformers 5 keeps rope_theta inside rope_parameters.
LLAMA31_8B_TF5 = {k: v for k, v in LLAMA31_8B.items() if k not in ("rope_theta", "rope_scaling")}
LLAMA31_8B_TF5["rope_parameters"] = dict(LLAMA31_8B["rope_scaling"], rope_theta=500000.0)

SIZES = {"llama-2-7b": (LLAMA2_7B, 6_738_415_616), "llama-3-8b": (LLAMA3_8B, 8_030_261_248),
         "llama-3.1-8b": (LLAMA31_8B, 8_030_261_248),
         "llama-3.1-8b-transformers5": (LLAMA31_8B_TF5, 8_030_261_248)}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_real_sizes_trace(name):
    hf, num_params = SIZES[name]
    config = LlamaConfig.from_hf_dict(hf)
    shapes = param_shapes(config, jnp.bfloat16)
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) == num_params
    b, t, page_size = 2, 256, 64
    pages = t // page_size + 1
    spec = KVCacheSpec(num_layers=config.num_layers, num_kv_heads=config.num_kv_heads,
                       head_dim=config.head_dim, num_pages=b * pages + 1, page_size=page_size,
                       max_seqs=b, max_pages_per_seq=pages, dtype="bfloat16")
    cache = jax.eval_shape(lambda: kv_cache.init_cache(spec))
    tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)
    vec = jax.ShapeDtypeStruct((b,), jnp.int32)
    attention = AttentionConfig()
    cache, logits = jax.eval_shape(
        lambda p, c, x, n, s: llama.prefill(p, c, x, n, s, config=config, attention=attention),
        shapes, cache, tokens, vec, vec)
    assert logits.shape == (b, config.vocab_size) and logits.dtype == jnp.float32
    assert cache.k[0].shape == (config.num_kv_heads, b * pages + 1, page_size, 128)
    cache, logits = jax.eval_shape(
        lambda p, c, x, s, a: llama.decode(p, c, x, s, a, config=config, attention=attention),
        shapes, cache, vec, vec, jax.ShapeDtypeStruct((b,), jnp.bool_))
    assert logits.shape == (b, config.vocab_size)
    if "3.1" in name:
        assert config.rope_scaling.rope_type == "llama3" and config.rope_theta == 500000.0
        assert config.eos_token_ids == (128001, 128008, 128009)


@pytest.mark.parametrize("dtype, tol", [(jnp.bfloat16, 0.1), (jnp.float16, 0.02)])
def test_reduced_precision_close_to_f32(dtype, tol):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8)
    params = init_params(config, jax.random.key(0), scale=0.2)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 24)))
    ref = np.asarray(llama.forward(params, tokens, config=config))
    low = jax.tree.map(lambda x: x.astype(dtype), params)
    got = llama.forward(low, tokens, config=config)
    assert got.dtype == jnp.float32  # logits are always f32
    err = np.abs(np.asarray(got) - ref).max() / np.abs(ref).max()
    assert np.isfinite(np.asarray(got)).all() and err < tol, err
