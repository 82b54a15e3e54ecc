"""Checkpoint converter: HF safetensors directories and llama.cpp GGUF files -> lserve_jax layout.

    python -m convert SRC --out DIR [--dtype float32|bfloat16|float16] [--force]
    python -m convert DIR --verify        # check every file of DIR against its checksums

Public API: `convert(src, out, *, dtype, force, progress) -> Path`, `ConversionError`,
`is_converted(path)`, `verify_checkpoint(path, *, checksums=True)` and `CheckpointError` (a
converted directory is damaged), `source_fingerprint(src, dtype)`,
`remove_stale_temp_dirs(directory)`. The layout of DIR is described in `convert/writer.py`.
"""

from convert.mapping import ConversionError
from convert.writer import (CHECKPOINT_FORMAT, DTYPES, CheckpointError, convert, is_converted,
                            remove_stale_temp_dirs, source_fingerprint, verify_checkpoint)

__all__ = ["CHECKPOINT_FORMAT", "DTYPES", "CheckpointError", "ConversionError", "convert",
           "is_converted", "remove_stale_temp_dirs", "source_fingerprint", "verify_checkpoint"]
