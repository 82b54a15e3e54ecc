"""Read a llama.cpp GGUF file: metadata -> `LlamaConfig`, tensors dequantized to float32.

Two llama.cpp conventions are undone here:
- ggml lists dimensions fastest-first (`ne`), the reverse of a NumPy shape: a `[out, in]` weight
  has `ne = [in, out]`. Its rows are still torch's `[out, in]` rows, so the table transposes.
- `attn_q`/`attn_k` rows are permuted per head for interleaved ("GPT-J style") RoPE
  (`convert_hf_to_gguf.py`, `LlamaModel.permute`): each head's rows, viewed `[2, head_dim/2]`,
  were transposed to `[head_dim/2, 2]`. We transpose them back, so our RoPE stays half-split.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf.quants import GGMLQuantizationType

from convert.gguf_tokenizer import write_gguf_tokenizer
from convert.mapping import ConversionError, Rule, transpose
from convert.source import Source
from models.config import LlamaConfig, RopeScaling, rope_inv_freq

# Every type gguf.quants can dequantize: F32/F16 natively, the rest through its quant classes.
SUPPORTED_TYPES = frozenset(
    {GGMLQuantizationType.F32, GGMLQuantizationType.F16} | set(gguf.quants._type_traits)
)


def _unpermute(x: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head Q/K row permutation. x: [num_heads*head_dim, in]."""
    rows, cols = x.shape
    if rows % (2 * num_heads):
        return x  # wrong shape: left for fill_params' shape check to report by name
    # x rows per head are [head_dim/2, 2]; transpose to [2, head_dim/2] (halves of RoPE pairs).
    return x.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _q_weight(x, config):
    return _unpermute(x, config.num_heads).T


def _k_weight(x, config):
    return _unpermute(x, config.num_kv_heads).T


# GGUF tensor name -> our parameter path (models/params.py), transform from ggml rows [out, in].
GGUF_TABLE: tuple[Rule, ...] = (
    Rule("token_embd.weight", "embed"),  # rows are tokens already: [V, H]
    Rule("blk.{i}.attn_norm.weight", "layers.{i}.attn_norm"),
    Rule("blk.{i}.attn_q.weight", "layers.{i}.wq", _q_weight),
    Rule("blk.{i}.attn_k.weight", "layers.{i}.wk", _k_weight),
    Rule("blk.{i}.attn_v.weight", "layers.{i}.wv", transpose),
    Rule("blk.{i}.attn_output.weight", "layers.{i}.wo", transpose),
    Rule("blk.{i}.ffn_norm.weight", "layers.{i}.mlp_norm"),
    Rule("blk.{i}.ffn_gate.weight", "layers.{i}.w_gate", transpose),
    Rule("blk.{i}.ffn_up.weight", "layers.{i}.w_up", transpose),
    Rule("blk.{i}.ffn_down.weight", "layers.{i}.w_down", transpose),
    Rule("output_norm.weight", "final_norm"),
    Rule("output.weight", "lm_head", transpose),  # absent when tied to token_embd
    Rule("rope_freqs.weight", None, mode="ignore",
         why="llama3 RoPE factors; checked against and folded into config.rope_scaling"),
)

# llama.<key> -> (LlamaConfig field, type, default or None when required).
GGUF_CONFIG_KEYS = (
    ("block_count", "num_layers", int, None),
    ("embedding_length", "hidden_size", int, None),
    ("feed_forward_length", "intermediate_size", int, None),
    ("attention.head_count", "num_heads", int, None),
    ("attention.head_count_kv", "num_kv_heads", int, "num_heads"),
    ("attention.layer_norm_rms_epsilon", "rms_norm_eps", float, None),
    ("rope.freq_base", "rope_theta", float, 10000.0),
    ("context_length", "max_position_embeddings", int, None),
    ("attention.key_length", "head_dim", int, "hidden_size/num_heads"),
)


