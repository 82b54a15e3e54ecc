"""Static scales of an int8 KV cache: calibrated once per checkpoint, stored beside it.

`kv_cache_dtype="int8"` quantizes every layer's keys (after RoPE) and values with one symmetric
scale each (LServe §5; QServe's checkpoints carry the same per-tensor KV scales). The scales
come from a short calibration pass: a causal forward over the shipped book text
(lserve_jax/data/), the largest |k| and |v| of each layer over its tokens, times a margin for
prompts that reach further (values beyond it are clipped, never wrapped: models/quant.py). They
are written to `kv_scales.json` in the converted checkpoint directory and read from there by
later runs; a user may also give them (`Engine(kv_scales=...)`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from models import llama, quant
from models.config import LlamaConfig

log = logging.getLogger("lserve_jax")

SCALES_FILE = "kv_scales.json"
CALIBRATION_TOKENS = 1024
MARGIN = 1.25  # headroom over the calibration text's largest |k| and |v|


def _causal_attention(q, k, v):
    b, t, hq, d = q.shape
    g = hq // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) / np.sqrt(d)
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1),
                      v.astype(jnp.float32)).astype(q.dtype)


def kv_absmax(params: dict, config: LlamaConfig, tokens: np.ndarray) -> np.ndarray:
    """[layers, 2] the largest |k| (after RoPE) and |v| of each layer over `tokens` [B, T]."""
    @jax.jit
    def run(params, tokens):
        found = []

        def attend(layer, q, k, v):
            found.append(jnp.stack([jnp.max(jnp.abs(k)), jnp.max(jnp.abs(v))]).astype(jnp.float32))
            return _causal_attention(q, k, v)

        llama.hidden_states(params, tokens, config=config, attend=attend)
        return jnp.stack(found)

    return np.asarray(run(params, jnp.asarray(tokens, jnp.int32)))


def calibrate_kv_scales(params: dict, config: LlamaConfig, tokens: np.ndarray, *,
                        margin: float = MARGIN) -> tuple[tuple[float, float], ...]:
    """Per layer (k_scale, v_scale): margin * absmax / 127 over the calibration tokens."""
    absmax = kv_absmax(params, config, tokens) * margin
    return tuple((float(quant.int8_scale(k)), float(quant.int8_scale(v))) for k, v in absmax)


def check_kv_scales(scales, num_layers: int) -> tuple[tuple[float, float], ...]:
    """User or stored scales: one (k, v) pair of finite positive numbers per layer."""
    try:
        pairs = [tuple(pair) for pair in scales]
    except TypeError:
        raise TypeError("kv_scales must be a list of (k_scale, v_scale) pairs") from None
    if len(pairs) != num_layers or any(len(p) != 2 for p in pairs):
        raise ValueError(f"kv_scales needs one (k_scale, v_scale) pair per layer "
                         f"({num_layers}), got {len(pairs)} entries")
    return tuple((quant.check_scale(f"kv_scales[{i}] k", k),
                  quant.check_scale(f"kv_scales[{i}] v", v)) for i, (k, v) in enumerate(pairs))


def load_or_calibrate(checkpoint_dir: Path | None, params: dict, config: LlamaConfig,
                      tokenizer) -> tuple[tuple[float, float], ...]:
    """The checkpoint's stored scales, else calibrated on the book text (and stored when the
    directory is writable)."""
    path = Path(checkpoint_dir) / SCALES_FILE if checkpoint_dir is not None else None
    if path is not None and path.is_file():
        data = json.loads(path.read_text())
        return check_kv_scales(data["scales"], config.num_layers)
    tokens = calibration_tokens(tokenizer, config)
    scales = calibrate_kv_scales(params, config, tokens)
    log.info("calibrated int8 KV scales on %d tokens of the book text", tokens.size)
    if path is not None:
        try:
            path.write_text(json.dumps({"scales": scales, "tokens": int(tokens.size),
                                        "margin": MARGIN}, indent=1))
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
