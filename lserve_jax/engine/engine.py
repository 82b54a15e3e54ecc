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
import time
from collections.abc import Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lserve_jax import head_pattern, inputs
from lserve_jax.engine import device
from lserve_jax.engine.pages import PagePool
from lserve_jax.engine.scheduler import PrefillWindow, Request, Scheduler, window_quota
from lserve_jax.sampling import SamplingParams
from lserve_jax.sparsity import SparsityConfig
from models import kv_cache, llama
from models.attention import AttentionConfig

log = logging.getLogger("lserve_jax")

ATTENTION_CHOICES = ("dense", "lserve")
DTYPES = ("float32", "bfloat16", "float16")
CPU_KV_CACHE_GB = 1.0  # default pool on the CPU (no device memory to measure)
GPU_MEMORY_FRACTION = 0.9  # weights plus KV cache, of the device's memory
MIN_DECODE_ROWS = 4
MIN_PAGE_COLUMNS = 8
DEFAULT_SCHEDULER_STEPS = 8  # decode steps per call while nobody waits
MAX_SHARED_EXECUTABLES = 64  # compiled steps kept for the process's engines, least recent out
_SHARED_EXECUTABLES: collections.OrderedDict = collections.OrderedDict()


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


def default_impl() -> str:
    """Pallas kernels on a GPU, their XLA references elsewhere."""
    return "pallas" if jax.default_backend() == "gpu" else "xla"


