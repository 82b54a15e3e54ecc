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
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

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


def _meta(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


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


def write_gguf_tokenizer(reader: gguf.GGUFReader, out: Path) -> list[str]:
    """Write `tokenizer.json` and `tokenizer_config.json` into `out`; returns the names written.

    Tokenizers other than byte-level BPE are skipped with a warning: the weights still convert.
    """
    model = _meta(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        warnings.warn(f"GGUF tokenizer.ggml.model={model!r} is not supported (only 'gpt2' "
                      "byte-level BPE); no tokenizer written")
        return []
    tokens = _meta(reader, "tokenizer.ggml.tokens")
    merges = _meta(reader, "tokenizer.ggml.merges", [])
    token_types = _meta(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    named = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                      ("pad_token", "padding")):
        index = _meta(reader, f"tokenizer.ggml.{key}_token_id")
        named[name] = tokens[index] if index is not None and index < len(tokens) else None
    try:
        tok = build_byte_level_bpe(tokens, merges, token_types,
                                   _meta(reader, "tokenizer.ggml.pre"),
                                   [t for t in named.values() if t is not None])
    except Exception as e:  # tokenizers raises bare Exception for inconsistent vocab/merges
        raise ConversionError(f"cannot build a tokenizer from the GGUF metadata: {e}") from None
    add_bos = bool(_meta(reader, "tokenizer.ggml.add_bos_token", False))
    add_eos = bool(_meta(reader, "tokenizer.ggml.add_eos_token", False))
    if (add_bos and named["bos_token"] is None) or (add_eos and named["eos_token"] is None):
        raise ConversionError("GGUF asks to add BOS/EOS but names no such token")
    if add_bos or add_eos:
        bos = [named["bos_token"]] if add_bos else []
        eos = [named["eos_token"]] if add_eos else []
        ends = {t: tok.token_to_id(t) for t in bos + eos}
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join([*bos, "$A", *eos]),
            pair=" ".join([*bos, "$A", *eos, *bos, "$B:1", *eos]),
            special_tokens=list(ends.items()),
        )
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "chat_template": _meta(reader, "tokenizer.chat_template"),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return ["tokenizer.json", "tokenizer_config.json"]
