"""Decode attention of one layer: dense paged attention vs LServe (arXiv 2502.14866).

    python benchmarks/decode_attention.py [--out PATH.jsonl] [--plot PATH.png]
                                          [--contexts 8192 ...] [--batches 1 8]
                                          [--variants default query_head_i1 ...]
                                          [--working-set-mib N] [--small]
                                          [--kv-cache-dtypes auto int8 int4]

GPU: Llama-3-8B attention (32 query heads, 8 KV heads, D=128, bf16), our Pallas paged decode
kernel, batch 1 and 8, contexts 8K..256K. CPU (or --small): same head shape in f32 on the
`impl="xla"` path, batch 1 at 4K..16K and batch 4 at 8K. --contexts / --batches pick other
shapes (every batch with every context, in the order given).

Knobs: LServe's shipped defaults, `lserve_jax.sparsity.SparsityConfig()`: pages of 64 tokens,
logical pages of 16, `static_sparsity` 0.5 (KV heads 0-3 stream: sink 128 + ring of 256 local
tokens), dense heads attend to `token_budget` = 4096 tokens of selected pages, reselected every
`selector_interval` = 4 steps, page lists per KV head, `keep_first_pages` = 1. Variants change
only the page lists and the interval: `kv_head_i4` (the shipped default, alias `default`),
`kv_head_i1`, `query_head_i4`, `query_head_i1` ("query_head": one list per query head, as LServe
does); --variants picks some (default: all, the shipped one first). Every record carries every
knob (None where dense attention has no such knob). Dense: `decode_attention(...,
selected=None)` in dense mode, every page of all 8 KV heads, measured first at each shape.

KV cache dtypes (--kv-cache-dtypes, default auto): "auto" pages in the model's dtype; "int8",
"fp8" and "int4" quantized pages (pallas_kernels/quant.py) that the kernel dequantizes in registers,
with the key statistics still in the model's dtype. Every config runs once per KV dtype;
`speedup_vs_auto_kv` is over the same config with "auto" pages in this run.

The cache is built directly, as if a prefill had run: every slot holds `context` tokens of random
K/V on pages whose physical ids are shuffled (a random relabelling of the pool, so no sequence
owns a contiguous run), and the per-logical-page key max/min are taken from those keys.

L2. An LServe step of one layer at 256K reads about 9 MB of K/V (plus 32 MB of key statistics on
selection steps), less than a data-centre GPU's L2 (tens of MB; 60 MB taken as the H200's);
stepping one cache over and over would measure L2, not HBM. So each call cycles through
`rotation` independent sets of `batch` slots, one set per step, as a model steps through its
layers: rotation = ceil(working-set target / bytes per step), the target being 256 MiB on GPU
(over 4x that L2) and 64 MiB with --small. Dense at 256K reads 1 GiB per step, far beyond L2,
and gets rotation 1. Records give `rotation` and `working_set_bytes` (rotation x bytes per step:
what the steps read between two visits of one slot's pages); the rotation is cut to fit the
memory cap (then the working set is below the target, as the record shows).

One timed call runs rotation x `steps` decode steps of the layer in a `fori_loop` (steps = 8
per slot on GPU, so launch overhead is amortised; 4 on CPU; a multiple of every interval) with
the cache donated and carried, as the serving loop does. A step is LServe's decode step
(append, select, attend) for the layer and its set of slots, run by the model's own per-layer
attention `models.attention.attend_layer`: write the new token's K/V (it rewrites the newest
token in place, so the context and the work stay the same from call to call; LServe also folds
the key into its logical page's max/min), then for LServe `select_pages_for_step`, then
`decode_attention`. A slot set's selection is recomputed on its visits whose count is a
multiple of the interval and reused otherwise, as `llama.decode` does. The write is cheap (one
token), but it makes every step read a cache the previous step wrote, so XLA can neither merge
nor hoist the page gathers of the steps.
Reported: median over calls / steps, which includes one loop iteration per layer step (the model
pays one per token for all its layers).

Bytes per step (the roofline figure; `achieved_gbps` = bytes / time):
- dense: B * Hkv * context * (K and V bytes of a token of a head: 2 * D * itemsize; int8
  2 * D; int4 2 * (D / 2 + 4), its float16 scale and zero point included);
- lserve: K and V of dense heads * min(context, budget) + streaming heads * min(context,
  sink + local + one page) tokens, plus the key max/min (pool dtype) of every logical page of the
  dense heads on selection steps, amortised over the interval (none while context <= budget: then
  the selector takes every page without scoring).
`kv_bytes_loaded` counts what the kernel's page lists name: with per-query-head lists each
selected page is named once per query head of its group (G = 4 times), though it is one page.
`floor_us` = bytes per step / the copy bandwidth measured in the same run (`benchmarks/
provenance.py`: a jitted `x + 1` over 2 GiB, read + written bytes; or `LSERVE_COPY_GBPS`), and
`fraction_of_copy_bw` = achieved / copy bandwidth; `speedup_vs_dense` is over the dense record
of the same (batch, context) in this run.

Writes one JSON line per config (flushed as it is measured) with device, backend, JAX version
and commit to --out (default benchmarks/results/decode_attention_<device>.jsonl), prints a
summary with the H200 targets at 256K, and plots µs per step vs context to --plot (default next
to --out; one panel per batch size).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.provenance import copy_bandwidth, device_slug, emit, git_commit  # noqa: E402
from lserve_jax.head_pattern import num_streaming_heads  # noqa: E402
from lserve_jax.sparsity import SparsityConfig  # noqa: E402
from models import kv_cache, llama  # noqa: E402
from models.attention import AttentionConfig, LayerStep, attend_layer  # noqa: E402
from models.config import LlamaConfig  # noqa: E402
from pallas_kernels import quant  # noqa: E402
from pallas_kernels.impls import default_impl  # noqa: E402

SPARSITY = SparsityConfig()  # the shipped knobs
PAGE_SIZE, LOGICAL_PAGE_SIZE = SPARSITY.page_size, SPARSITY.logical_page_size
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3-8B attention
GPU_CONTEXTS = (8192, 16384, 32768, 65536, 131072, 262144)
GPU_BATCHES = (1, 8)
SMALL_RUNS = ((1, 4096), (1, 8192), (1, 16384), (4, 8192))  # (batch, context) on CPU
DEFAULT_VARIANT = f"{SPARSITY.page_selection}_i{SPARSITY.selector_interval}"
VARIANTS = {  # name -> (page_selection, selector_interval); the shipped one first
    DEFAULT_VARIANT: (SPARSITY.page_selection, SPARSITY.selector_interval),
    **{f"{sel}_i{n}": (sel, n) for sel in ("kv_head", "query_head") for n in (4, 1)},
}
WORKING_SET_BYTES = {True: 256 * 2**20, False: 64 * 2**20}  # rotation target, by on_gpu
TIME_BUDGET_S = {True: 1.0, False: 0.5}  # per config after warm-up, by on_gpu
MEMORY_CAP_BYTES = 70 * 2**30
# Targets on an H200 at 256K, batch 1: dense within 1.2x of its byte floor; LServe (shipped
# knobs) at most 15 µs per layer step and at least 20x faster than dense.
TARGET_CONTEXT, TARGET_DENSE_OVER_FLOOR, TARGET_US, TARGET_SPEEDUP = 262144, 1.2, 15.0, 20.0
TARGET_INT8_SPEEDUP = 1.8  # dense paged attention over int8 pages vs bf16 pages, same run


def shipped_attention(impl: str, streaming_heads, **overrides) -> AttentionConfig:
    """LServe's AttentionConfig with the shipped `SparsityConfig` knobs (as `LLM` builds it),
    with `overrides` (e.g. selector_interval, page_selection) replacing some of them."""
    return AttentionConfig(mode="lserve", impl=impl, streaming_heads=streaming_heads,
                           sparsity=dataclasses.replace(SPARSITY, **overrides))


def knob_fields(attention: AttentionConfig, streaming_fraction: float) -> dict:
    """Every knob of a record; the LServe-only ones are None in dense mode."""
    lserve = attention.mode == "lserve"
    s = attention.sparsity
    pick = lambda name: getattr(s, name) if lserve else None  # noqa: E731
    return dict(page_size=s.page_size, logical_page_size=s.logical_page_size,
                token_budget=pick("token_budget"), selector_interval=pick("selector_interval"),
                page_selection=pick("page_selection"), keep_first_pages=pick("keep_first_pages"),
                sink_tokens=pick("dec_sink_tokens"), local_tokens=pick("dec_local_tokens"),
                streaming_fraction=streaming_fraction if lserve else 0.0)


def time_steps(fn, cache, *args, budget_s) -> tuple[float, float, kv_cache.KVCache]:
    """Median wall time of `cache, out = fn(cache, *args)` in µs over at least 3 calls (more
    while within budget_s), seconds of the first call (it compiles and warms up), and the cache
    the last call returned (`fn` donates its cache, so the caller must go on with this one)."""
    start = time.perf_counter()
    cache, out = fn(cache, *args)
    jax.block_until_ready((cache, out))
    compile_s = time.perf_counter() - start
    times = []
    while len(times) < 3 or (sum(times) < budget_s and len(times) < 100):
        start = time.perf_counter()
        cache, out = fn(cache, *args)
        jax.block_until_ready((cache, out))
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times), compile_s, cache


@jax.jit
def _key_stats(k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-logical-page key max/min of a pool: [H, P, S, D] -> two [H, P, S / 16, D], in the
    pool's dtype (as the cache keeps them)."""
    h, p, s, d = k.shape
    blocks = k.reshape(h, p, s // LOGICAL_PAGE_SIZE, LOGICAL_PAGE_SIZE, d)
    return blocks.max(axis=3), blocks.min(axis=3)


KV_SCALE = 0.03  # int8: N(0, 1) values clip past 127 * 0.03 = 3.8 standard deviations


def random_cache(config: LlamaConfig, attention: AttentionConfig, *, batch: int, context: int,
                 capacity: int, dtype, seed: int,
                 kv_cache_dtype: str = "auto") -> kv_cache.KVCache:
    """A cache whose slots 0..batch-1 each hold `context` tokens of random K/V in every layer.

    Pages for `capacity` >= context tokens are reserved per slot, then the physical page ids
    1..P-1 are relabelled by a random permutation, so a sequence's pages are scattered over the
    pool as after a long run of allocations and releases. Every pool is filled with
    normal(0, 1) keys/values; the key statistics (LServe mode) are the max/min of those keys
    per logical page, so the selector's bounds are consistent with what attention reads.
    A quantized cache stores those values quantized (int8 and fp8 with the static
    `KV_SCALE`, int4 per token with smoothing factors 1). `seq_lens` is set to `context`; the
    selector's clock starts at 0 with no stored selection.
    """
    pages_per_seq = -(-capacity // PAGE_SIZE)
    scale = 1.0 if kv_cache_dtype == "int4" else KV_SCALE
    spec = llama.cache_spec(config, attention, num_pages=batch * pages_per_seq + 1,
                            page_size=PAGE_SIZE, max_seqs=batch, max_pages_per_seq=pages_per_seq,
                            dtype=jnp.dtype(dtype).name, kv_cache_dtype=kv_cache_dtype,
                            kv_scales=(((scale, scale),) * config.num_layers
                                       if kv_cache_dtype != "auto" else None))
    cache = kv_cache.init_cache(spec)
    for slot in range(batch):
        cache, ok = kv_cache.reserve(cache, jnp.int32(slot), jnp.int32(capacity))
        if not bool(ok):
            raise RuntimeError(f"could not reserve {capacity} tokens for slot {slot}")
    rng = np.random.default_rng(seed)
    # relabel[p] is the new id of page p; the null page keeps id 0.
    relabel = np.concatenate([[0], 1 + rng.permutation(spec.num_pages - 1)]).astype(np.int32)
    cache = cache.replace(page_table=jnp.asarray(relabel)[cache.page_table],
                          free=cache.free[jnp.asarray(np.argsort(relabel))],
                          seq_lens=jnp.full((batch,), context, jnp.int32))
    key = jax.random.key(seed)
    for layer in range(config.num_layers):
        key, kk, kv, ks, ksv = jax.random.split(key, 5)
        shape = lambda pool: pool[layer].shape[:3] + (config.head_dim,)  # noqa: E731
        k = jax.random.normal(kk, shape(cache.k), dtype)
        arrays = dict(_stored("k", k, kv_cache_dtype),
                      **_stored("v", jax.random.normal(kv, shape(cache.v), dtype), kv_cache_dtype))
        if cache.kmax:
            arrays["kmax"], arrays["kmin"] = _key_stats(k)
        if cache.sk:
            arrays.update(_stored("sk", jax.random.normal(ks, shape(cache.sk), dtype),
                                  kv_cache_dtype))
            arrays.update(_stored("sv", jax.random.normal(ksv, shape(cache.sv), dtype),
                                  kv_cache_dtype))
        cache = cache.replace_layer(layer, **arrays)
        del k, arrays
    return cache


@functools.partial(jax.jit, static_argnames=("name", "kv_cache_dtype"))
def _stored(name: str, x: jax.Array, kv_cache_dtype: str) -> dict:
    """A pool's arrays holding x [H, P, S, D] as a cache of `kv_cache_dtype` stores it."""
    if kv_cache_dtype in ("int8", "fp8"):
        scale = quant.static_scale(kv_cache_dtype, jnp.float32(KV_SCALE))
        return {name: quant.quantize_scaled(x, scale, quant.pool_dtype(kv_cache_dtype))}
    if kv_cache_dtype == "int4":
        packed, scale, zero = quant.quantize_int4(x)
        return {name: packed, f"{name}_scale": jnp.stack([scale, zero], axis=-1)}
    return {name: x}


def _steps(cache, qs, new_kv, lengths, *, attention, batch, rotation):
    """`len(qs)` decode steps of layer 0, step i on slot set i % rotation (slots
    (i % rotation) * batch + 0..batch-1): append, select (LServe), attend.

    qs [steps, B, Hq, D]; new_kv [steps, 2, B, 1, Hkv, D]; lengths [B] tokens held, the newest
    at lengths - 1. Each step rewrites the newest token's K/V (and, in LServe mode, folds the key
    into its logical page's max/min) in place, as a decode step appends its token, so lengths
    and the work stay the same from call to call. The steps are a `fori_loop` with the cache in
    the carry, like the serving loop: every step reads a cache the previous step wrote, so XLA
    can neither hoist nor merge the page gathers (unrolled steps got theirs merged, and an
    optimisation barrier does not survive XLA's pipeline), and the pools are updated in place
    (unrolled, XLA copied each pool at every write). The slot set is an operand, so cycling
    through sets costs no extra compile. LServe mode selects a set's pages on its visits
    i // rotation that are multiples of `selector_interval` and reuses its stored selection
    otherwise, as `llama.decode` does. Returns (cache, summed outputs [B, Hq, D] f32).
    """
    positions = (lengths - 1)[:, None]  # [B, 1]
    valid = jnp.ones_like(positions, bool)
    attention = attention.for_layer(0, NUM_KV_HEADS)
    base = jnp.arange(batch, dtype=jnp.int32)

    def step(i, carry):
        cache, acc = carry
        need = jnp.full((batch,), (i // rotation) % attention.sparsity.selector_interval == 0)
        inputs = LayerStep(slots=(i % rotation) * batch + base, positions=positions,
                           valid=valid, lengths=lengths, cos=None, sin=None, need=need,
                           decode=True)
        # The model's own per-layer attention (store, select, attend), minus the projections.
        cache, out = attend_layer(cache, qs[i][:, None], new_kv[i, 0], new_kv[i, 1], inputs,
                                  config=attention)
        return cache, acc + out[:, 0].astype(jnp.float32)

    return jax.lax.fori_loop(0, qs.shape[0], step, (cache, jnp.zeros(qs.shape[1:], jnp.float32)))


def token_bytes(kv_cache_dtype: str, itemsize: int, head_dim: int = HEAD_DIM) -> int:
    """K and V bytes of one token of one KV head (int4: with its scale and zero point)."""
    return {"int8": 2 * head_dim, "fp8": 2 * head_dim, "int4": 2 * (head_dim // 2 + 4)}.get(
        kv_cache_dtype, 2 * head_dim * itemsize)


def step_bytes(*, batch, context, attention, itemsize, num_streaming,
               kv_cache_dtype="auto") -> dict:
    """Bytes one decode step reads (see the module docstring), and what the page lists name."""
    d, hkv, g = HEAD_DIM, NUM_KV_HEADS, NUM_HEADS // NUM_KV_HEADS
    per_token = token_bytes(kv_cache_dtype, itemsize)  # K and V of one head
    if attention.mode == "dense":
        kv = batch * hkv * context * per_token
        return dict(kv_bytes=kv, kv_bytes_loaded=kv, stats_bytes=0, bytes_per_step=kv)
    num_dense = hkv - num_streaming
    knobs = attention.sparsity
    dense_tokens = min(context, knobs.token_budget)
    stream_tokens = min(context, knobs.dec_sink_tokens + knobs.dec_local_tokens
                        + PAGE_SIZE)
    kv = batch * (num_dense * dense_tokens + num_streaming * stream_tokens) * per_token
    lists = g if knobs.page_selection == "query_head" else 1
    loaded = batch * (num_dense * lists * dense_tokens + num_streaming * stream_tokens) * per_token
    # Max and min of every logical page (pool dtype), read only when there is a choice to make.
    stats = (batch * num_dense * (context // LOGICAL_PAGE_SIZE) * d * itemsize * 2
             if context > knobs.token_budget else 0)
    return dict(kv_bytes=kv, kv_bytes_loaded=loaded, stats_bytes=stats,
                bytes_per_step=kv + stats / knobs.selector_interval)


def slot_bytes(context, mode, num_streaming, itemsize, kv_cache_dtype="auto") -> int:
    """Device memory of one slot's dense-pool pages and key statistics (the streaming pool's
    few pages per slot are left out)."""
    dense_heads = NUM_KV_HEADS - (num_streaming if mode == "lserve" else 0)
    kv = dense_heads * context * token_bytes(kv_cache_dtype, itemsize)
    stats = dense_heads * (context // LOGICAL_PAGE_SIZE) * HEAD_DIM * itemsize * 2
    return kv + (stats if mode == "lserve" else 0)


def rotation_for(bytes_per_step: float, target: int, per_set_bytes: int) -> int:
    """Slot sets to cycle through: enough that rotation x bytes per step >= target, as many as
    the memory cap allows."""
    want = max(1, -(-target // max(1, int(bytes_per_step))))
    return max(1, min(want, MEMORY_CAP_BYTES // max(1, per_set_bytes)))


def run_shape(batch, context, args, on_gpu, bandwidth, seed):
    """Time dense, then every LServe variant, at one (batch, context), once per KV cache dtype;
    yields one record per config as soon as it is measured."""
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    itemsize = jnp.dtype(dtype).itemsize
    impl = default_impl(jax.default_backend())
    config = LlamaConfig(vocab_size=128256, hidden_size=NUM_HEADS * HEAD_DIM,
                         intermediate_size=14336, num_layers=1, num_heads=NUM_HEADS,
                         num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM)
    num_streaming = num_streaming_heads(SPARSITY.static_sparsity, NUM_KV_HEADS)
    streaming = (True,) * num_streaming + (False,) * (NUM_KV_HEADS - num_streaming)
    fraction = num_streaming / NUM_KV_HEADS
    configs = [("dense", AttentionConfig(mode="dense", impl=impl, sparsity=SPARSITY))]
    configs += [(name, shipped_attention(impl, (streaming,), page_selection=sel,
                                         selector_interval=n))
                for name, (sel, n) in ((v, VARIANTS[v]) for v in args.variants)]
    base = dict(batch=batch, context=context, Hq=NUM_HEADS, Hkv=NUM_KV_HEADS, D=HEAD_DIM,
                dtype=jnp.dtype(dtype).name, impl=impl, num_streaming_heads=num_streaming)
    key_q, key_kv = jax.random.split(jax.random.key(seed))
    lengths = jnp.full((batch,), context, jnp.int32)
    auto_us = {}  # config name -> µs per step with "auto" pages
    for kv_dtype in args.kv_cache_dtypes:
        nbytes = {name: step_bytes(batch=batch, context=context, attention=cfg,
                                   itemsize=itemsize, num_streaming=num_streaming,
                                   kv_cache_dtype=kv_dtype) for name, cfg in configs}
        per_slot = {mode: slot_bytes(context, mode, num_streaming, itemsize, kv_dtype)
                    for mode in ("dense", "lserve")}
        # One cache per mode, shared by its configs: cycle enough slot sets for the one
        # reading least.
        rotation = {}
        for mode in ("dense", "lserve"):
            per_step = [nbytes[n]["bytes_per_step"] for n, c in configs if c.mode == mode]
            if per_step:
                rotation[mode] = rotation_for(min(per_step), args.working_set,
                                              batch * per_slot[mode])
        dense_us = None
        caches = {}
        for name, cfg in configs:
            rot = rotation[cfg.mode]
            steps = rot * args.steps
            rec = dict(base, kv_cache_dtype=kv_dtype, mode=cfg.mode, variant=name,
                       **knob_fields(cfg, fraction), rotation=rot, steps_per_call=steps,
                       working_set_bytes=int(rot * nbytes[name]["bytes_per_step"]),
                       working_set_target_bytes=args.working_set)
            need = rot * batch * per_slot[cfg.mode]
            if need > MEMORY_CAP_BYTES:
                yield dict(rec, status="skipped", error=f"caches need {need / 2**30:.0f} GiB")
                continue
            try:
                if cfg.mode not in caches:
                    caches.clear()  # the dense cache is done with once LServe starts
                    caches[cfg.mode] = random_cache(
                        config, cfg, batch=rot * batch, context=context, capacity=context,
                        dtype=dtype, seed=seed + 1, kv_cache_dtype=kv_dtype)
                cache = caches.pop(cfg.mode)  # donated below; the returned one is kept
                if cfg.mode == "lserve":  # page lists per KV head or per query head, none stored
                    lists = (NUM_KV_HEADS - num_streaming) * (
                        NUM_HEADS // NUM_KV_HEADS
                        if cfg.sparsity.page_selection == "query_head" else 1)
                    cache = cache.replace(selected=(jnp.zeros(
                        (rot * batch, lists, cfg.sparsity.budget_pages), jnp.int32),))
                qs = jax.random.normal(key_q, (steps, batch, NUM_HEADS, HEAD_DIM), dtype)
                new_kv = jax.random.normal(key_kv, (steps, 2, batch, 1, NUM_KV_HEADS,
                                                    HEAD_DIM), dtype)
                fn = jax.jit(functools.partial(_steps, attention=cfg, batch=batch, rotation=rot),
                             donate_argnames=("cache",))
                us, compile_s, caches[cfg.mode] = time_steps(
                    fn, cache, qs, new_kv, lengths, budget_s=TIME_BUDGET_S[on_gpu])
                del cache
            except Exception as e:  # noqa: BLE001 - record OOMs and unsupported configs, go on
                status = ("skipped" if "RESOURCE_EXHAUSTED" in str(e) or "memory" in str(e)
                          else "failed")
                yield dict(rec, status=status, error=f"{type(e).__name__}: {str(e)[:300]}")
                continue
            us /= steps
            floor_us = nbytes[name]["bytes_per_step"] / bandwidth / 1e3
            achieved = nbytes[name]["bytes_per_step"] / us / 1e3
            rec.update(status="ok", us_per_step=round(us, 2), compile_s=round(compile_s, 2),
                       **nbytes[name], achieved_gbps=round(achieved, 2),
                       fraction_of_copy_bw=round(achieved / bandwidth, 3),
                       floor_us=round(floor_us, 2), us_over_floor=round(us / floor_us, 3))
            if cfg.mode == "dense":
                dense_us = us
            elif dense_us:
                rec["speedup_vs_dense"] = round(dense_us / us, 3)
            if kv_dtype == "auto":
                auto_us[name] = us
            elif name in auto_us:
                rec["speedup_vs_auto_kv"] = round(auto_us[name] / us, 3)
            yield rec
        caches.clear()


def label(rec) -> str:
    kv = rec.get("kv_cache_dtype", "auto")
    name = "dense" if rec["mode"] == "dense" else f"lserve {rec['variant']}"
    return name if kv == "auto" else f"{name} kv {kv}"


def print_summary(records, on_gpu):
    print(f"{'B':>2} {'context':>7} {'config':<30} {'rot':>3} {'us/step':>9} {'floor us':>9} "
          f"{'GB/s':>7} {'of copy':>7} {'vs dense':>8} {'vs auto kv':>10}")
    for r in records:
        head = f"{r['batch']:>2} {r['context']:>7} {label(r):<30} {r['rotation']:>3}"
        if r["status"] != "ok":
            print(f"{head} {r['status']}: {r.get('error', '')[:80]}")
            continue
        speedup = f"{r['speedup_vs_dense']:>7.1f}x" if "speedup_vs_dense" in r else f"{'':>8}"
        vs_auto = (f"{r['speedup_vs_auto_kv']:>9.2f}x" if "speedup_vs_auto_kv" in r
                   else f"{'':>10}")
        print(f"{head} {r['us_per_step']:>9.1f} {r['floor_us']:>9.1f} {r['achieved_gbps']:>7.0f} "
              f"{r['fraction_of_copy_bw']:>7.2f} {speedup} {vs_auto}")
    if not on_gpu:
        return
    print(f"H200 targets at {TARGET_CONTEXT}, B=1: dense <= {TARGET_DENSE_OVER_FLOOR}x its byte "
          f"floor; LServe ({DEFAULT_VARIANT}) <= {TARGET_US:.0f} us per layer step and >= "
          f"{TARGET_SPEEDUP:.0f}x dense")
    for r in records:
        if r["context"] != TARGET_CONTEXT or r["batch"] != 1 or r["status"] != "ok":
            continue
        if r.get("kv_cache_dtype", "auto") == "int8" and r["mode"] == "dense":
            if "speedup_vs_auto_kv" in r:
                ok = r["speedup_vs_auto_kv"] >= TARGET_INT8_SPEEDUP
                print(f"  dense int8 KV: {r['us_per_step']:.1f} us, {r['speedup_vs_auto_kv']:.2f}x "
                      f"the bf16 KV (target >= {TARGET_INT8_SPEEDUP}x) -> "
                      f"{'met' if ok else 'NOT met'}")
            continue
        if r.get("kv_cache_dtype", "auto") != "auto":
            continue
        if r["mode"] == "dense":
            ok = r["us_over_floor"] <= TARGET_DENSE_OVER_FLOOR
            print(f"  dense: {r['us_per_step']:.1f} us, {r['us_over_floor']:.2f}x floor "
                  f"-> {'met' if ok else 'NOT met'}")
        elif "speedup_vs_dense" in r:
            ok = r["us_per_step"] <= TARGET_US and r["speedup_vs_dense"] >= TARGET_SPEEDUP
            print(f"  {label(r)}: {r['us_per_step']:.1f} us, {r['speedup_vs_dense']:.1f}x dense "
                  f"-> {'met' if ok else 'NOT met'}")


def plot(records, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = list(dict.fromkeys(r["batch"] for r in records))
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for name in dict.fromkeys(label(r) for r in records):
            pts = sorted((r["context"], r["us_per_step"]) for r in records
                         if r["batch"] == b and label(r) == name and r["status"] == "ok")
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name,
                        linestyle="-" if name == "dense" else "--")
        floor = sorted((r["context"], r["floor_us"]) for r in records
                       if r["batch"] == b and r["mode"] == "dense" and r["status"] == "ok")
        if floor:
            ax.plot(*zip(*floor), color="black", linestyle=":", marker="_",
                    label="dense byte floor")
        ax.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="µs per step",
               title=f"batch {b}")
        contexts = sorted({r["context"] for r in records if r["batch"] == b})
        ax.set_xticks(contexts, [f"{t // 1024}K" for t in contexts])
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    r = records[0]
    fig.suptitle(f"decode attention, one layer (32/8 heads, D=128, {r['dtype']}, {r['impl']}), "
                 f"{r['device']}, copy {r['copy_gbps']:.0f} GB/s, jax {r['jax']}, {r['commit']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--plot", type=pathlib.Path, default=None,
                        help="where the png goes (default: next to --out)")
    parser.add_argument("--contexts", type=int, nargs="+", default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                        choices=["default", *VARIANTS], help="LServe variants to time")
    parser.add_argument("--working-set-mib", type=int, default=None,
                        help="rotation target (default 256 on GPU, 64 with --small)")
    parser.add_argument("--small", action="store_true", help="CPU-sized runs")
    parser.add_argument("--kv-cache-dtypes", nargs="+", default=["auto"],
                        choices=quant.KV_CACHE_DTYPES,
                        help="KV cache dtypes to time (auto first: the others are compared "
                        "with it)")
    args = parser.parse_args()
    args.kv_cache_dtypes = list(dict.fromkeys(args.kv_cache_dtypes))

    on_gpu = jax.default_backend() == "gpu"
    small = args.small or not on_gpu
    args.steps = 4 if small else 8  # per slot set; a multiple of every interval
    args.variants = list(dict.fromkeys(DEFAULT_VARIANT if v == "default" else v
                                       for v in args.variants))
    args.working_set = (args.working_set_mib * 2**20 if args.working_set_mib
                        else WORKING_SET_BYTES[not small])
    if args.contexts or args.batches:
        runs = [(b, t) for b in (args.batches or (1,))
                for t in (args.contexts or (GPU_CONTEXTS if not small else (4096, 8192)))]
    else:
        runs = list(SMALL_RUNS) if small else [(b, t) for b in GPU_BATCHES for t in GPU_CONTEXTS]
    if any(t % PAGE_SIZE for _, t in runs):
        parser.error(f"contexts must be multiples of {PAGE_SIZE}")

    device = jax.devices()[0].device_kind
    out = args.out or (pathlib.Path(__file__).parent / "results"
                       / f"decode_attention_{device_slug(device)}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    bandwidth, source, probe = copy_bandwidth(on_gpu and not small)
    meta = dict(device=device, backend=jax.default_backend(), jax=jax.__version__,
                commit=git_commit(), host_cpus=os.cpu_count(), copy_gbps=round(bandwidth, 1),
                copy_gbps_source=source, copy_probe_bytes=probe)
    print(f"{device}: copy bandwidth {bandwidth:.1f} GB/s ({source}); (batch, context) = {runs}, "
          f"variants {args.variants}, {args.steps} steps per slot set, working-set target "
          f"{args.working_set / 2**20:.0f} MiB")

    records = []
    with out.open("w") as f:
        for i, (b, t) in enumerate(runs):
            load = round(os.getloadavg()[0], 2)
            for rec in run_shape(b, t, args, on_gpu, bandwidth, seed=100 * i):
                emit(records, f, {**meta, "load_avg_1m": load, **rec})
    print_summary(records, on_gpu)
    png = args.plot or out.with_suffix(".png")
    plot(records, png)
    print(f"wrote {out} and {png} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
