"""Read a llama.cpp GGUF file: metadata -> `LlamaConfig`, tensors dequantized to float32.

Two llama.cpp conventions are undone here:
- ggml lists dimensions fastest-first (`ne`), the reverse of a NumPy shape: a `[out, in]` weight
  has `ne = [in, out]`. Its rows are still torch's `[out, in]` rows, so the table transposes.
- `attn_q`/`attn_k` rows are permuted per head for interleaved ("GPT-J style") RoPE
  (`convert_hf_to_gguf.py`, `LlamaModel.permute`): each head's rows, viewed `[2, head_dim/2]`,
  were transposed to `[head_dim/2, 2]`. We transpose them back, so our RoPE stays half-split.

Everything is checked when the file is opened (`read_gguf`): the file structure (truncated,
corrupt and foreign files), the architecture (only "llama"), typed metadata, tensor types, each
tensor's dims against the parameter it fills, and the tokenizer metadata. Every error is a
`ConversionError` that names the file, and the tensor or metadata key at fault where there is one.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import gguf
import jax
import numpy as np
from gguf.quants import GGMLQuantizationType

from convert.gguf_tokenizer import metadata, prepare_gguf_tokenizer
from convert.mapping import (ConversionError, Rule, _expected_source, _match, param_path,
                             transpose)
from convert.source import Source
from models.config import LlamaConfig, RopeScaling, rope_inv_freq
from models.params import param_shapes

SUPPORTED_ARCHITECTURES = ("llama",)

# Every type gguf.quants can dequantize: F32/F16 natively, the rest through its quant classes.
SUPPORTED_TYPES = frozenset(
    {GGMLQuantizationType.F32, GGMLQuantizationType.F16} | set(gguf.quants._type_traits)
)


def _unpermute(x: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head Q/K row permutation. x: [num_heads*head_dim, in]."""
    if x.ndim != 2 or x.shape[0] % (2 * num_heads):
        return x  # wrong shape: left for the shape check to report by name
    rows, cols = x.shape
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


class _PastEnd(ValueError):
    """A read past the end of the file."""


class _StrictReader(gguf.GGUFReader):
    """gguf.GGUFReader that fails on the first read past the end of the file, and names the tensor
    whose info or data is bad.

    The stock reader returns short arrays for such reads, which surface later as unrelated NumPy
    errors or, for a numeric array whose length is garbage, as up to 2**64 empty reads (a hang
    whose memory grows without bound); and its tensor errors do not say which tensor.
    """

    def _get(self, offset, dtype, count=1, override_order=None):
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if end > len(self.data):
            raise _PastEnd(f"reading bytes {int(offset)}..{end} goes past the end of the file "
                           f"({len(self.data)} bytes)")
        return super()._get(offset, dtype, count, override_order)

    def _build_tensors(self, start_offs, fields):
        tensors, names = [], set()
        for field in fields:  # one at a time, so that an error can name its tensor
            if field.name in names:
                raise ValueError(f"tensor {field.name!r} appears twice")
            names.add(field.name)
            try:
                super()._build_tensors(start_offs, [field])
            except (ValueError, KeyError, IndexError) as e:
                raise ValueError(f"tensor {field.name!r}: {_reason(e)}") from e
            tensors += self.tensors
        self.tensors = tensors


def _reason(e: Exception) -> str:
    """An exception's message (a KeyError's str() would quote it)."""
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


@contextlib.contextmanager
def _about(src: Path):
    """Prefix every ConversionError raised inside with the file it is about."""
    try:
        yield
    except ConversionError as e:
        raise ConversionError(f"{src}: {e}") from e.__cause__


def _open(src: Path) -> gguf.GGUFReader:
    """Parse `src`; every way a file can be empty, foreign, truncated or corrupt is reported."""
    with open(src, "rb") as f:
        head = f.read(4)
    if not head:
        raise ConversionError("the file is empty (0 bytes), not a GGUF file")
    if len(head) < 4:
        raise ConversionError(f"truncated: the file has {len(head)} bytes, fewer than the "
                              "4-byte GGUF magic")
    if head != b"GGUF":
        raise ConversionError(f"not a GGUF file: it starts with {head!r}, not the magic b'GGUF'")
    try:
        return _StrictReader(src)
    except (ValueError, KeyError, IndexError, OverflowError, OSError) as e:  # how it fails
        raise ConversionError(f"truncated or corrupt GGUF file: {_reason(e)}") from e


def _as_float(v) -> float:
    """GGUF stores floats as f32: keep the shortest decimal that round-trips (1e-5, not 9.99e-6)."""
    return float(str(np.float32(v)))


