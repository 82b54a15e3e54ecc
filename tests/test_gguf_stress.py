"""GGUF stress tests: truncated, corrupt, foreign and inconsistent files must each fail with a
`ConversionError` naming the file (and the tensor or metadata key at fault, where there is one),
and leave neither the output directory nor a temporary sibling behind.

Bad files are made from one valid tiny GGUF (`write_gguf` from test_convert.py) by truncating it,
patching bytes in place (for what GGUFWriter refuses to write: duplicate names, unknown type ids),
or re-writing it with metadata keys or tensors changed (`rewrite`).
"""

import dataclasses
import re
import signal
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from test_convert import H, assert_clean, make_hf, write_gguf

from convert import ConversionError, convert

T = gguf.GGUFValueType


@dataclasses.dataclass(frozen=True)
class Valid:
    """The valid tiny GGUF and where its parts lie (byte offsets, from GGUFReader)."""

    path: Path
    data: bytes
    fields: dict[str, int]    # metadata key -> offset of its key/value record
    infos: dict[str, int]     # tensor name -> offset of its tensor-info record
    tensors: dict[str, tuple[int, int]]  # tensor name -> (data offset, data bytes)
    data_offset: int          # start of the tensor data section


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Valid:
    tmp = tmp_path_factory.mktemp("gguf")
    write_gguf(tmp / "m.gguf", make_hf(tmp / "hf", tie=True), tie=True)
    reader = gguf.GGUFReader(tmp / "m.gguf")
    data = (tmp / "m.gguf").read_bytes()
    last = max(t.data_offset + t.n_bytes for t in reader.tensors)
    assert last == len(data), "the last tensor should end the file (no trailing padding)"
    return Valid(tmp / "m.gguf", data, {k: f.offset for k, f in reader.fields.items()},
                 {t.name: t.field.offset for t in reader.tensors},
                 {t.name: (t.data_offset, t.n_bytes) for t in reader.tensors},
                 reader.data_offset)


def rewrite(src: Path, dst: Path, *, arch: str = "llama", drop=(), keys=None, tensors=None,
            add=None):
    """Copy GGUF `src` to `dst` with metadata `keys` ({key: (value, GGUFValueType[, sub_type])})
    set, keys in `drop` removed, `tensors` ({name: array, or None to drop}) replaced and `add`
    ({name: array}) appended."""
    keys, tensors = keys or {}, tensors or {}
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop or key in keys:
            continue
        sub = field.types[1] if field.types[0] == T.ARRAY else None
        w.add_key_value(key, field.contents(), field.types[0], sub)
    for key, (value, *types) in keys.items():
        w.add_key_value(key, value, *types)
    for t in reader.tensors:
        x = tensors.get(t.name, t.data)
        if x is not None:
            w.add_tensor(t.name, x, raw_dtype=t.tensor_type if x is t.data else None)
    for name, x in (add or {}).items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def patched(valid: Valid, offset: int, old: bytes, new: bytes) -> bytes:
    """The valid file with bytes `old` at `offset` replaced by `new` (same length)."""
    assert len(old) == len(new) and valid.data[offset:offset + len(old)] == old
    return valid.data[:offset] + new + valid.data[offset + len(old):]


def tensor_type_offset(valid: Valid, name: str) -> int:
    """Offset of the u32 ggml type id in tensor `name`'s info: name, n_dims, dims, then type."""
    at = valid.infos[name]
    n_dims = struct.unpack_from("<I", valid.data, at + 8 + len(name))[0]
    return at + 8 + len(name) + 4 + 8 * n_dims


def expect_failure(src: Path, out: Path, *patterns: str) -> str:
    """convert(src) raises ConversionError naming `src` and matching every regex in `patterns`,
    and leaves nothing behind; returns the message."""
    with pytest.raises(ConversionError) as e:
        convert(src, out, progress=False)
    message = str(e.value)
    assert str(src) in message, message
    for p in patterns:
        assert re.search(p, message), f"{p!r} not in: {message}"
    assert_clean(out)
    return message


# ---- truncation ------------------------------------------------------------------------------

PAST_END = r"truncated or corrupt.*past the end of the file"
# where to cut -> what the message must say besides the file. Tensor data lies in tensor-info
# order: token_embd.weight (Q8_0) first, ..., output_norm.weight (F32) last.
TRUNCATIONS = {
    "inside magic": (lambda v: 2, [r"truncated", r"2 bytes"]),
    "inside version": (lambda v: 6, [PAST_END]),
    "inside tensor/kv counts": (lambda v: 12, [PAST_END]),
    "inside first metadata key": (lambda v: v.fields["general.architecture"] + 10, [PAST_END]),
    "inside token list": (lambda v: v.fields["tokenizer.ggml.tokens"] + 200, [PAST_END]),
    "inside token types": (lambda v: v.fields["tokenizer.ggml.token_type"] + 60, [PAST_END]),
    "inside tensor info": (lambda v: v.infos["blk.0.attn_k.weight"] + 12, [PAST_END]),
    "before tensor data": (lambda v: v.data_offset, [PAST_END, r"'token_embd.weight'"]),
    "mid tensor data": (lambda v: v.tensors["blk.0.attn_q.weight"][0] + 500,
                        [PAST_END, r"'blk.0.attn_q.weight'"]),
    "one byte short": (lambda v: len(v.data) - 1, [PAST_END, r"'output_norm.weight'"]),
}


