"""`Engine`: continuous batching over one persistent KV pool (in vLLM's shape).

    engine = Engine(attention="lserve", max_num_seqs=16)
    engine.add_request("a", "Once upon a time", SamplingParams(max_tokens=32))
    while engine.has_unfinished_requests():
        for out in engine.step():          # every request that progressed this step
            print(out.request_id, out.new_text, out.finished)

Three layers (docs/design.md §6): the host scheduler and page pool
(`lserve_jax/engine/scheduler.py`, `pages.py`; plain Python) plan each step; the plan becomes
one `StepBatch` of NumPy arrays per device call (`lserve_jax/engine/device.py`); the jitted
steps execute it on the donated cache. Stop tokens, finish reasons, text and metrics are
decided here, on the host, from each call's sampled tokens.

LServe mode: generated tokens are always computed by decode steps, also when a preempted request
recomputes them (`replay_outputs`), so recompute reproduces the selection and ring reads of the
uninterrupted run. With streaming heads, a prompt keeps its streaming heads' sink and last
`ctx_local_tokens` keys in prefill window pages, one per page-table column, until its prefill
ends (`scheduler.PrefillWindow`). The prefix cache shares the dense heads' pages (with their key
statistics) and the streaming heads' window pages of the same tokens; a hit's first chunk
rebuilds the slot's decode sink and ring from the shared window pages, so a request that hits
produces the tokens it produces alone (docs/design.md §6).

Prefill calls whose rows all start at position 0 run as `fresh` chunks: attention within the
chunk, as a whole prompt (the sparse prefill kernel on a GPU; on the CPU its blockwise reference,
several times faster than gathering pages), equal to the chunk path (tests/test_chunked_prefill.py).
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import itertools
import logging
import threading
import time
from collections.abc import Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lserve_jax import head_pattern, inputs, kv_quant
from lserve_jax.engine import device, multihost
from lserve_jax.engine.pages import PagePool
from lserve_jax.engine.scheduler import PrefillWindow, Request, Scheduler, window_quota
from lserve_jax.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from lserve_jax.sampling import MAX_LOGPROBS, SamplingParams
from lserve_jax.sparsity import SparsityConfig
from models import kv_cache, llama, parallel, weight_quant
from pallas_kernels import impls, quant
from models.attention import AttentionConfig

log = logging.getLogger("lserve_jax")

ATTENTION_CHOICES = ("dense", "lserve")
DTYPES = ("auto", "float32", "bfloat16", "float16")
CPU_KV_CACHE_GB = 1.0  # default pool on the CPU (no device memory to measure)
GPU_MEMORY_FRACTION = 0.9  # weights plus KV cache, of the device's memory
MIN_DECODE_ROWS = 4
MIN_PAGE_COLUMNS = 8
DEFAULT_SCHEDULER_STEPS = 8  # decode steps per call while nobody waits
MAX_SHARED_EXECUTABLES = 64  # compiled steps kept for the process's engines, least recent out
_SHARED_EXECUTABLES: collections.OrderedDict = collections.OrderedDict()
_COMPILE_LOCK = threading.RLock()


MAP_COUNT_FRACTION = 0.5  # of the kernel's limit on memory mappings, see below


def memory_map_count() -> tuple[int, int] | None:
    """(memory mappings of this process, the kernel's limit `vm.max_map_count`); None where
    the system does not say (not Linux)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            count = sum(1 for _ in f)
        with open("/proc/sys/vm/max_map_count") as f:
            return count, int(f.read())
    except (OSError, ValueError):
        return None


def release_compiled_steps(fraction: float = 1.0) -> None:
    """Drop the least recently used `fraction` of the engines' compiled steps and JAX's
    in-memory compilation caches, and collect, so their code is unmapped."""
    with _COMPILE_LOCK:
        for _ in range(int(len(_SHARED_EXECUTABLES) * fraction)):
            _SHARED_EXECUTABLES.popitem(last=False)
        jax.clear_caches()
        gc.collect()


def release_executables_if_maps_run_short() -> bool:
    """Free the older half of the compiled steps when the process's memory mappings pass
    MAP_COUNT_FRACTION of the kernel's limit; True if it did.

    XLA:CPU maps each compiled kernel's code and data separately (a 30-layer model's step is
    a few thousand mappings) and JAX keeps compiled programs for reuse, so a process that
    compiles many shapes reaches `vm.max_map_count` (65530 by default), where the next mmap
    fails and the process dies with a segmentation fault inside the compiler. Dropping our
    references and JAX's in-memory caches (`jax.clear_caches`) unmaps them; steps dropped
    are compiled again if used again (a warning says so)."""
    maps = memory_map_count()
    if maps is None or maps[0] <= MAP_COUNT_FRACTION * maps[1]:
        return False
    release_compiled_steps(0.5)
    after = memory_map_count()
    log.warning("%d of the process's %d allowed memory mappings were in use (compiled "
                "programs); freed the least recently used steps and JAX's compilation caches, "
                "now %s mappings (raise vm.max_map_count to keep more compiled shapes)",
                maps[0], maps[1], after[0] if after else "?")
    return True


def _signature(tree) -> tuple:
    """What a compiled program depends on in `tree`: its structure, shapes, dtypes and
    shardings."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((np.shape(x), str(x.dtype), getattr(x, "sharding", None))
                          for x in leaves)


def completion_seed(seed: int, index: int) -> int:
    """The seed of completion `index` of a request seeded `seed`: the seed itself for the
    first, a seed derived from (seed, index) for the others (all reproducible)."""
    if index == 0:
        return seed
    state = np.random.SeedSequence([seed, index]).generate_state(2, np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) % inputs.SEED_LIMIT


def _find_stop(text: str, stops: Sequence[str], before: int) -> tuple[int, str] | None:
    """The earliest stop string in `text` that ends after position `before` (where the text
    grew): (its start, the string), or None."""
    best = None
    for stop in stops:
        at = text.find(stop, max(before - len(stop) + 1, 0))
        if at >= 0 and (best is None or at < best[0]):
            best = (at, stop)
    return best


def default_impl() -> str:
    """Triton-style Pallas kernels on a GPU, their XLA references elsewhere
    (pallas_kernels/impls.py)."""
    return impls.default_impl(jax.default_backend())


@dataclasses.dataclass
class _Parent:
    """Host state of one request: its prompt and its completions (`SamplingParams.n`)."""

    request_id: Hashable
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    label: str  # how errors name the request ("request 'a'", "prompt 0")
    children: list["_Live"] = dataclasses.field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.children)


@dataclasses.dataclass
class _Live:
    """Host state of one completion (a scheduler request, keyed (request id, index)).

    text: the detokenized text of its kept tokens (cut at a stop string); `released` of its
    characters have been handed out (the rest may still start a stop string)."""

    parent: _Parent
    index: int
    request: Request
    stop_ids: frozenset[int]
    sampling: device.RowSampling
    stream: object | None
    text: str = ""
    released: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    logprobs: list | None = None
    cumulative_logprob: float | None = None
    new_ids: list[int] = dataclasses.field(default_factory=list)

    @property
    def key(self) -> tuple:
        return (self.parent.request_id, self.index)


class Engine:
    """A loaded model serving requests with continuous batching (see the module docstring).

    ckpt, attention, dtype, impl, verify and the sparsity knobs are `LLM`'s (README). Capacity:
    `max_num_seqs` running requests, `max_num_batched_tokens` tokens per step (decode rows and
    prefill chunks share it), `max_model_len` tokens per request (default: the model's
    context); the pool has `num_pages` pages or as many as `kv_cache_memory_gb` holds (default:
    on a GPU 90% of its memory minus the weights, on the CPU 1 GiB, never more than
    `max_num_seqs` full-length requests need). `enable_prefix_caching` shares full pages of
    identical prompt prefixes (with streaming heads too, see the module docstring).
    `num_scheduler_steps`: decode steps per device call while no request waits (the host reads
    tokens back once per call; a request arriving meanwhile waits for the call to end).
    `long_prefill_token_threshold`: while requests wait, a prompt chunk takes at most this many
    tokens (default a quarter of `max_num_batched_tokens`; 0: no cap), so short requests behind
    a long prompt start in the same step.
    `kv_cache_dtype`: "auto" (the model's dtype), "int8" (keys and values quantized with
    static scales per layer, KV head and channel, from `kv_scales` (per layer a (k, v) pair of
    numbers or [Hkv][D] lists) or calibrated on the book text and stored beside the
    checkpoint: lserve_jax/kv_quant.py) or "int4" (each token of each head with its own
    float16 scale and zero point, pallas_kernels/quant.py, after dividing each channel by
    the same calibrated scales, models/kv_cache.py) or "fp8" (float8 e4m3 with the int8
    scales stretched to its range). Writes quantize in the scatter that stores
    them; decode reads the pages as stored (the Pallas kernel dequantizes in registers).
    `weight_dtype`: "auto" (the model's dtype) or "int8" (every layer's linear weights
    quantized per output channel after loading, models/weight_quant.py; the embedding and LM
    head stay in the model's dtype).
    `tensor_parallel_size`: N devices (`devices`, default the first N) each run their part of
    every layer under `shard_map`, LServe's heads balanced across them (models/parallel.py,
    docs/design.md §7); given `devices` with N = 1 the engine runs on that device.
    """

    def __init__(self, ckpt: str | None = None, *, attention: str = "dense",
                 dtype: str = "auto", impl: str | None = None, verify: bool = False,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 max_model_len: int | None = None, kv_cache_memory_gb: float | None = None,
                 num_pages: int | None = None, enable_prefix_caching: bool = True,
                 num_scheduler_steps: int = DEFAULT_SCHEDULER_STEPS,
                 long_prefill_token_threshold: int | None = None,
                 kv_cache_dtype: str = "auto", kv_scales=None, weight_dtype: str = "auto",
                 tensor_parallel_size: int = 1, devices: Sequence | None = None,
                 **sparsity_knobs):
        if attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention={attention!r} must be one of {ATTENTION_CHOICES}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} must be one of {DTYPES}")
        self.weight_dtype = weight_quant.check_weight_dtype(weight_dtype)
        unknown = set(sparsity_knobs) - set(SparsityConfig.field_names())
        if unknown:
            raise TypeError(f"unknown arguments {sorted(unknown)}; sparsity knobs are "
                            f"{list(SparsityConfig.field_names())}")
        max_num_seqs = inputs.check_int("max_num_seqs", max_num_seqs, minimum=1)
        max_num_batched_tokens = inputs.check_int("max_num_batched_tokens",
                                                  max_num_batched_tokens, minimum=max_num_seqs)
        if kv_cache_memory_gb is not None and num_pages is not None:
            raise ValueError("give kv_cache_memory_gb or num_pages, not both")
        if kv_cache_memory_gb is not None:
            inputs.check_float("kv_cache_memory_gb", kv_cache_memory_gb, above=0)
        if num_pages is not None:
            inputs.check_int("num_pages", num_pages, minimum=2)
        self.sparsity = SparsityConfig(**sparsity_knobs)
        self.attention_mode = attention
        self.impl = impls.normalize_impl(impl) if impl is not None else default_impl()
        from lserve_jax import checkpoint  # orbax is slow to import; only loading needs it

        self._ckpt = ckpt
        self.compilation_cache = checkpoint.enable_compilation_cache()
        if dtype == "auto":
            dtype = checkpoint.auto_dtype(ckpt, jax.default_backend())
        self.dtype = dtype
        path, self.config, self.params, self.tokenizer = checkpoint.load_model(
            ckpt, dtype=dtype, verify=verify)
        self.checkpoint_path = path
        self.kv_cache_dtype = quant.check_kv_cache_dtype(kv_cache_dtype, self.config.head_dim)
        self.kv_scales = None
        if kv_cache_dtype != "auto":
            self.kv_scales = (kv_quant.check_kv_scales(kv_scales, self.config)
                              if kv_scales is not None else kv_quant.load_or_calibrate(
                                  path, self.params, self.config, self.tokenizer))
        elif kv_scales is not None:
            raise ValueError("kv_scales are only used with a quantized kv_cache_dtype")
        self.head_pattern = None
        self.attention = self._attention_config()
        self.tensor_parallel_size = inputs.check_int("tensor_parallel_size", tensor_parallel_size,
                                                     minimum=1)
        self.shard = None
        if self.tensor_parallel_size > 1 or devices is not None:
            self._split_for_devices(self.tensor_parallel_size, devices)
        # Quantized after the KV scales, which are calibrated on the float weights (so
        # kv_scales.json does not depend on the weight dtype), and before the pool is sized:
        # the float matrices are freed here, so a GPU's KV budget counts the int8 ones in use.
        float_bytes = weight_quant.weight_bytes(self.params)
        self.params = weight_quant.quantize_params(self.params, self.weight_dtype)
        if self.shard is not None:
            self.params = parallel.place(self.params, parallel.param_specs(self.params),
                                         self.shard.mesh)
        self.weight_bytes = weight_quant.weight_bytes(self.params)
        if self.weight_dtype == "int8":
            log.info("weights: %.1f MiB with int8 layer weights (%.1f MiB in %s)",
                     self.weight_bytes / 2**20, float_bytes / 2**20, dtype)
        else:
            log.info("weights: %.1f MiB (%s)", self.weight_bytes / 2**20, dtype)
        context = self.config.max_position_embeddings
        self.max_model_len = context if max_model_len is None else inputs.check_int(
            "max_model_len", max_model_len, minimum=2, maximum=context)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_scheduler_steps = inputs.check_int("num_scheduler_steps", num_scheduler_steps,
                                                    minimum=1)
        self.streaming = self.attention.has_streaming
        page_size = self.sparsity.page_size
        self.max_pages_per_seq = -(-self.max_model_len // page_size)
        window = None
        if self.streaming:
            # The window keeps what a later chunk reads (the Λ mask's sink and local keys) and
            # what a chunk after a prefix hit restores the decode sink and ring from. Room for
            # two longest prompts' windows at once (held only while a prompt is prefilled).
            s = self.sparsity
            sink = max(s.ctx_sink_tokens, s.dec_sink_tokens)
            local = max(s.ctx_local_tokens, s.streaming_layout.num_ring_pages * page_size + 1)
            worst = window_quota(page_size, sink, local, self.max_model_len,
                                 max_num_batched_tokens)
            window = PrefillWindow(PagePool(1 + 2 * worst, page_size), sink_tokens=sink,
                                   local_tokens=local)
        spec = self._spec(self.attention, num_pages=2,
                          num_window_pages=window.pool.num_pages - 1 if window else 0)
        if num_pages is None:
            budget = self._memory_budget(kv_cache_memory_gb, spec)
            size = device.size_pool(spec, budget)
            num_pages = min(size.num_pages, max_num_seqs * self.max_pages_per_seq + 1)
        self.spec = dataclasses.replace(spec, num_pages=num_pages)
        self._log_capacity()
        self.cache = kv_cache.init_cache(self.spec)
        if self.shard is not None:
            self.cache = parallel.place(self.cache, parallel.cache_specs(self.cache),
                                        self.shard.mesh)
        self.pool = PagePool(num_pages, page_size)
        self.enable_prefix_caching = bool(enable_prefix_caching)
        lserve = attention == "lserve"
        self.scheduler = Scheduler(
            self.pool, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=self.max_model_len, extra=(attention, repr(self.attention), dtype),
            enable_prefix_caching=self.enable_prefix_caching, replay_outputs=lserve,
            window=window, long_prefill_token_threshold=(
                max_num_batched_tokens // 4 if long_prefill_token_threshold is None
                else long_prefill_token_threshold))
        self._parents: dict[Hashable, _Parent] = {}  # requests waiting or running
        self._live: dict[Hashable, _Live] = {}  # their unfinished completions, by key
        self._state_signature = _signature((self.params, self.cache))
        # With several processes, the leader (process 0) sends each device call to the others.
        self.followers = jax.process_count() > 1 and multihost.is_leader()
        self._seed_rng = np.random.default_rng()
        self._auto_ids = itertools.count()
        self.compile_s = 0.0
        # prefill_s, decode_s: seconds in device calls (launch to results on the host)
        self.counters = dict(steps=0, prefill_calls=0, decode_calls=0, prefill_tokens=0,
                             decode_tokens=0, finished=0, aborted=0, errors=0,
                             prefill_s=0.0, decode_s=0.0)

    # ---- set-up --------------------------------------------------------------------------------

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

    def _split_for_devices(self, n: int, devices: Sequence | None) -> None:
        """Tensor parallelism over n devices (models/parallel.py; `devices`, default the
        first n): balance the LServe head pattern so each device holds the same number of
        dense heads (`head_pattern.balance_for_devices`), permute each layer's KV heads
        (weights, KV scales, pattern) so each device's heads are a contiguous block, dense
        first, and zero-pad the vocabulary and the MLP to multiples of n. The permuted model
        computes the same function."""
        parallel.check_divisible(self.config, n)
        if devices is not None and len(devices) != n:
            raise ValueError(f"{len(devices)} devices given for tensor_parallel_size={n}")
        mesh = parallel.make_mesh(n, devices)
        flags = self.attention.streaming_heads
        if flags is not None:
            gates = head_pattern.load_head_pattern(self.head_pattern)
            balanced = head_pattern.balance_for_devices(gates, flags, n)
            moved = sum(a != b for x, y in zip(flags, balanced) for a, b in zip(x, y))
            if moved:
                log.warning("tensor_parallel_size=%d: %d KV heads changed kind so every device "
                            "holds the same number of dense heads per layer (%s)", n, moved,
                            head_pattern.describe(balanced))
            flags = balanced
        self.params, flags, orders = parallel.split_model(self.params, self.config, flags, n)
        if orders is not None:
            if self.kv_scales is not None:
                self.kv_scales = tuple(tuple(tuple(scale[h] for h in order) for scale in pair)
                                       for pair, order in zip(self.kv_scales, orders))
            self.attention = dataclasses.replace(self.attention, streaming_heads=flags)
        self.shard = parallel.Shard(mesh)
        log.info("tensor parallel over %d %s devices", n, mesh.devices.flat[0].platform)

    def _spec(self, attention: AttentionConfig, num_pages: int, num_window_pages: int = 0):
        spec = llama.cache_spec(self.config, attention, num_pages=num_pages,
                                max_seqs=self.max_num_seqs,
                                max_pages_per_seq=self.max_pages_per_seq,
                                dtype=jnp.dtype(self.params["embed"].dtype).name,
                                kv_cache_dtype=self.kv_cache_dtype, kv_scales=self.kv_scales)
        return dataclasses.replace(spec, num_window_pages=num_window_pages)

    def _memory_budget(self, gb: float | None, spec) -> int:
        if gb is not None:
            return int(gb * 2**30)
        free = device.device_memory_for_cache(GPU_MEMORY_FRACTION)
        if free is not None:  # per device; the pools split over the tensor-parallel devices
            return free * self.tensor_parallel_size
        # The CPU default grows to hold the streaming pool and one full-length request.
        per_page, fixed = device.pool_bytes(spec)
        return max(int(CPU_KV_CACHE_GB * 2**30), fixed + per_page * (self.max_pages_per_seq + 1))

    def _log_capacity(self) -> None:
        """Log the pool's capacity in tokens, in this mode and, for the same memory, the other
        (LServe keeps streaming heads in a constant ring, so its pages hold more context)."""
        per_page, fixed = device.pool_bytes(self.spec)
        memory = self.spec.num_pages * per_page + fixed
        lines = [f"{self.attention_mode}: {(self.spec.num_pages - 1) * self.spec.page_size} "
                 f"tokens in {self.spec.num_pages} pages ({memory / 2**30:.3f} GiB)"]
        other = (AttentionConfig(mode="dense", impl=self.impl, sparsity=self.sparsity)
                 if self.attention_mode == "lserve" else None)
        if other is not None:
            try:
                size = device.size_pool(self._spec(other, 2), memory)
                lines.append(f"dense in the same memory: {size.capacity_tokens} tokens")
            except ValueError:
                pass
        lines.append("tokens per GiB by KV cache dtype: " + (", ".join(
            f"{name} {tokens:,}" for name, tokens in self.tokens_per_gib().items())
            or "unbounded (every head streams)"))
        self.capacity_summary = "; ".join(lines)
        log.info("KV cache: %s", self.capacity_summary)

    def tokens_per_gib(self) -> dict[str, int]:
        """Tokens of context one GiB of pages holds in this mode, per KV cache dtype (pages,
        their int4 scales and the key statistics; the constant streaming pool left out)."""
        out = {}
        for name in quant.KV_CACHE_DTYPES:
            if name == "int4" and self.config.head_dim % 2:
                continue
            scales = (None if name == "auto" else self.kv_scales
                      or ((1.0, 1.0),) * self.config.num_layers)  # shapes only
            spec = dataclasses.replace(self.spec, kv_cache_dtype=name, kv_scales=scales)
            per_page, _ = device.pool_bytes(spec)
            if per_page:  # else every head streams: context costs no pages
                out[name] = 2**30 * spec.page_size // per_page
        return out

    # ---- requests ------------------------------------------------------------------------------

    def _prompt_ids(self, prompt, name: str) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer: pass prompts as token-id lists")
            ids, text = self.tokenizer.encode(prompt), prompt
        elif isinstance(prompt, (bytes, dict)) or not hasattr(prompt, "__len__"):
            raise TypeError(f"{name} is a {type(prompt).__name__}; a prompt is a string or a "
                            "list of token ids")
        else:
            ids, text = prompt, None
        ids = inputs.check_prompt_ids(ids, vocab_size=self.config.vocab_size,
                                      context=self.max_model_len, name=name)
        return text, ids

    def _stop_ids(self, sp: SamplingParams) -> frozenset[int]:
        inputs.check_token_ids("stop_token_ids", sp.stop_token_ids, self.config.vocab_size)
        ids = set(sp.stop_token_ids)
        if not sp.ignore_eos:
            ids |= set(self.config.eos_token_ids)
            if self.tokenizer is not None:
                ids |= set(self.tokenizer.eos_token_ids)
        return frozenset(ids)

    def add_request(self, request_id: Hashable | None, prompt,
                    sampling_params: SamplingParams | None = None) -> Hashable:
        """Queue a request: a prompt (text or token ids) and its SamplingParams (`n`
        completions). A completion ends at a stop token or string, at `max_tokens`, or when it
        fills `max_model_len` (finish "length"). Bad input (an empty prompt, ids outside the
        vocabulary, a prompt that leaves no room in the context or can never fit the pool,
        stop strings without a tokenizer, a duplicate id) raises ValueError or TypeError, and
        nothing changes. Returns the request id (a fresh one when `request_id` is None)."""
        return self._add_request(request_id, prompt, sampling_params, None)

    def _add_request(self, request_id, prompt, sampling_params, name: str | None) -> Hashable:
        """`add_request`, with errors about the prompt naming it `name` (default: the id)."""
        if request_id is None:
            request_id = f"req-{next(self._auto_ids)}"
        if request_id in self._parents:
            raise ValueError(f"request id {request_id!r} is already waiting or running")
        if sampling_params is None:
            sampling_params = SamplingParams()
        if not isinstance(sampling_params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, not "
                            f"{type(sampling_params).__name__}")
        name = name or f"request {request_id!r}"
        text, ids = self._prompt_ids(prompt, name)
        sp = sampling_params
        stops = self._stop_ids(sp)
        if sp.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this checkpoint has none (use "
                             "stop_token_ids)")
        room = self.max_model_len - len(ids)
        limit = room if sp.max_tokens is None else min(sp.max_tokens, room)
        run_sp = dataclasses.replace(sp, max_tokens=limit, min_tokens=min(sp.min_tokens, limit))
        parent = _Parent(request_id=request_id, prompt=text, prompt_ids=ids, params=sp,
                         metrics=RequestMetrics(arrival_time=time.perf_counter(),
                                                num_prompt_tokens=len(ids)), label=name)
        base_seed = sp.seed if sp.seed is not None else None
        added = []
        try:
            for index in range(sp.n):
                seed = (int(self._seed_rng.integers(0, inputs.SEED_LIMIT)) if base_seed is None
                        else completion_seed(base_seed, index))
                request = Request((request_id, index), ids, run_sp)
                self.scheduler.add(request)  # raises (nothing changed) if it can never fit
                added.append(request.request_id)
                stream = (self.tokenizer.decode_stream(sp.skip_special_tokens)
                          if self.tokenizer is not None else None)
                parent.children.append(_Live(
                    parent=parent, index=index, request=request, stop_ids=stops, stream=stream,
                    sampling=device.RowSampling(
                        temperature=sp.temperature, top_k=max(sp.top_k, 0), top_p=sp.top_p,
                        min_p=sp.min_p, min_tokens=run_sp.min_tokens,
                        presence=sp.presence_penalty, frequency=sp.frequency_penalty,
                        repetition=sp.repetition_penalty, key=inputs.seed_key(seed)),
                    logprobs=[] if sp.logprobs is not None else None,
                    cumulative_logprob=0.0 if sp.logprobs is not None else None))
        except Exception:
            for key in added:
                self.scheduler.abort(key)
            raise
        self._parents[request_id] = parent
        for child in parent.children:
            self._live[child.key] = child
        return request_id

    def abort_request(self, request_id: Hashable) -> RequestOutput:
        """Finish a waiting or running request now (its unfinished completions with finish
        "abort"), freeing its pages. KeyError for an id that is not waiting or running."""
        parent = self._parents.pop(request_id)
        for child in parent.children:
            if child.finish_reason is None:
                self.scheduler.abort(child.key)
                del self._live[child.key]
                child.finish_reason = "abort"
                if child.stream is not None:
                    child.text += child.stream.flush()
        parent.metrics.finished_time = time.perf_counter()
        self.counters["aborted"] += 1
        return self._output(parent)

    def reset_prefix_cache(self) -> int:
        """Forget the prefix cache's pages that no running request holds (for example before
        a measurement that must not hit earlier prompts), the streaming heads' window pages
        too; returns how many pages of the main pool."""
        if self.scheduler.window is not None:
            self.scheduler.window.pool.reset_prefix_cache()
        return self.pool.reset_prefix_cache()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def num_unfinished_requests(self) -> int:
        return len(self._parents)

    def stats(self) -> dict:
        """Engine counters (cumulative) and gauges, for metrics."""
        return dict(self.counters, compile_s=self.compile_s, **self.scheduler.stats())

    # ---- the step --------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; return every request that progressed (new tokens, or a
        finish), in plan order."""
        plan = self.scheduler.schedule(self.num_scheduler_steps)
        now = time.perf_counter()
        for key in plan.preempted:
            self._live[key].parent.metrics.num_preemptions += 1
        for row in plan.rows:
            metrics = self._live[row.request_id].parent.metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now
        results: dict[Hashable, tuple] = {}
        decode = [r for r in plan.rows if r.is_decode]
        prefill = [r for r in plan.rows if not r.is_decode]
        for group in device.group_prefill_rows([len(r.token_ids) for r in prefill],
                                               self.max_num_seqs):
            results.update(self._run([prefill[i] for i in group], decode=False))
        if decode:
            results.update(self._run(decode, decode=True))
        sampled, finished = {}, {}
        for row in plan.rows:
            if not row.sample:
                continue
            live = self._live[row.request_id]
            tokens, reason = self._accept(live, row.num_output_tokens, *results[row.request_id])
            if tokens:
                sampled[row.request_id] = tokens
            if reason is not None:
                finished[row.request_id] = reason
        done = {r.request_id for r in self.scheduler.update(plan, sampled, finished)}
        self.counters["steps"] += 1
        now = time.perf_counter()
        progressed = {}
        for row in plan.rows:
            live = self._live.get(row.request_id)
            if live is None:
                continue
            parent = live.parent
            new = sampled.get(row.request_id, [])
            if new:
                live.new_ids.extend(new)
                parent.metrics.num_generated_tokens += len(new)
                if parent.metrics.first_token_time is None:
                    parent.metrics.first_token_time = now
                    parent.metrics.num_prefix_hit_tokens = live.request.num_prefix_hit_tokens
            if row.request_id in done:
                del self._live[row.request_id]
                live.finish_reason = live.request.finish_reason
                if not isinstance(live.stop_reason, str) and live.stream is not None:
                    live.text += live.stream.flush()  # not cut at a stop string
                self.counters["errors"] += live.finish_reason == "error"
            if new or row.request_id in done:
                progressed[parent.request_id] = parent
        outputs = []
        for parent in progressed.values():
            if parent.finished:
                parent.metrics.finished_time = now
                del self._parents[parent.request_id]
                self.counters["finished"] += 1
            outputs.append(self._output(parent))
        return outputs

    def _accept(self, live: _Live, index: int, tokens: list[int], bad: bool,
                logprobs: list | None) -> tuple[list[int], str | None]:
        """The tokens a completion keeps of those it sampled (output numbers index...), and
        its finish reason if they end it: cut after a stop token, or after the token that
        completes a stop string (the text is cut at the string); "error" if the logits after
        the kept tokens were not finite. Detokenizes and records logprobs as it goes."""
        sp = live.parent.params
        kept, reason = [], None
        for j, token in enumerate(tokens):
            kept.append(token)
            if logprobs is not None and live.logprobs is not None:
                live.logprobs.append(self._logprob_entry(token, logprobs[j], sp.logprobs))
                live.cumulative_logprob += live.logprobs[-1][token].logprob
            if token in live.stop_ids:
                reason = "stop"
                live.stop_reason = token if token in sp.stop_token_ids else None
                if sp.include_stop_str_in_output and live.stream is not None:
                    live.text += live.stream.add(token)
                break
            if live.stream is None:
                continue
            before = len(live.text)
            live.text += live.stream.add(token)
            if sp.stop and index + j + 1 >= sp.min_tokens:
                hit = _find_stop(live.text, sp.stop, before)
                if hit is not None:
                    at, stop = hit
                    live.text = live.text[:at + len(stop) if sp.include_stop_str_in_output else at]
                    live.stop_reason, reason = stop, "stop"
                    break
        if bad and reason is None:
            n = index + len(kept)
            reason = "error"
            live.error = (f"{live.parent.label}: non-finite logits (NaN or inf) for generated "
                          f"token {n}; generation stopped after {n} tokens. The checkpoint may "
                          "be damaged (check it with --verify) or the computation overflowed "
                          "(try float32)")
            log.error(live.error)
        return kept, reason

    def _logprob_entry(self, token: int, row: tuple, k: int) -> dict:
        """{token id: Logprob} of one generated token: itself, then the k most likely."""
        chosen, rank, top_ids, top_vals = row
        text = (lambda t: self.tokenizer.decode([t], skip_special_tokens=False)
                if self.tokenizer is not None else None)
        entry = {token: Logprob(float(chosen), int(rank), text(token))}
        for r, (t, v) in enumerate(zip(top_ids[:k], top_vals[:k])):
            entry.setdefault(int(t), Logprob(float(v), r + 1, text(int(t))))
        return entry

    def _output(self, parent: _Parent) -> RequestOutput:
        """The request's RequestOutput now, handing out what each completion added since the
        last one (the text of a running completion with stop strings keeps back what could
        still start one)."""
        sp = parent.params
        hold = 0 if sp.include_stop_str_in_output else max((len(t) for t in sp.stop), default=1) - 1
        completions = []
        for live in parent.children:
            upto = len(live.text) if live.finish_reason is not None else \
                max(len(live.text) - hold, live.released)
            new_text = live.text[live.released:upto]
            live.released = upto
            completions.append(CompletionOutput(
                index=live.index,
                text=live.text[:upto] if live.stream is not None else None,
                token_ids=list(live.request.output_ids), finish_reason=live.finish_reason,
                stop_reason=live.stop_reason,
                logprobs=list(live.logprobs) if live.logprobs is not None else None,
                cumulative_logprob=live.cumulative_logprob, new_token_ids=live.new_ids,
                new_text=new_text, error=live.error))
            live.new_ids = []
        return RequestOutput(
            request_id=parent.request_id, prompt=parent.prompt,
            prompt_token_ids=list(parent.prompt_ids), outputs=completions,
            finished=parent.finished, metrics=parent.metrics)

    def _run(self, rows: list, *, decode: bool) -> dict[Hashable, tuple]:
        """One device call for `rows` (all decode rows, or all prefill rows); returns each
        row's (sampled tokens, logits not finite after them, per-token logprob rows or None)."""
        width = max(len(r.pages) for r in rows)
        # Few shapes, so few compiles: decode rows in buckets of at least MIN_DECODE_ROWS (a
        # decode step reads every weight whatever its rows), page-table widths of at least
        # MIN_PAGE_COLUMNS pages.
        shape = (device.bucket(len(rows), self.max_num_seqs, MIN_DECODE_ROWS if decode else 1),
                 1 if decode else device.token_bucket(max(len(r.token_ids) for r in rows)),
                 device.bucket(width, self.max_pages_per_seq, MIN_PAGE_COLUMNS))
        entries = 0
        if decode and self.attention.mode == "dense" and self.impl == "xla":
            # The CPU gathers what it reads: each row's own pages, not the widest row's.
            entries = device.bucket(sum(len(r.pages) for r in rows), shape[0] * shape[2],
                                    MIN_PAGE_COLUMNS)
        lives = [self._live[r.request_id] for r in rows]
        history = {r.request_id: (live.request.prompt_ids,
                                  live.request.output_ids[:r.num_output_tokens])
                   for r, live in zip(rows, lives) if live.parent.params.has_penalties}
        k = MAX_LOGPROBS if any(live.logprobs is not None for live in lives) else -1
        batch = device.build_batch(rows, max_seqs=self.max_num_seqs, num_rows=shape[0],
                                   num_tokens=shape[1], num_columns=shape[2],
                                   num_entries=entries, history=history,
                                   sampling={r.request_id: live.sampling
                                             for r, live in zip(rows, lives)},
                                   stop_ids={r.request_id: live.stop_ids
                                             for r, live in zip(rows, lives)},
                                   first_window_page=self.cache.first_window_page)
        if not decode:
            fresh = not any(r.start for r in rows)  # attend within the chunk
            seconds, (tokens, bad, logprobs) = self._call(
                "prefill", dict(fresh=fresh, num_logprobs=k), batch)
            self.counters["prefill_s"] += seconds
            self.counters["prefill_calls"] += 1
            self.counters["prefill_tokens"] += sum(len(r.token_ids) for r in rows)
            return {r.request_id: ([] if bad[i] else [int(tokens[i])], bool(bad[i]),
                                   [tuple(x[i] for x in logprobs)] if logprobs else None)
                    for i, r in enumerate(rows)}
        seconds, (tokens, counts, error_at, logprobs) = self._call(
            "decode", dict(num_steps=self.num_scheduler_steps, num_logprobs=k), batch)
        self.counters["decode_s"] += seconds
        self.counters["decode_calls"] += 1
        self.counters["decode_tokens"] += int(np.sum(np.minimum(counts + (error_at >= 0),
                                                                batch.steps)))
        return {r.request_id: ([int(t) for t in tokens[i, :counts[i]]], bool(error_at[i] >= 0),
                               [tuple(x[i, j] for x in logprobs) for j in range(counts[i])]
                               if logprobs else None)
                for i, r in enumerate(rows)}

    def _call(self, kind: str, static: dict, batch: device.StepBatch) -> tuple[float, tuple]:
        """One device call (sent to the follower processes first when there are any); returns
        (seconds from launch to results on the host, compiles left out; its outputs other than
        the cache, as NumPy arrays)."""
        if self.followers:
            multihost.announce((kind, static, batch))
        compiled = self.compile_s
        t0 = time.perf_counter()
        outputs = multihost.fetch(self.execute(kind, static, batch))
        return time.perf_counter() - t0 - (self.compile_s - compiled), outputs

    def execute(self, kind: str, static: dict, batch: device.StepBatch) -> tuple:
        """Run a "prefill" or "decode" step with its static arguments on `batch` (compiled
        on first use), updating the cache; returns its other outputs (device arrays). The
        leader's `_call` and a follower's loop (`multihost.follow`) both come here."""
        fn = device.prefill_step if kind == "prefill" else device.decode_step
        exe = self._compiled(fn, batch, static)
        self.cache, *outputs = exe(self.params, self.cache, batch)
        return tuple(outputs)

    def release_followers(self) -> None:
        """Tell the follower processes (if any) that no more device calls come, so their
        `multihost.follow` returns; the engine cannot run steps afterwards."""
        if self.followers:
            multihost.announce(multihost.STOP)
            self.followers = False

    def _compiled(self, fn, batch: device.StepBatch, static: dict):
        """The executable of `fn` for this batch's shape bucket, compiled once per process
        (logged): engines of one model, weight dtype, attention config and pool share it."""
        with _COMPILE_LOCK:  # data-parallel replicas step in threads of their own
            return self._compiled_locked(fn, batch, static)

    def _compiled_locked(self, fn, batch: device.StepBatch, static: dict):
        key = (fn.__name__, tuple(sorted(static.items())), self.config, self.attention,
               self.weight_dtype, self.shard, self._state_signature, _signature(batch))
        exe = _SHARED_EXECUTABLES.get(key)
        if exe is not None:
            _SHARED_EXECUTABLES.move_to_end(key)
            return exe
        t0 = time.perf_counter()
        exe = fn.lower(self.params, self.cache, batch, config=self.config,
                       attention=self.attention, shard=self.shard, **static).compile()
        seconds = time.perf_counter() - t0
        self.compile_s += seconds
        log.info("compiled %s for rows, tokens, pages %s%s in %.1f s", fn.__name__, batch.shape,
                 f", {batch.entries.shape[0]} page entries" if batch.entries.shape[0] else "",
                 seconds)
        _SHARED_EXECUTABLES[key] = exe
        while len(_SHARED_EXECUTABLES) > MAX_SHARED_EXECUTABLES:
            _SHARED_EXECUTABLES.popitem(last=False)
        release_executables_if_maps_run_short()
        return exe

    # ---- conveniences ----------------------------------------------------------------------------

    def chat_prompt(self, message: str) -> str:
        """Render one user message with the tokenizer's chat template."""
        return self.render_chat([{"role": "user", "content": message}])

    def render_chat(self, messages: list[dict]) -> str:
        """Render a conversation (checked by `inputs.check_messages`) with the tokenizer's
        chat template, ending with the assistant's generation prompt."""
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer: chat needs one")
        return self.tokenizer.apply_chat_template(inputs.check_messages(messages),
                                                  add_generation_prompt=True)

    def run_until_done(self, request_ids: Sequence[Hashable] | None = None
                       ) -> dict[Hashable, RequestOutput]:
        """Step until the given requests (default: all) finish; their final outputs. KeyError
        for an id that is not waiting or running (it would never finish)."""
        wanted = set(self._parents) if request_ids is None else set(request_ids)
        unknown = wanted - set(self._parents)
        if unknown:
            raise KeyError(f"requests {sorted(map(repr, unknown))[:5]} are not waiting or running")
        final = {}
        while wanted - set(final):
            for out in self.step():
                if out.finished and out.request_id in wanted:
                    final[out.request_id] = out
        return final