def _value(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _as_float(v) -> float:
    """GGUF stores floats as f32: keep the shortest decimal that round-trips (1e-5, not 9.99e-6)."""
    return float(str(np.float32(v)))


def _rope_scaling(reader, arch: str, rope_freqs: np.ndarray | None, base: dict):
    """RopeScaling from `rope.scaling.*` keys, or recovered from a `rope_freqs` tensor (llama3)."""
    kind = _value(reader, f"{arch}.rope.scaling.type", "none")
    factor = _value(reader, f"{arch}.rope.scaling.factor")
    original = _value(reader, f"{arch}.rope.scaling.original_context_length")
    if kind == "linear":
        return RopeScaling(rope_type="linear", factor=_as_float(factor))
    if kind != "none":
        raise ConversionError(f"unsupported GGUF rope scaling type {kind!r}")
    if rope_freqs is None or np.all(rope_freqs == 1.0):
        return None
    # llama.cpp stores Llama-3.1's scaling only as per-frequency divisors; rebuild the llama3
    # parameters (default low/high freq factors) and insist they reproduce the tensor.
    scaling = RopeScaling(rope_type="llama3", factor=_as_float(rope_freqs.max()),
                          original_max_position_embeddings=int(original or 8192))
    plain = LlamaConfig(**base)
    scaled = LlamaConfig(**base, rope_scaling=scaling)
    ours = np.asarray(rope_inv_freq(plain)) / np.asarray(rope_inv_freq(scaled))
    if ours.shape != rope_freqs.shape or not np.allclose(ours, rope_freqs, rtol=1e-4):
        raise ConversionError("rope_freqs.weight does not match llama3 RoPE scaling with "
                              f"factor={scaling.factor}, low/high freq factors 1/4")
    return scaling


def _config(reader: gguf.GGUFReader, tensors: dict, load) -> LlamaConfig:
    arch = _value(reader, "general.architecture")
    if arch != "llama":
        raise ConversionError(f"GGUF architecture {arch!r} is not supported; expected 'llama'")
    c: dict = {}
    for key, field, typ, default in GGUF_CONFIG_KEYS:
        v = _value(reader, f"{arch}.{key}")
        if v is None and default is None:
            raise ConversionError(f"GGUF metadata lacks the required key '{arch}.{key}'")
        if isinstance(v, list):
            raise ConversionError(f"GGUF key '{arch}.{key}' varies per layer; not supported")
        if v is not None:
            c[field] = typ(v) if typ is int else _as_float(v)
    c.setdefault("num_kv_heads", c["num_heads"])
    c.setdefault("head_dim", c["hidden_size"] // c["num_heads"])
    rotary = _value(reader, f"{arch}.rope.dimension_count")
    if rotary is not None and int(rotary) != c["head_dim"]:
        raise ConversionError(f"partial RoPE ({rotary=} != head_dim={c['head_dim']}) unsupported")
    if "token_embd.weight" not in tensors:
        raise ConversionError("GGUF file has no 'token_embd.weight' tensor")
    c["vocab_size"] = int(tensors["token_embd.weight"].shape[1])  # ne = [H, V]
    declared = _value(reader, f"{arch}.vocab_size")
    if declared is not None and int(declared) != c["vocab_size"]:
        raise ConversionError(f"{arch}.vocab_size={declared} but token_embd.weight has "
                              f"{c['vocab_size']} rows")
    c["tie_word_embeddings"] = "output.weight" not in tensors
    c["bos_token_id"] = _value(reader, "tokenizer.ggml.bos_token_id")
    stops = [_value(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    c["eos_token_ids"] = tuple(dict.fromkeys(int(s) for s in stops if s is not None))
    freqs = load("rope_freqs.weight") if "rope_freqs.weight" in tensors else None
    try:
        c["rope_scaling"] = _rope_scaling(reader, arch, freqs, dict(c))
        return LlamaConfig(**c)
    except ConversionError:
        raise
    except ValueError as e:  # LlamaConfig's own validation (head counts, ...)
        raise ConversionError(f"GGUF metadata gives an invalid config: {e}") from None


def read_gguf(src: Path) -> Source:
    """Open a GGUF file: parse and validate metadata and tensor types now, dequantize on demand."""
    try:
        reader = gguf.GGUFReader(src)
    except (ValueError, OSError, IndexError, KeyError, TypeError) as e:
        raise ConversionError(f"cannot read GGUF file {src} (truncated or corrupt?): {e}") from None
    tensors = {t.name: t for t in reader.tensors}
    for t in reader.tensors:
        if t.tensor_type not in SUPPORTED_TYPES:
            raise ConversionError(f"GGUF tensor {t.name!r} has type {t.tensor_type.name}, which "
                                  "gguf.quants cannot dequantize")

    def load(name: str) -> np.ndarray:
        t = tensors[name]
        try:
            x = gguf.quants.dequantize(t.data, t.tensor_type)
            return x.reshape(tuple(int(d) for d in reversed(t.shape)))  # ne -> NumPy order
        except (ValueError, NotImplementedError) as e:
            raise ConversionError(f"cannot dequantize GGUF tensor {name!r} "
                                  f"({t.tensor_type.name}): {e}") from None

    config = _config(reader, tensors, load)
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return Source(kind="gguf", path=src, config=config, table=GGUF_TABLE,
                  tensor_names=sorted(tensors), load=load,
                  write_tokenizer=lambda out: write_gguf_tokenizer(reader, out),
                  info={"tensor_types": counts, "general.name": _value(reader, "general.name")})
