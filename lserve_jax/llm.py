"""`LLM`: the Python API (in the spirit of vLLM's offline `LLM.generate`).

Host side only: tokenization, validation, bucketing, page reservation, and calling the jitted
device steps of lserve_jax/decode_loop.py. Each compile is logged and timed separately.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lserve_jax import decode_loop, head_pattern, inputs
from lserve_jax.sampling import SamplingArrays, SamplingParams
from lserve_jax.sparsity import SparsityConfig
from models import kv_cache, llama
from models.attention import AttentionConfig

log = logging.getLogger("lserve_jax")

ATTENTION_CHOICES = ("dense", "lserve")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass
class RequestOutput:
    """One prompt's result. `token_ids` are the generated ids (a stop token included)."""

    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    # "stop" (stop/EOS token), "length" (max_tokens or context full) or "error" (`error` says why)
    finish_reason: str
    error: str | None = None


@dataclasses.dataclass
class GenerationStats:
    """Timings of the last `generate` call, compile time kept apart from run time."""

    compile_s: float = 0.0
    prefill_ms: float = 0.0
    decode_s: float = 0.0
    decode_tokens: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


def _bucket(n: int, minimum: int) -> int:
    """Round up to a power of two up to 1024, then to a multiple of 512 (few compiles, at most
    half of a long prompt's compute wasted on padding)."""
    n = max(n, minimum)
    if n <= 1024:
        return 1 << (n - 1).bit_length()
    return -(-n // 512) * 512


def default_impl() -> str:
    """Pallas kernels on a GPU, their XLA references elsewhere."""
    return "pallas" if jax.default_backend() == "gpu" else "xla"


class LLM:
    """A loaded model ready to generate.

    ckpt: a converted checkpoint directory, a HF checkpoint directory, a `.gguf` file (both
    converted on first use into a cache), or None for the embedded SmolLM2-135M-Instruct.
    attention: "dense" or "lserve". dtype: "float32", "bfloat16" or "float16".
    impl: "pallas" or "xla" (default: pallas on GPU). verify: check every file's checksum
    before loading (sizes are always checked; checksums on the first load after a conversion;
    README "Checkpoint integrity"). Remaining keyword arguments are LServe's
    sparsity knobs (see `SparsityConfig`). With attention="lserve" and no `head_pattern`, the
    embedded model uses its shipped calibrated pattern (lserve_jax/attn_patterns/); other
    checkpoints then treat every head as dense.
    """

    def __init__(self, ckpt: str | None = None, *, attention: str = "dense",
                 dtype: str = "float32", impl: str | None = None, verify: bool = False,
                 **sparsity_knobs):
        if attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention={attention!r} must be one of {ATTENTION_CHOICES}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} must be one of {DTYPES}")
        unknown = set(sparsity_knobs) - set(SparsityConfig.field_names())
        if unknown:
            raise TypeError(f"unknown LLM arguments {sorted(unknown)}; sparsity knobs are "
                            f"{list(SparsityConfig.field_names())}")
        self.sparsity = SparsityConfig(**sparsity_knobs)
        self.attention_mode = attention
        self.impl = impl or default_impl()
        from lserve_jax import checkpoint  # orbax is slow to import; only LLM needs it

        self._ckpt = ckpt
        self.compilation_cache = checkpoint.enable_compilation_cache()
        path, self.config, self.params, self.tokenizer = checkpoint.load_model(
            ckpt, dtype=dtype, verify=verify)
        self.checkpoint_path = path
        self.attention = self._attention_config()
        self.stats = GenerationStats()
        self._executables: dict = {}

    def _attention_config(self) -> AttentionConfig:
        """Dense, or LServe's unified sparse attention from the head pattern and the sparsity
        knobs (LServe §4): Λ-masked streaming heads in prefill; in decode, sink + ring pages for
        streaming heads and `token_budget` tokens of selected pages for dense heads."""
        s = self.sparsity
        if self.attention_mode == "dense":
            if s.head_pattern is not None:  # unused, but a bad file is still an error
                head_pattern.streaming_heads_for_model(
                    s.head_pattern, s.static_sparsity, self.config.num_layers,
                    self.config.num_kv_heads)
                log.warning("head_pattern %s is only used with attention='lserve'", s.head_pattern)
            # The sparsity still carries the page sizes the cache is built with.
            return AttentionConfig(mode="dense", impl=self.impl, sparsity=s)
        streaming = None
        pattern = s.head_pattern or head_pattern.default_pattern(self._ckpt)
        if pattern is None:
            log.warning("attention='lserve' without a head_pattern: every head is a dense head "
                        "(page selection only)")
        else:
            streaming = head_pattern.streaming_heads_for_model(
                pattern, s.static_sparsity, self.config.num_layers, self.config.num_kv_heads)
            log.info("head pattern %s: %s", pattern, head_pattern.describe(streaming))
        self.head_pattern = pattern
        return AttentionConfig(mode="lserve", impl=self.impl, streaming_heads=streaming,
                               sparsity=s)

    # ---- public API --------------------------------------------------------------------------

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 on_tokens: Callable[[int, list[int]], None] | None = None,
                 stream_interval: int = 8) -> list[RequestOutput]:
        """Generate a continuation for each prompt.

        prompts: a string, a list of token ids (one prompt), or a list of strings (needs a
        tokenizer) and/or token-id lists. sampling_params: one for all prompts or one per prompt.
        `on_tokens(row, new_ids)` is called after every `stream_interval` (>= 1) decode steps
        with the ids each row gained (for streaming). A row whose logits turn non-finite ends
        with finish_reason "error" and `error` naming the token; the other rows are unaffected.
        """
        prompts = inputs.normalize_prompts(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        sampling_params = list(sampling_params)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts")
        texts, ids = zip(*(self._prompt_ids(p, i) for i, p in enumerate(prompts)))
        out_ids, reasons, errors = self.generate_ids(list(ids), sampling_params,
                                                     on_tokens=on_tokens,
                                                     stream_interval=stream_interval)
        return [RequestOutput(prompt=text, prompt_token_ids=list(pid), token_ids=o,
                              text=self.tokenizer.decode(o) if self.tokenizer else None,
                              finish_reason=r, error=e)
                for text, pid, o, r, e in zip(texts, ids, out_ids, reasons, errors)]

    def chat_prompt(self, message: str) -> str:
        """Render one user message with the tokenizer's chat template."""
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer: chat needs one")
        return self.tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                                  add_generation_prompt=True)

    # ---- host-side planning --------------------------------------------------------------------

    def _prompt_ids(self, prompt, index: int = 0) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer: pass prompts as token-id lists")
            ids, text = self.tokenizer.encode(prompt), prompt
        elif isinstance(prompt, (bytes, dict)) or not hasattr(prompt, "__len__"):
            raise TypeError(f"prompt {index} is a {type(prompt).__name__}; a prompt is a string "
                            "or a list of token ids")
        else:
            ids, text = prompt, None
        ids = inputs.check_prompt_ids(ids, vocab_size=self.config.vocab_size,
                                      context=self.config.max_position_embeddings, index=index)
        return text, ids

    def _stop_ids(self, sp: SamplingParams) -> list[int]:
        inputs.check_token_ids("stop_token_ids", sp.stop_token_ids, self.config.vocab_size)
        ids = list(sp.stop_token_ids)
        if not sp.ignore_eos:
            ids += list(self.config.eos_token_ids)
            if self.tokenizer is not None:
                ids += list(self.tokenizer.eos_token_ids)
        return sorted(set(ids))

    def generate_ids(self, prompt_ids: list[list[int]], sampling_params: list[SamplingParams], *,
                     on_tokens=None, stream_interval: int = 8
                     ) -> tuple[list[list[int]], list[str], list[str | None]]:
        """Token ids in; generated token ids, finish reasons and error messages (None unless
        the finish reason is "error") out (see `generate`)."""
        stream_interval = inputs.check_stream_interval(stream_interval)
        if on_tokens is not None and not callable(on_tokens):
            raise TypeError(f"on_tokens={on_tokens!r} must be callable")
        b = len(prompt_ids)
        lens = np.array([len(p) for p in prompt_ids], np.int32)
        context = self.config.max_position_embeddings
        # Generation stops when the context is full (finish_reason "length"), as in vLLM.
        max_tokens = np.array([min(sp.max_tokens, context - n)
                               for sp, n in zip(sampling_params, lens)], np.int32)
        t_bucket = _bucket(int(lens.max()), 16)
        capacity = _bucket(int(max_tokens.max()), 16)
        pages_per_seq = -(-(t_bucket + capacity) // self.sparsity.page_size)
        spec = llama.cache_spec(  # pages of the sparsity's page sizes, in both modes
            self.config, self.attention, num_pages=b * pages_per_seq + 1, max_seqs=b,
            max_pages_per_seq=pages_per_seq, dtype=jnp.dtype(self.params["embed"].dtype).name)
        cache = kv_cache.init_cache(spec)
        for slot in range(b):
            cache, ok = kv_cache.reserve(cache, jnp.int32(slot), jnp.int32(lens[slot] + max_tokens[slot]))
            if not bool(ok):
                raise RuntimeError(f"KV pool too small for prompt {slot}")
        tokens = np.zeros((b, t_bucket), np.int32)
        for i, p in enumerate(prompt_ids):
            tokens[i, :len(p)] = p
        stops = [self._stop_ids(sp) for sp in sampling_params]
        stop_ids = np.full((b, inputs.stop_id_width(max(len(s) for s in stops))), -1, np.int32)
        for i, s in enumerate(stops):
            stop_ids[i, :len(s)] = s
        sampling = self._sampling_arrays(sampling_params)

        stats = GenerationStats()
        static = dict(config=self.config, attention=self.attention)
        args = (self.params, cache, jnp.asarray(tokens), jnp.asarray(lens),
                jnp.arange(b, dtype=jnp.int32), sampling, jnp.asarray(max_tokens),
                jnp.asarray(stop_ids))
        start = self._compile(decode_loop.start, stats, args, dict(static, capacity=capacity))
        t0 = time.perf_counter()
        state = start(*args)
        state.out_tokens.block_until_ready()
        stats.prefill_ms = 1e3 * (time.perf_counter() - t0)

        seen = np.zeros(b, np.int64)
        steps = capacity if on_tokens is None else stream_interval
        run = None
        decode_start = time.perf_counter()
        while True:
            out, num, done, error_at = jax.device_get(
                (state.out_tokens, state.num_generated, state.done, state.error_at))
            if on_tokens is not None:
                for row in range(b):
                    if num[row] > seen[row]:
                        on_tokens(row, out[row, seen[row]:num[row]].tolist())
            seen = num.astype(np.int64)
            if done.all():
                break
            if run is None:
                pause = time.perf_counter()
                run = self._compile(decode_loop.run, stats, (self.params, state),
                                    dict(static, num_steps=steps))
                decode_start += time.perf_counter() - pause
            state = run(self.params, state)
        stats.decode_s = time.perf_counter() - decode_start
        # The first token of each row came from prefill (unless its logits were not finite).
        stats.decode_tokens = int(np.maximum(num - 1, 0).sum())
        self.stats = stats
        outputs, reasons, errors = [], [], []
        for row in range(b):
            ids = out[row, :num[row]].tolist()
            outputs.append(ids)
            if error_at[row] >= 0:
                reasons.append("error")
                where = "the prefill" if error_at[row] == 0 else f"decode step {error_at[row]}"
                errors.append(f"prompt {row}: non-finite logits (NaN or inf) in {where}, for "
                              f"generated token {error_at[row]}; generation stopped after "
                              f"{num[row]} tokens. The checkpoint may be damaged (check it with "
                              "--verify) or the computation overflowed (try float32)")
                log.error(errors[-1])
            else:
                reasons.append("stop" if ids and ids[-1] in stops[row] else "length")
                errors.append(None)
        return outputs, reasons, errors

    def _sampling_arrays(self, sampling_params: list[SamplingParams]) -> SamplingArrays:
        rng = np.random.default_rng()
        seeds = [sp.seed if sp.seed is not None else int(rng.integers(0, inputs.SEED_LIMIT))
                 for sp in sampling_params]
        return SamplingArrays(
            temperature=jnp.asarray([sp.temperature for sp in sampling_params], jnp.float32),
            top_k=jnp.asarray([max(sp.top_k, 0) for sp in sampling_params], jnp.int32),
            top_p=jnp.asarray([sp.top_p for sp in sampling_params], jnp.float32),
            keys=jnp.asarray(np.stack([inputs.seed_key(s) for s in seeds])))

    def _compile(self, fn, stats: GenerationStats, args: tuple, static: dict):
        """Ahead-of-time compile `fn` for these argument shapes, once; log and time it."""
        shapes = jax.tree.map(lambda x: (x.shape, x.dtype), args)
        key = (fn.__name__, str(jax.tree.structure(args)), str(jax.tree.leaves(shapes)),
               tuple(sorted((k, v) for k, v in static.items() if k not in ("config", "attention"))))
        exe = self._executables.get(key)
        if exe is None:
            t0 = time.perf_counter()
            exe = fn.lower(*args, **static).compile()
            seconds = time.perf_counter() - t0
            stats.compile_s += seconds
            log.info("compiled %s %s in %.1f s", fn.__name__,
                     {k: v for k, v in static.items() if k not in ("config", "attention")}, seconds)
            self._executables[key] = exe
        return exe
