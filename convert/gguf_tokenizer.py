"""Rebuild an HF-compatible `tokenizer.json` + `tokenizer_config.json` from GGUF metadata.

A GGUF carries no tokenizer.json, only llama.cpp's `tokenizer.ggml.*` keys. For byte-level BPE
(`tokenizer.ggml.model == "gpt2"`, SmolLM2, Llama-3, Qwen2) we reproduce what transformers builds
(`transformers/integrations/gguf/gguf_tokenizer_mapping.py`: `byte_level_tokenizer`,
`add_gguf_special_tokens`, `set_split_regex`) with the `tokenizers` library directly:

- BPE over the vocabulary, tokens respelled into GPT-2's byte alphabet when the file spells them
  as raw text, merges as stored;
- pre-tokenizer: ByteLevel with GPT-2's regex, or a Split regex for the `tokenizer.ggml.pre`
  families whose merges were learned with another split (llama3, qwen2), then ByteLevel;
- CONTROL tokens (token_type 3) as special AddedTokens, USER_DEFINED (4) as plain AddedTokens,
  so `<|im_start|>` is never cut into pieces; ByteLevel decoder;
- BOS/EOS added by a post-processor only when `tokenizer.ggml.add_bos_token`/`add_eos_token` say so.

The tokenizer is built when the file is opened (`prepare_gguf_tokenizer`), so bad tokenizer
metadata fails before any weight is converted. `metadata` reads a key with its GGUF type checked;
gguf_file.py uses it too.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from convert.mapping import ConversionError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> split regex; None = ByteLevel's built-in GPT-2 regex.
PRE_TOKENIZER_SPLITS: dict[str, str | None] = {
    **dict.fromkeys(("default", "gpt-2", "gpt2", "smollm", "starcoder", "refact", "codeshell",
                     "jais", "phi-2", "exaone", "minerva-7b"), None),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"),
                    _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


_INTS = frozenset({gguf.GGUFValueType.UINT8, gguf.GGUFValueType.INT8, gguf.GGUFValueType.UINT16,
                   gguf.GGUFValueType.INT16, gguf.GGUFValueType.UINT32, gguf.GGUFValueType.INT32,
                   gguf.GGUFValueType.UINT64, gguf.GGUFValueType.INT64})
_FLOATS = frozenset({gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64})
# kind -> (GGUF value types accepted, its name in errors, the plural for arrays of it)
_KINDS = {
    "int": (_INTS, "an integer", "integers"),
    "float": (_INTS | _FLOATS, "a float", "floats"),
    "str": (frozenset({gguf.GGUFValueType.STRING}), "a string", "strings"),
    "bool": (frozenset({gguf.GGUFValueType.BOOL}), "a bool", "bools"),
}


def metadata(reader: gguf.GGUFReader, key: str, kind: str, default=None):
    """The value of metadata `key`, `default` when absent; kind: "int", "float", "str", "bool",
    or "list[<kind>]" for an array of those.

    GGUF values are typed; one of another type (a string where a count belongs) means a broken
    or foreign file, so it raises ConversionError naming the key instead of being coerced.
    """
    field = reader.fields.get(key)
    if field is None:
        return default
    types = field.types
    if kind.startswith("list["):
        accepted, _, plural = _KINDS[kind[5:-1]]
        # An empty array records no element type.
        ok = types[0] == gguf.GGUFValueType.ARRAY and (len(types) == 1 or types[1] in accepted)
        what = f"an array of {plural}"
    else:
        accepted, what, _ = _KINDS[kind]
        ok = types[0] in accepted
    if not ok:
        got = types[0].name
        if types[0] == gguf.GGUFValueType.ARRAY:
            got = f"an ARRAY of {types[1].name}" if len(types) > 1 else "an empty ARRAY"
        raise ConversionError(f"GGUF metadata key {key!r} is {got}, but should be {what}")
    value = field.contents()
    return float(value) if kind == "float" else value


def build_byte_level_bpe(tokens: list[str], merges: list[str], token_types: list[int],
                         pre: str | None, specials: list[str]) -> Tokenizer:
    """The `tokenizers.Tokenizer` a GGUF byte-level BPE vocabulary describes (no post-processor)."""
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    pairs = [tuple(m.split(" ")) for m in merges]
    tok = Tokenizer(BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False))
    if pre not in PRE_TOKENIZER_SPLITS:
        warnings.warn(f"unknown tokenizer.ggml.pre={pre!r}; using GPT-2's split (as llama.cpp "
                      "and transformers do)")
    split = PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    # A CONTROL token using characters outside the byte alphabet is a llama.cpp mislabel:
    # transformers skips those (they are not real vocabulary entries), and so do we.
    control = {t for t, k in zip(tokens, token_types) if k == CONTROL and set(t) <= alphabet}
    control |= {t for t in specials if t in vocab}
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t in sorted(control, key=vocab.__getitem__)])
    user = [t for t, k in zip(tokens, token_types) if k == USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return tok


def prepare_gguf_tokenizer(reader: gguf.GGUFReader) -> Callable[[Path], list[str]]:
    """Check the tokenizer metadata and build the tokenizer now; returns the function that writes
    `tokenizer.json` and `tokenizer_config.json` into a directory and returns the names written.

    Tokenizers other than byte-level BPE are skipped with a warning: the weights still convert.
    """
    model = metadata(reader, "tokenizer.ggml.model", "str")
    if model != "gpt2":
        warnings.warn(f"GGUF tokenizer.ggml.model={model!r} is not supported (only 'gpt2' "
                      "byte-level BPE); no tokenizer written")
        return lambda out: []
    tokens = metadata(reader, "tokenizer.ggml.tokens", "list[str]")
    if tokens is None:
        raise ConversionError("GGUF metadata lacks 'tokenizer.ggml.tokens', which a 'gpt2' "
                              "tokenizer needs")
    merges = metadata(reader, "tokenizer.ggml.merges", "list[str]", [])
    token_types = metadata(reader, "tokenizer.ggml.token_type", "list[int]")
    if token_types is None:
        token_types = [1] * len(tokens)
    elif len(token_types) != len(tokens):
        raise ConversionError(f"'tokenizer.ggml.token_type' has {len(token_types)} entries for "
                              f"{len(tokens)} tokens")
    named = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                      ("pad_token", "padding")):
        index = metadata(reader, f"tokenizer.ggml.{key}_token_id", "int")
        named[name] = tokens[index] if index is not None and 0 <= index < len(tokens) else None
    try:
        tok = build_byte_level_bpe(tokens, merges, token_types,
                                   metadata(reader, "tokenizer.ggml.pre", "str"),
                                   [t for t in named.values() if t is not None])
    except Exception as e:  # tokenizers raises bare Exception for inconsistent vocab/merges
        raise ConversionError(f"cannot build a tokenizer from the GGUF metadata: {e}") from None
    add_bos = metadata(reader, "tokenizer.ggml.add_bos_token", "bool", False)
    add_eos = metadata(reader, "tokenizer.ggml.add_eos_token", "bool", False)
    if (add_bos and named["bos_token"] is None) or (add_eos and named["eos_token"] is None):
        raise ConversionError("GGUF metadata asks to add BOS/EOS but names no such token")
    if add_bos or add_eos:
        bos = [named["bos_token"]] if add_bos else []
        eos = [named["eos_token"]] if add_eos else []
        ends = {t: tok.token_to_id(t) for t in bos + eos}
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join([*bos, "$A", *eos]),
            pair=" ".join([*bos, "$A", *eos, *bos, "$B:1", *eos]),
            special_tokens=list(ends.items()),
        )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "chat_template": metadata(reader, "tokenizer.chat_template", "str"),
    }

    def write(out: Path) -> list[str]:
        tok.save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2,
                                                              ensure_ascii=False))
        return ["tokenizer.json", "tokenizer_config.json"]

    return write
