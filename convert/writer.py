"""Write a converted checkpoint directory, all or nothing, and verify one later.

Layout of DIR::

    DIR/config.json          LlamaConfig.save_json (format "lserve_jax.llama.v1")
    DIR/params/              orbax StandardCheckpointer checkpoint of the params pytree
    DIR/convert_info.json    source path, kind and fingerprint, dtype, tensor counts, what was
                             ignored, and "files": the size and sha256 of every other file in DIR
    DIR/tokenizer.json ...   tokenizer files, when the source has a tokenizer
    DIR/.verified            written on loading: sha256 of convert_info.json once every file
                             matched its checksum (not part of the conversion; may be absent)

Everything is validated and converted in memory first, then written into a temporary directory
next to DIR and renamed onto DIR at the end, so a failure never leaves a half-written DIR.
Temporary directories are named `.DIR.tmp-PID@HOST-XXXX` (and `.DIR.old-PID@HOST-XXXX` for the
DIR that `force` replaces), so that one left by a killed process can be recognised and removed
by the next conversion into the same parent directory: `remove_stale_temp_dirs`.

Integrity: `verify_checkpoint` compares DIR against the "files" record. Sizes are cheap and are
always checked; checksums cost one read of the checkpoint and are checked when asked, or (what
loading does) until a full check has passed for this convert_info.json, which `.verified` records.
`convert` itself takes no lock: the cache in lserve_jax/checkpoint.py serialises conversions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
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
VERIFIED_FILE = ".verified"

log = logging.getLogger(__name__)
_warned_unverifiable: set[Path] = set()

# `.NAME.tmp-PID@HOST-XXXX`: tempfile's random suffix has no "-", so HOST may contain one.
_TEMP_DIR = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)@(?P<host>.+)-[a-z0-9_]+\Z")


class CheckpointError(ValueError):
    """A converted checkpoint is damaged or incomplete; the message names the directory and
    every file that differs from what its convert_info.json recorded (`problems`, one per file)."""

    def __init__(self, message: str, problems: list[str] | tuple[str, ...] = ()):
        super().__init__(message)
        self.problems = list(problems)


def is_converted(path: str | Path) -> bool:
    """True for a directory written by `convert` (as opposed to an HF checkpoint directory),
    complete or not: `verify_checkpoint` tells whether its files are intact."""
    return (Path(path) / INFO_FILE).is_file()


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


def source_fingerprint(src: str | Path, dtype: str) -> str:
    """Hash of what a conversion depends on: absolute path, file sizes and mtimes, dtype. Names
    cache entries, and tells whether a damaged checkpoint's source is still what it came from."""
    src = Path(src).absolute()
    files = [src] if src.is_file() else sorted(
        p for p in src.iterdir() if p.suffix in (".json", ".safetensors", ".jinja"))
    parts = [str(src), dtype] + [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                                 for p in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def save_params(path: Path, params: dict) -> None:
    """Save the params pytree (NumPy leaves) with orbax; `path` must not exist yet."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params)
        ckptr.wait_until_finished()


# ---- temporary directories, named by their owner ------------------------------------------------

def _owned_temp_dir(out: Path, kind: str) -> Path:
    """A new empty `.OUT.<kind>-PID@HOST-XXXX` next to `out` (kind: "tmp" or "old")."""
    prefix = f".{out.name}.{kind}-{os.getpid()}@{socket.gethostname()}-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temp_dirs(directory: str | Path) -> list[Path]:
    """Remove the temporary directories in `directory` that a conversion killed mid-way left.

    Only ours by name, only from this host, and only when their owner process is gone: one whose
    PID is alive (even if the PID was reused) or that was made on another host is kept.
    Returns the removed paths.
    """
    directory, host = Path(directory), socket.gethostname()
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for p in directory.iterdir():
            m = _TEMP_DIR.match(p.name)
            if (m and p.is_dir() and m["host"] == host and int(m["pid"]) > 0
                    and not _alive(int(m["pid"]))):
                log.info("removing %s, left by process %s that no longer runs", p, m["pid"])
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _replace(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished `tmp` onto `out`; an existing `out` is removed only after that."""
    old = None
    if out.exists():
        if not force:
            raise ConversionError(f"{out} already exists; use --force to overwrite it")
        old = _owned_temp_dir(out, "old")
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


# ---- integrity -----------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _file_records(root: Path) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of every file under `root` but convert_info.json."""
    records = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != INFO_FILE:
            records[rel] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    return records


def _reconvert_hint(path: Path, info: dict) -> str:
    return f"python -m convert {info.get('source', 'SRC')} --out {path} --force"


def _is_stamped(path: Path, info_bytes: bytes) -> bool:
    """True if a full verification already passed for this very convert_info.json."""
    try:
        return (path / VERIFIED_FILE).read_text().strip() == hashlib.sha256(info_bytes).hexdigest()
    except OSError:
        return False


def _stamp(path: Path, info_bytes: bytes) -> None:
    """Record a passed full verification, atomically; skipped silently where DIR is read-only
    (the next load then verifies again)."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{VERIFIED_FILE}.", dir=path)
        with os.fdopen(fd, "w") as f:
            f.write(hashlib.sha256(info_bytes).hexdigest() + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path / VERIFIED_FILE)
    except OSError as e:
        log.debug("cannot record the verification of %s: %s", path, e)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def verify_checkpoint(path: str | Path, *, checksums: bool | None = True) -> None:
    """Check a converted directory against the sizes and checksums in its convert_info.json.

    checksums: True -- hash every file (then record the pass in `.verified`); False -- sizes
    only; None -- hash only if no full check has passed yet for this convert_info.json (what
    loading does: the first load after a conversion reads everything once).
    Raises CheckpointError naming the directory and every missing, resized or altered file.
    Checkpoints converted before sizes and checksums were recorded only get their config.json
    and params/ checked, with a one-time warning that they cannot be verified.
    """
    path = Path(path)
    if not is_converted(path):
        raise CheckpointError(f"{path} is not a converted checkpoint: it has no {INFO_FILE}")
    try:
        info_bytes = (path / INFO_FILE).read_bytes()
        info = json.loads(info_bytes)
        records = info.get("files")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged: {INFO_FILE} cannot be read ({e}). "
                              f"Re-convert it: {_reconvert_hint(path, {})}",
                              [f"{INFO_FILE}: unreadable"]) from None
    if records is None:
        bad = [f"{f}: missing" for f in (CONFIG_FILE, PARAMS_DIR) if not (path / f).exists()]
        if not bad and path.absolute() not in _warned_unverifiable:
            _warned_unverifiable.add(path.absolute())
            log.warning("checkpoint %s was converted before file checksums were recorded, so it "
                        "cannot be verified; re-convert it to enable that: %s",
                        path, _reconvert_hint(path, info))
    else:
        full = checksums if checksums is not None else not _is_stamped(path, info_bytes)
        bad = []
        for rel, record in records.items():
            try:
                size = (path / rel).stat().st_size
                if size != record["size"]:
                    bad.append(f"{rel}: {size} bytes, expected {record['size']}")
                elif full and _sha256(path / rel) != record["sha256"]:
                    bad.append(f"{rel}: contents changed (sha256 differs)")
            except FileNotFoundError:
                bad.append(f"{rel}: missing")
            except OSError as e:
                bad.append(f"{rel}: unreadable ({e.strerror})")
    if bad:
        with contextlib.suppress(OSError):  # make every later load hash everything again
            (path / VERIFIED_FILE).unlink()
        raise CheckpointError(f"checkpoint {path} is damaged: {'; '.join(bad)}. "
                              f"Re-convert it: {_reconvert_hint(path, info)}", bad)
    if records is not None and full:
        _stamp(path, info_bytes)


def convert(src: str | Path, out: str | Path, *, dtype: str = "float32", force: bool = False,
            progress: bool = True) -> Path:
    """Convert an HF checkpoint directory or a GGUF file into our layout at `out`.

    Raises ConversionError (nothing written) on any problem: unknown/missing/misshapen tensors,
    non-finite weights, unsupported quantization, corrupt files, an existing `out` without
    `force`. First removes what conversions killed earlier left next to `out`.
    """
    if dtype not in DTYPES:
        raise ConversionError(f"{dtype=} must be one of {DTYPES}")
    src, out = Path(src).absolute(), Path(out).absolute()
    if out.exists() and not force:
        raise ConversionError(f"{out} already exists; use --force to overwrite it")
    if src == out or out in src.parents:
        raise ConversionError(f"output {out} would overwrite the source {src}")
    source = open_source(src)
    fingerprint = source_fingerprint(src, dtype)
    params, report = fill_params(source.config, jnp.dtype(dtype), source.tensor_names,
                                 source.load, source.table, progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out.parent)
    tmp = _owned_temp_dir(out, "tmp")
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
            "source_fingerprint": fingerprint,
            "dtype": dtype,
            "num_source_tensors": report["num_source_tensors"],
            "num_params": report["num_params"],
            "num_parameters": report["num_parameters"],
            "ignored_tensors": report["ignored"],
            "dropped_tied_tensors": report["dropped_equal"],
            "rules_not_stored": ignored,
            "tokenizer_files": tokenizer_files,
            **source.info,
            "files": _file_records(tmp),
        }
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
        _replace(tmp, out, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return out