def _rope_scaling(reader, arch: str, rope_freqs: np.ndarray | None, base: dict):
    """RopeScaling from `rope.scaling.*` keys, or recovered from a `rope_freqs` tensor (llama3)."""
    kind = metadata(reader, f"{arch}.rope.scaling.type", "str", "none")
    factor = metadata(reader, f"{arch}.rope.scaling.factor", "float")
    original = metadata(reader, f"{arch}.rope.scaling.original_context_length", "int")
    if kind == "linear":
        if factor is None:
            raise ConversionError(f"linear RoPE scaling without '{arch}.rope.scaling.factor'")
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
    arch = metadata(reader, "general.architecture", "str")
    supported = " or ".join(map(repr, SUPPORTED_ARCHITECTURES))
    if arch is None:
        raise ConversionError(f"GGUF metadata lacks 'general.architecture'; only {supported} "
                              "is supported")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(f"general.architecture is {arch!r}; only {supported} is supported")
    c: dict = {}
    for key, field, typ, default in GGUF_CONFIG_KEYS:
        name = f"{arch}.{key}"
        stored = reader.fields.get(name)
        if stored is not None and stored.types[0] == gguf.GGUFValueType.ARRAY:
            raise ConversionError(f"GGUF metadata key {name!r} varies per layer; not supported")
        v = metadata(reader, name, typ.__name__)
        if v is None and default is None:
            raise ConversionError(f"GGUF metadata lacks the required key {name!r}")
        if typ is int and v is not None and v <= 0:
            raise ConversionError(f"GGUF metadata key {name!r} is {v}; it must be positive")
        if v is not None:
            c[field] = v if typ is int else _as_float(v)
    c.setdefault("num_kv_heads", c["num_heads"])
    c.setdefault("head_dim", c["hidden_size"] // c["num_heads"])
    rotary = metadata(reader, f"{arch}.rope.dimension_count", "int")
    if rotary is not None and rotary != c["head_dim"]:
        raise ConversionError(f"partial RoPE ({rotary=} != head_dim={c['head_dim']}) unsupported")
    if "token_embd.weight" not in tensors:
        raise ConversionError("GGUF file has no 'token_embd.weight' tensor")
    embed_dims = [int(d) for d in tensors["token_embd.weight"].shape]
    if len(embed_dims) != 2:
        raise ConversionError(f"tensor 'token_embd.weight' has dims {embed_dims}; expected "
                              "[hidden_size, vocab_size] (ggml order)")
    c["vocab_size"] = embed_dims[1]  # ne = [H, V]
    declared = metadata(reader, f"{arch}.vocab_size", "int")
    if declared is not None and declared != c["vocab_size"]:
        raise ConversionError(f"{arch}.vocab_size={declared} but token_embd.weight has "
                              f"{c['vocab_size']} rows")
    c["tie_word_embeddings"] = "output.weight" not in tensors
    c["bos_token_id"] = metadata(reader, "tokenizer.ggml.bos_token_id", "int")
    stops = [metadata(reader, f"tokenizer.ggml.{k}_token_id", "int") for k in ("eos", "eot", "eom")]
    c["eos_token_ids"] = tuple(dict.fromkeys(s for s in stops if s is not None))
    freqs = load("rope_freqs.weight") if "rope_freqs.weight" in tensors else None
    try:
        c["rope_scaling"] = _rope_scaling(reader, arch, freqs, dict(c))
        return LlamaConfig(**c)
    except ConversionError:
        raise
    except ValueError as e:  # LlamaConfig's own validation (head counts, ...)
        raise ConversionError(f"GGUF metadata gives an invalid config: {e}") from None


def _check_tensors(tensors: dict, config: LlamaConfig) -> None:
    """The tensor inventory against the config, before any data is read: every tensor consumed by
    a rule and shaped as its parameter needs, every parameter filled once. (fill_params checks the
    same while converting, but without naming the file.)"""
    shapes = {param_path(p): s.shape
              for p, s in jax.tree.flatten_with_path(param_shapes(config))[0]}
    filled: dict[str, str] = {}
    for name, t in tensors.items():
        rule, target = _match(name, GGUF_TABLE, config)
        if rule.mode != "fill" or target not in shapes:
            continue  # rope_freqs is checked with the config; fill_params reports the rest
        if target in filled:
            raise ConversionError(f"tensors {filled[target]!r} and {name!r} both fill {target!r}")
        filled[target] = name
        dims = [int(d) for d in t.shape]  # ggml order, fastest first
        # The transform's view of a zero-stride stand-in: its shape, without touching the data.
        got = rule.transform(np.broadcast_to(np.zeros((), np.uint8), dims[::-1]), config).shape
        if got != shapes[target]:
            raise ConversionError(f"tensor {name!r} has dims {dims} (shape {got} after "
                                  f"conversion), but parameter {target!r} needs {shapes[target]}")
    missing = [p for p in shapes if p not in filled]
    if missing:
        raise ConversionError(
            f"parameter {missing[0]!r} has no tensor (expected "
            f"{_expected_source(missing[0], GGUF_TABLE)!r}); {len(missing)} parameter(s) missing")


def read_gguf(src: Path) -> Source:
    """Open a GGUF file: parse and validate everything now (see the module docstring), dequantize
    on demand. Raises ConversionError naming `src`."""
    with _about(src):
        reader = _open(src)
        tensors = {t.name: t for t in reader.tensors}
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        for t in reader.tensors:
            if t.tensor_type not in SUPPORTED_TYPES:
                raise ConversionError(f"tensor {t.name!r} has type {t.tensor_type.name}, which "
                                      f"gguf.quants cannot dequantize (supported: {supported})")

        def load(name: str) -> np.ndarray:
            t = tensors[name]
            try:
                x = gguf.quants.dequantize(t.data, t.tensor_type)
                return x.reshape(tuple(int(d) for d in reversed(t.shape)))  # ne -> NumPy order
            except (ValueError, NotImplementedError) as e:
                raise ConversionError(f"cannot dequantize tensor {name!r} "
                                      f"({t.tensor_type.name}): {e}") from None

        config = _config(reader, tensors, load)
        _check_tensors(tensors, config)
        write_tokenizer = prepare_gguf_tokenizer(reader)

    def load_named(name: str) -> np.ndarray:
        with _about(src):
            return load(name)

    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    name = reader.fields.get("general.name")
    return Source(kind="gguf", path=src, config=config, table=GGUF_TABLE,
                  tensor_names=sorted(tensors), load=load_named, write_tokenizer=write_tokenizer,
                  info={"tensor_types": counts,
                        "general.name": None if name is None else name.contents()})