@dataclasses.dataclass
class RequestMetrics:
    """Timings (time.perf_counter seconds) and counts of one request."""

    arrival_time: float
    num_prompt_tokens: int
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_generated_tokens: int = 0
    num_prefix_hit_tokens: int = 0
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        """Time to first token, from arrival."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.finished_time is None or self.first_token_time is None:
            return None
        if self.num_generated_tokens < 2:
            return None
        return (self.finished_time - self.first_token_time) / (self.num_generated_tokens - 1)

    @property
    def latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclasses.dataclass
class RequestOutput:
    """A request's state after a step (and its result, once `finished`).

    token_ids are all generated ids so far (a stop token included); new_token_ids and new_text
    what this step added. finish_reason: "stop" (stop/EOS token), "length" (max_tokens or the
    context is full), "abort", or "error" (`error` says why); None while running.
    """

    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str | None
    error: str | None = None
    request_id: Hashable = None
    new_token_ids: list[int] = dataclasses.field(default_factory=list)
    new_text: str = ""
    finished: bool = True
    metrics: RequestMetrics | None = None


@dataclasses.dataclass
class _Live:
    """Host state of one request the engine has not finished yet."""

    request: Request
    prompt: str | None
    stop_ids: frozenset[int]
    sampling: tuple
    metrics: RequestMetrics
    stream: object | None
    label: str = ""  # how errors name the request ("request 'a'", "prompt 0")
    text: str = ""
    error: str | None = None


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
    """

    def __init__(self, ckpt: str | None = None, *, attention: str = "dense",
                 dtype: str = "float32", impl: str | None = None, verify: bool = False,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 max_model_len: int | None = None, kv_cache_memory_gb: float | None = None,
                 num_pages: int | None = None, enable_prefix_caching: bool = True,
                 num_scheduler_steps: int = DEFAULT_SCHEDULER_STEPS,
                 long_prefill_token_threshold: int | None = None,
                 **sparsity_knobs):
        if attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention={attention!r} must be one of {ATTENTION_CHOICES}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} must be one of {DTYPES}")
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
        self.impl = impl or default_impl()
        from lserve_jax import checkpoint  # orbax is slow to import; only loading needs it

        self._ckpt = ckpt
        self.compilation_cache = checkpoint.enable_compilation_cache()
        path, self.config, self.params, self.tokenizer = checkpoint.load_model(
            ckpt, dtype=dtype, verify=verify)
        self.checkpoint_path = path
        self.head_pattern = None
        self.attention = self._attention_config()
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
        self._live: dict[Hashable, _Live] = {}
        self._state_signature = _signature((self.params, self.cache))
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

    def _spec(self, attention: AttentionConfig, num_pages: int, num_window_pages: int = 0):
        spec = llama.cache_spec(self.config, attention, num_pages=num_pages,
                                max_seqs=self.max_num_seqs,
                                max_pages_per_seq=self.max_pages_per_seq,
                                dtype=jnp.dtype(self.params["embed"].dtype).name)
        return dataclasses.replace(spec, num_window_pages=num_window_pages)

    def _memory_budget(self, gb: float | None, spec) -> int:
        if gb is not None:
            return int(gb * 2**30)
        free = device.device_memory_for_cache(GPU_MEMORY_FRACTION)
        if free is not None:
            return free
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
        self.capacity_summary = "; ".join(lines)
        log.info("KV cache: %s", self.capacity_summary)

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
        """Queue a request: a prompt (text or token ids) and its SamplingParams. Generation
        ends at a stop token, at `max_tokens`, or when the request fills `max_model_len`
        (finish "length"). Bad input (an empty prompt, ids outside the vocabulary, a prompt
        that leaves no room in the context or can never fit the pool, a duplicate id) raises
        ValueError or TypeError, and nothing changes. Returns the request id (a fresh one
        when `request_id` is None)."""
        return self._add_request(request_id, prompt, sampling_params, None)

    def _add_request(self, request_id, prompt, sampling_params, name: str | None) -> Hashable:
        """`add_request`, with errors about the prompt naming it `name` (default: the id)."""
        if request_id is None:
            request_id = f"req-{next(self._auto_ids)}"
        if request_id in self._live:
            raise ValueError(f"request id {request_id!r} is already waiting or running")
        if sampling_params is None:
            sampling_params = SamplingParams()
        if not isinstance(sampling_params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, not "
                            f"{type(sampling_params).__name__}")
        name = name or f"request {request_id!r}"
        text, ids = self._prompt_ids(prompt, name)
        stops = self._stop_ids(sampling_params)
        room = self.max_model_len - len(ids)
        sp = dataclasses.replace(sampling_params,
                                 max_tokens=min(sampling_params.max_tokens, room))
        seed = sp.seed if sp.seed is not None else int(self._seed_rng.integers(0, inputs.SEED_LIMIT))
        request = Request(request_id, ids, sp)
        self.scheduler.add(request)  # raises (nothing changed) if it can never fit
        self._live[request_id] = _Live(
            request=request, prompt=text, stop_ids=stops, label=name,
            sampling=(sp.temperature, max(sp.top_k, 0), sp.top_p, inputs.seed_key(seed)),
            metrics=RequestMetrics(arrival_time=time.perf_counter(), num_prompt_tokens=len(ids)),
            stream=self.tokenizer.decode_stream() if self.tokenizer is not None else None)
        return request_id

    def abort_request(self, request_id: Hashable) -> RequestOutput:
        """Finish a waiting or running request now (finish "abort"), freeing its pages.
        KeyError for an id that is not waiting or running."""
        request = self.scheduler.abort(request_id)
        live = self._live.pop(request_id)
        live.metrics.finished_time = time.perf_counter()
        self.counters["aborted"] += 1
        return self._output(live, [], finished=True, reason="abort")

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
        return len(self._live)

    def stats(self) -> dict:
        """Engine counters (cumulative) and gauges, for metrics."""
        return dict(self.counters, compile_s=self.compile_s, **self.scheduler.stats())

    # ---- the step --------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; return every request that progressed (new tokens, or a
        finish), in plan order."""
        plan = self.scheduler.schedule(self.num_scheduler_steps)
        now = time.perf_counter()
        for rid in plan.preempted:
            self._live[rid].metrics.num_preemptions += 1
        for row in plan.rows:
            metrics = self._live[row.request_id].metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now
        results: dict[Hashable, tuple[list[int], bool]] = {}
        decode = [r for r in plan.rows if r.is_decode]
        prefill = [r for r in plan.rows if not r.is_decode]
        for group in device.group_prefill_rows([len(r.token_ids) for r in prefill],
                                               self.max_num_seqs):
            results.update(self._run([prefill[i] for i in group], decode=False))
        if decode:
            results.update(self._run(decode, decode=True))
        sampled, finished, errors = {}, {}, {}
        for row in plan.rows:
            if not row.sample:
                continue
            tokens, bad = results[row.request_id]
            live = self._live[row.request_id]
            stop = next((i for i, t in enumerate(tokens) if t in live.stop_ids), None)
            if stop is not None:
                tokens, bad = tokens[:stop + 1], False
                finished[row.request_id] = "stop"
            if tokens:
                sampled[row.request_id] = tokens
            if bad:
                n = row.num_output_tokens + len(tokens)
                finished[row.request_id] = "error"
                errors[row.request_id] = (
                    f"{live.label}: non-finite logits (NaN or inf) for generated "
                    f"token {n}; generation stopped after {n} tokens. The checkpoint may be "
                    "damaged (check it with --verify) or the computation overflowed (try "
                    "float32)")
                log.error(errors[row.request_id])
        done = {r.request_id for r in self.scheduler.update(plan, sampled, finished)}
        self.counters["steps"] += 1
        now = time.perf_counter()
        outputs = []
        for row in plan.rows:
            live = self._live.get(row.request_id)
            if live is None:
                continue
            new = sampled.get(row.request_id, [])
            if new:
                live.metrics.num_generated_tokens += len(new)
                if live.metrics.first_token_time is None:
                    live.metrics.first_token_time = now
                    live.metrics.num_prefix_hit_tokens = live.request.num_prefix_hit_tokens
            if row.request_id in errors:
                live.error = errors[row.request_id]
            if row.request_id in done:
                live.metrics.finished_time = now
                del self._live[row.request_id]
                self.counters["finished"] += 1
                self.counters["errors"] += row.request_id in errors
                outputs.append(self._output(live, new, finished=True,
                                            reason=live.request.finish_reason))
            elif new:
                outputs.append(self._output(live, new, finished=False, reason=None))
        return outputs

    def _output(self, live: _Live, new: list[int], *, finished: bool,
                reason: str | None) -> RequestOutput:
        request = live.request
        ids = list(request.output_ids)
        new_text = ""
        if live.stream is not None:
            new_text = live.stream.step(ids)
            if finished:
                new_text += live.stream.flush(ids)
            live.text += new_text
        return RequestOutput(
            prompt=live.prompt, prompt_token_ids=list(request.prompt_ids), token_ids=ids,
            text=live.text if live.stream is not None else None, finish_reason=reason,
            error=live.error, request_id=request.request_id, new_token_ids=list(new),
            new_text=new_text, finished=finished, metrics=live.metrics)

    def _run(self, rows: list, *, decode: bool) -> dict[Hashable, tuple[list[int], bool]]:
        """One device call for `rows` (all decode rows, or all prefill rows); returns each
        row's (sampled tokens, logits not finite after them)."""
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
        batch = device.build_batch(rows, max_seqs=self.max_num_seqs, num_rows=shape[0],
                                   num_tokens=shape[1], num_columns=shape[2],
                                   num_entries=entries,
                                   sampling={r.request_id: self._live[r.request_id].sampling
                                             for r in rows},
                                   stop_ids={r.request_id: self._live[r.request_id].stop_ids
                                             for r in rows},
                                   first_window_page=self.cache.first_window_page)
        if not decode:
            fresh = not any(r.start for r in rows)  # attend within the chunk
            exe = self._compiled(device.prefill_step, batch, dict(fresh=fresh))
            t0 = time.perf_counter()
            self.cache, tokens, bad = exe(self.params, self.cache, batch)
            tokens, bad = jax.device_get((tokens, bad))
            self.counters["prefill_s"] += time.perf_counter() - t0
            self.counters["prefill_calls"] += 1
            self.counters["prefill_tokens"] += sum(len(r.token_ids) for r in rows)
            return {r.request_id: ([] if bad[i] else [int(tokens[i])], bool(bad[i]))
                    for i, r in enumerate(rows)}
        exe = self._compiled(device.decode_step, batch, dict(num_steps=self.num_scheduler_steps))
        t0 = time.perf_counter()
        self.cache, tokens, counts, error_at = exe(self.params, self.cache, batch)
        tokens, counts, error_at = jax.device_get((tokens, counts, error_at))
        self.counters["decode_s"] += time.perf_counter() - t0
        self.counters["decode_calls"] += 1
        self.counters["decode_tokens"] += int(np.sum(np.minimum(counts + (error_at >= 0),
                                                                batch.steps)))
        return {r.request_id: ([int(t) for t in tokens[i, :counts[i]]], bool(error_at[i] >= 0))
                for i, r in enumerate(rows)}

    def _compiled(self, fn, batch: device.StepBatch, static: dict):
        """The executable of `fn` for this batch's shape bucket, compiled once per process
        (logged): engines of one model, attention config and pool share it."""
        key = (fn.__name__, tuple(sorted(static.items())), self.config, self.attention,
               self._state_signature, _signature(batch))
        exe = _SHARED_EXECUTABLES.get(key)
        if exe is not None:
            _SHARED_EXECUTABLES.move_to_end(key)
            return exe
        t0 = time.perf_counter()
        exe = fn.lower(self.params, self.cache, batch, config=self.config,
                       attention=self.attention, **static).compile()
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
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer: chat needs one")
        return self.tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                                  add_generation_prompt=True)

    def run_until_done(self, request_ids: Sequence[Hashable] | None = None
                       ) -> dict[Hashable, RequestOutput]:
        """Step until the given requests (default: all) finish; their final outputs."""
        wanted = set(self._live) if request_ids is None else set(request_ids)
        final = {}
        while wanted - set(final):
            for out in self.step():
                if out.finished and out.request_id in wanted:
                    final[out.request_id] = out
        return final