@pytest.mark.parametrize("where", TRUNCATIONS)
def test_truncated_file(valid, tmp_path, where):
    cut, patterns = TRUNCATIONS[where]
    src = tmp_path / "t.gguf"
    src.write_bytes(valid.data[:cut(valid)])
    expect_failure(src, tmp_path / "out", *patterns)


# ---- not GGUF at all, or garbage after the magic ----------------------------------------------

GARBAGE = np.random.RandomState(0).bytes(4096)
JUNK = {
    "zero bytes": (b"", [r"empty \(0 bytes\)"]),
    "zip with .gguf suffix": (b"PK\x03\x04" + GARBAGE[:100], [r"not a GGUF file", r"PK"]),
    "text with .gguf suffix": (b'{"model_type": "llama"}\n', [r"not a GGUF file"]),
    "magic then garbage": (b"GGUF" + GARBAGE, [r"corrupt"]),
    # version 3 and counts of 2**63: the first metadata key's length is garbage too
    "huge counts": (b"GGUF" + struct.pack("<IQQ", 3, 2**63, 2**63) + GARBAGE, [PAST_END]),
    # one u8 array of 2**62 elements and 16 bytes of them: the stock reader would read short
    # (empty) elements past the end 2**62 times instead of failing
    "endless array": (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"a"
                      + struct.pack("<IIQ", T.ARRAY, T.UINT8, 2**62) + bytes(16),
                      [PAST_END]),
}


class _Hung(Exception):
    """Raised by the alarm in test_not_gguf_or_garbage: the reader did not return in time."""


