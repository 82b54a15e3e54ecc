"""Static scales of a quantized KV cache: calibrated once per checkpoint, stored beside it.

`kv_cache_dtype="int8"` quantizes every layer's keys (after RoPE) and values with static
symmetric scales, one per KV head and channel (LServe §5 and QServe use one per tensor; keys
have outlier channels, and per channel their error is about 3x lower on SmolLM2). The scales
come from a short calibration pass: a causal forward over the shipped book text
(lserve_jax/data/), per layer, head and channel the keys' bound at any position (the norm of
the channel's rotary pair, `rotary_pair_norm`: RoPE turns the pair with the position, so one
channel's own largest |k| over 1,024 tokens clipped 0.1-1.3% of the keys at positions past
1,024 on SmolLM2, and 0.005% or less with the pair norm) and the largest |v|, times a margin
for prompts that reach further (values beyond it are clipped, never wrapped:
pallas_kernels/quant.py). They also serve `kv_cache_dtype="int4"` as per-channel smoothing
factors (models/kv_cache.py: a token is divided by them before its per-token quantization, so
outlier channels do not set its range). They are written to `kv_scales.json` in the
converted checkpoint directory and read from there by later runs; a user may also give them
(`Engine(kv_scales=...)`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from models import llama
from pallas_kernels import quant
from models.config import LlamaConfig

log = logging.getLogger("lserve_jax")

SCALES_FILE = "kv_scales.json"
CALIBRATION_TOKENS = 1024
MARGIN = 1.25  # headroom over the calibration text's largest |k| and |v|
# What the stored scales are per (a file of another kind is calibrated again): keys per rotary
# pair of channels, values per channel, each per KV head.
GRANULARITY = "kv_head_rotary_pair"


def _causal_attention(q, k, v):
    b, t, hq, d = q.shape
    g = hq // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) / np.sqrt(d)
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1),
                      v.astype(jnp.float32)).astype(q.dtype)


def rotary_pair_norm(k: jax.Array) -> jax.Array:
    """k [..., D] after RoPE -> [..., D]: each channel's magnitude bound at any position,
    sqrt(k_i^2 + k_(i+D/2)^2) for both channels of a rotary pair (i, i + D/2).

    RoPE turns each pair by an angle that grows with the position, so one channel's largest
    |k| over a short calibration text (where the slow pairs have barely turned) is no bound
    for later positions, while the pair's norm does not change with the angle."""
    half = k.shape[-1] // 2
    k = k.astype(jnp.float32)
    norm = jnp.sqrt(k[..., :half] ** 2 + k[..., half:] ** 2)
    return jnp.concatenate([norm, norm], axis=-1)


def kv_absmax(params: dict, config: LlamaConfig, tokens: np.ndarray) -> np.ndarray:
    """[layers, 2, Hkv, D] per layer, KV head and channel over `tokens` [B, T]: the keys' bound
    at any position (`rotary_pair_norm` after RoPE) and the largest |v|."""
    @jax.jit
    def run(params, tokens):
        found = []

        def attend(layer, q, k, v):
            found.append(jnp.stack([jnp.max(rotary_pair_norm(k), axis=(0, 1)),
                                    jnp.max(jnp.abs(v), axis=(0, 1))]).astype(jnp.float32))
            return _causal_attention(q, k, v)

        llama.hidden_states(params, tokens, config=config, attend=attend)
        return jnp.stack(found)

    return np.asarray(run(params, jnp.asarray(tokens, jnp.int32)))


def calibrate_kv_scales(params: dict, config: LlamaConfig, tokens: np.ndarray, *,
                        margin: float = MARGIN) -> tuple:
    """Per layer (k scales, v scales), each [Hkv][D]: margin * absmax / 127 per head and
    channel over the calibration tokens."""
    absmax = np.asarray(quant.int8_scale(kv_absmax(params, config, tokens) * margin))
    return tuple((tuple(map(tuple, k.tolist())), tuple(map(tuple, v.tolist())))
                 for k, v in absmax)


def check_kv_scales(scales, config: LlamaConfig) -> tuple:
    """User or stored scales: per layer a (k, v) pair, each a number or [Hkv][D] numbers,
    finite and positive; returned as nested tuples [layers][2][Hkv][D]."""
    try:
        pairs = [tuple(pair) for pair in scales]
    except TypeError:
        raise TypeError("kv_scales must be a list of (k_scale, v_scale) pairs") from None
    if len(pairs) != config.num_layers or any(len(p) != 2 for p in pairs):
        raise ValueError(f"kv_scales needs one (k_scale, v_scale) pair per layer "
                         f"({config.num_layers}), got {len(pairs)} entries")
    return tuple(tuple(quant.check_scales(f"kv_scales[{i}] {kind}", x, config.num_kv_heads,
                                          config.head_dim) for kind, x in zip("kv", pair))
                 for i, pair in enumerate(pairs))


def load_or_calibrate(checkpoint_dir: Path | None, params: dict, config: LlamaConfig,
                      tokenizer) -> tuple[tuple[float, float], ...]:
    """The checkpoint's stored scales, else calibrated on the book text (and stored when the
    directory is writable)."""
    path = Path(checkpoint_dir) / SCALES_FILE if checkpoint_dir is not None else None
    if path is not None and path.is_file():
        data = json.loads(path.read_text())
        if data.get("granularity") == GRANULARITY:  # else an older format: calibrate again
            return check_kv_scales(data["scales"], config)
    tokens = calibration_tokens(tokenizer, config)
    scales = calibrate_kv_scales(params, config, tokens)
    log.info("calibrated KV scales on %d tokens of the book text", tokens.size)
    if path is not None:
        try:
            path.write_text(json.dumps({"granularity": GRANULARITY, "scales": scales,
                                        "tokens": int(tokens.size), "margin": MARGIN}))
        except OSError as e:
            log.warning("could not store the KV scales in %s (%s); they are calibrated again "
                        "next time", path, e)
    return scales


def calibration_tokens(tokenizer, config: LlamaConfig) -> np.ndarray:
    """[1, T] tokens of the shipped book text (token ids in the vocabulary when there is no
    tokenizer)."""
    n = min(CALIBRATION_TOKENS, config.max_position_embeddings)
    if tokenizer is None:
        rng = np.random.default_rng(0)
        return rng.integers(0, config.vocab_size, (1, n)).astype(np.int32)
    from lserve_jax import corpus

    ids = corpus.book_ids(tokenizer, corpus.book_names()[0])[:n]
    return np.asarray(ids, np.int32)[None] % config.vocab_size
