"""Write a converted checkpoint directory, all or nothing.

Layout of DIR::

    DIR/config.json          LlamaConfig.save_json (format "lserve_jax.llama.v1")
    DIR/params/              orbax StandardCheckpointer checkpoint of the params pytree
    DIR/convert_info.json    source path and kind, dtype, tensor counts, what was ignored
    DIR/tokenizer.json ...   tokenizer files, when the source has a tokenizer

Everything is validated and converted in memory first, then written into a temporary directory
next to DIR and renamed onto DIR at the end, so a failure never leaves a half-written DIR.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax.numpy as jnp
import orbax.checkpoint as ocp

from convert.hf import read_hf
from convert.mapping import ConversionError, fill_params
from convert.source import Source

CHECKPOINT_FORMAT = "lserve_jax.checkpoint.v1"
DTYPES = ("float32", "bfloat16", "float16")
CONFIG_FILE, PARAMS_DIR, INFO_FILE = "config.json", "params", "convert_info.json"


def is_converted(path: str | Path) -> bool:
    """True for a directory written by `convert` (as opposed to an HF checkpoint directory)."""
    path = Path(path)
    return (path / INFO_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def open_source(src: Path) -> Source:
    """Pick the reader by what `src` is: an HF directory or a .gguf file."""
    if not src.exists():
        raise ConversionError(f"source checkpoint {src} does not exist")
    if src.is_dir():
        if is_converted(src):
            raise ConversionError(f"{src} is already a converted checkpoint")
        return read_hf(src)
    with open(src, "rb") as f:
        magic = f.read(4)
    if src.suffix == ".gguf" or magic == b"GGUF":
        # Imported here: only GGUF sources need the `gguf` package, so converted and HF
        # checkpoints load where it is not installed.
        from convert.gguf_file import read_gguf

        return read_gguf(src)
    raise ConversionError(f"{src} is neither an HF checkpoint directory nor a .gguf file")


def save_params(path: Path, params: dict) -> None:
    """Save the params pytree (NumPy leaves) with orbax; `path` must not exist yet."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params)
        ckptr.wait_until_finished()


def _replace(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished `tmp` onto `out`; an existing `out` is removed only after that."""
    old = None
    if out.exists():
        if not force:
            raise ConversionError(f"{out} already exists; use --force to overwrite it")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / out.name)
    try:
        os.rename(tmp, out)  # atomic on one filesystem
    except OSError as e:
        if old is not None:
            os.rename(old / out.name, out)
        raise ConversionError(f"cannot move the converted checkpoint onto {out}: {e}") from None
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def convert(src: str | Path, out: str | Path, *, dtype: str = "float32", force: bool = False,
            progress: bool = True) -> Path:
    """Convert an HF checkpoint directory or a GGUF file into our layout at `out`.

    Raises ConversionError (nothing written) on any problem: unknown/missing/misshapen tensors,
    unsupported quantization, corrupt files, an existing `out` without `force`.
    """
    if dtype not in DTYPES:
        raise ConversionError(f"{dtype=} must be one of {DTYPES}")
    src, out = Path(src).absolute(), Path(out).absolute()
    if out.exists() and not force:
        raise ConversionError(f"{out} already exists; use --force to overwrite it")
    if src == out or out in src.parents:
        raise ConversionError(f"output {out} would overwrite the source {src}")
    source = open_source(src)
    params, report = fill_params(source.config, jnp.dtype(dtype), source.tensor_names,
                                 source.load, source.table, progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would make a shared cache unreadable to others
        source.config.save_json(tmp / CONFIG_FILE)
        save_params(tmp / PARAMS_DIR, params)
        tokenizer_files = source.write_tokenizer(tmp)
        ignored = {r.source: r.why for r in source.table if r.mode != "fill"}
        info = {
            "format": CHECKPOINT_FORMAT,
            "source": str(src),
            "source_kind": source.kind,
            "dtype": dtype,
            "num_source_tensors": report["num_source_tensors"],
            "num_params": report["num_params"],
            "num_parameters": report["num_parameters"],
            "ignored_tensors": report["ignored"],
            "dropped_tied_tensors": report["dropped_equal"],
            "rules_not_stored": ignored,
            "tokenizer_files": tokenizer_files,
            **source.info,
        }
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
        _replace(tmp, out, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return out