@pytest.mark.parametrize("what", JUNK)
def test_not_gguf_or_garbage(tmp_path, what):
    content, patterns = JUNK[what]
    src = tmp_path / "junk.gguf"
    src.write_bytes(content)

    def hung(*_):
        raise _Hung(f"reading {what!r} did not finish in 5 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(5)
    try:
        expect_failure(src, tmp_path / "out", *patterns)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---- byte patches: what GGUFWriter refuses to write -------------------------------------------

def _duplicate_tensor(v):
    at = v.infos["blk.0.attn_q.weight"] + 8
    return patched(v, at, b"blk.0.attn_q", b"blk.1.attn_q")


def _duplicate_key(v):
    at = v.fields["tokenizer.ggml.eos_token_id"] + 8
    return patched(v, at, b"tokenizer.ggml.eos", b"tokenizer.ggml.bos")


def _type_id(v, new):
    at = tensor_type_offset(v, "blk.1.attn_v.weight")
    return patched(v, at, struct.pack("<I", gguf.GGMLQuantizationType.Q8_0),
                   struct.pack("<I", new))


def _no_architecture(v):
    at = v.fields["general.architecture"] + 8
    return patched(v, at, b"general.architecture", b"general.architectur_")


PATCHES = {
    "duplicate tensor name": (_duplicate_tensor, [r"'blk.1.attn_q.weight'", r"twice|duplicate"]),
    "duplicate metadata key": (_duplicate_key, [r"tokenizer.ggml.bos_token_id", r"(?i)duplicate"]),
    "garbage type id": (lambda v: _type_id(v, 0xDEAD),
                        [r"'blk.1.attn_v.weight'", r"57005|0xdead"]),
    "type Q8_1 in place of Q8_0": (lambda v: _type_id(v, gguf.GGMLQuantizationType.Q8_1),
                                   [r"'blk.1.attn_v.weight'", r"Q8_1", r"supported: .*Q8_0"]),
    "no general.architecture": (_no_architecture, [r"general.architecture", r"'llama'"]),
}


@pytest.mark.parametrize("what", PATCHES)
def test_patched_file(valid, tmp_path, what):
    patch, patterns = PATCHES[what]
    src = tmp_path / "p.gguf"
    src.write_bytes(patch(valid))
    expect_failure(src, tmp_path / "out", *patterns)


# ---- re-written files: foreign architectures, bad metadata, bad tensors -----------------------

def key(name: str, value, *types) -> dict:
    """`rewrite` edits that set metadata key `name` to `value` of GGUF type(s) `types`."""
    return dict(keys={name: (value, *types)})


def tensor(name: str, x) -> dict:
    """`rewrite` edits that replace tensor `name` by `x` (None: drop it)."""
    return dict(tensors={name: x})


HEADS, EPS = "llama.attention.head_count", "llama.attention.layer_norm_rms_epsilon"
F32 = np.float32
REWRITES = {
    "architecture gpt2": (dict(arch="gpt2"), [r"'gpt2'", r"only 'llama'"]),
    "architecture qwen2": (dict(arch="qwen2"), [r"'qwen2'", r"only 'llama'"]),
    "no block_count": (dict(drop=["llama.block_count"]), [r"'llama.block_count'", r"lacks"]),
    "no embedding_length": (dict(drop=["llama.embedding_length"]),
                            [r"'llama.embedding_length'", r"lacks"]),
    "no head_count": (dict(drop=[HEADS]), [rf"'{HEADS}'", r"lacks"]),
    "no rms epsilon": (dict(drop=[EPS]), [rf"'{EPS}'", r"lacks"]),
    "block_count a string": (key("llama.block_count", "2", T.STRING),
                             [r"'llama.block_count'", r"STRING", r"integer"]),
    "block_count a float": (key("llama.block_count", 2.0, T.FLOAT32),
                            [r"'llama.block_count'", r"FLOAT32", r"integer"]),
    "head_count zero": (key(HEADS, 0, T.UINT32), [rf"'{HEADS}'", r"positive"]),
    "head_count negative": (key(HEADS, -4, T.INT32), [rf"'{HEADS}'", r"positive"]),
    "head_count per layer": (key(HEADS, [4, 4], T.ARRAY, T.UINT32),
                             [rf"'{HEADS}'", r"per layer"]),
    "rms epsilon a string": (key(EPS, "1e-6", T.STRING), [rf"'{EPS}'", r"STRING", r"float"]),
    "architecture an int": (key("general.architecture", 7, T.UINT32),
                            [r"'general.architecture'", r"UINT32", r"string"]),
    "bos id a string": (key("tokenizer.ggml.bos_token_id", "1", T.STRING),
                        [r"'tokenizer.ggml.bos_token_id'", r"STRING", r"integer"]),
    "no token list": (dict(drop=["tokenizer.ggml.tokens"]), [r"'tokenizer.ggml.tokens'"]),
    "token list of ints": (key("tokenizer.ggml.tokens", [1, 2], T.ARRAY, T.INT32),
                           [r"'tokenizer.ggml.tokens'", r"INT32", r"strings"]),
    "token types too short": (key("tokenizer.ggml.token_type", [1, 1], T.ARRAY, T.INT32),
                              [r"'tokenizer.ggml.token_type'", r"2 .*64 tokens"]),
    "block_count 3, 2 layers of tensors": (key("llama.block_count", 3, T.UINT32),
                                           [r"'layers.2.attn_norm'", r"'blk.2.attn_norm.weight'"]),
    "block_count 1, 2 layers of tensors": (key("llama.block_count", 1, T.UINT32),
                                           [r"'blk.1.\w+.weight'", r"layer 1"]),
    "attn_k rows wrong": (tensor("blk.1.attn_k.weight", np.ones((5, H), F32)),
                          [r"'blk.1.attn_k.weight'", r"\[32, 5\]", r"'layers.1.wk'",
                           r"\(32, 16\)"]),
    "norm too long": (tensor("blk.0.ffn_norm.weight", np.ones(H + 1, F32)),
                      [r"'blk.0.ffn_norm.weight'", r"\[33\]", r"'layers.0.mlp_norm'"]),
    "embedding 3-D": (tensor("token_embd.weight", np.ones((2, 64, H), F32)),
                      [r"'token_embd.weight'", r"\[32, 64, 2\]"]),
    "embedding 1-D": (tensor("token_embd.weight", np.ones(64 * H, F32)),
                      [r"'token_embd.weight'", r"\[2048\]"]),
    "missing tensor": (tensor("blk.1.ffn_up.weight", None),
                       [r"'layers.1.w_up'", r"'blk.1.ffn_up.weight'"]),
    "two tensors, one parameter": (dict(add={"blk.01.attn_v.weight": np.ones((16, H), F32)}),
                                   [r"'blk.1.attn_v.weight' and 'blk.01.attn_v.weight' both fill"
                                    r" 'layers.1.wv'"]),
    "unknown tensor": (dict(add={"blk.0.attn_q_norm.weight": np.ones(8, F32)}),
                       [r"unknown source tensor 'blk.0.attn_q_norm.weight'"]),
    "tensor of type I32": (tensor("blk.0.attn_norm.weight", np.ones(H, np.int32)),
                           [r"'blk.0.attn_norm.weight'", r"I32", r"supported: .*Q8_0"]),
}


@pytest.mark.parametrize("what", REWRITES)
def test_rewritten_file(valid, tmp_path, what):
    edits, patterns = REWRITES[what]
    src = tmp_path / "r.gguf"
    rewrite(valid.path, src, **edits)
    expect_failure(src, tmp_path / "out", *patterns)


def test_rewrite_helper_round_trips(valid, tmp_path):
    """The unchanged re-write converts: each failure above comes from its one edit."""
    rewrite(valid.path, tmp_path / "same.gguf")
    out = convert(tmp_path / "same.gguf", tmp_path / "out", progress=False)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
