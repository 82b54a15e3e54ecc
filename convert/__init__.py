"""Checkpoint converter: HF safetensors directories and llama.cpp GGUF files -> lserve_jax layout.

    python -m convert SRC --out DIR [--dtype float32|bfloat16|float16] [--force]

Public API: `convert(src, out, *, dtype, force, progress) -> Path`, `ConversionError`,
`is_converted(path)`. The layout of DIR is described in `convert/writer.py`.
"""

from convert.mapping import ConversionError
from convert.writer import CHECKPOINT_FORMAT, DTYPES, convert, is_converted

__all__ = ["CHECKPOINT_FORMAT", "DTYPES", "ConversionError", "convert", "is_converted"]
