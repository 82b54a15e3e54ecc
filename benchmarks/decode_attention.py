"""Decode attention of one layer: dense paged attention vs LServe (DESIGN §1.3, §1.4; STYLE §12).

    python benchmarks/decode_attention.py [--out PATH.jsonl] [--contexts 8192 ...]
                                          [--batches 1 8] [--small]

GPU: Llama-3-8B attention (32 query heads, 8 KV heads, D=128, bf16), our Pallas paged decode
kernel, batch 1 and 8, contexts 8K..256K. CPU (or --small): same head shape in f32 on the
`impl="xla"` path, batch 1 at 4K..16K and batch 4 at 4K, 8K.

The cache is built directly, as if a prefill had run: every slot holds `context` tokens of random
K/V in pages of 64 tokens whose physical ids are shuffled (a random relabelling of the pool, so no
sequence owns a contiguous run), and the per-logical-page (16 tokens) key max/min are taken from
those keys. Configs, all measured in the same run for each (batch, context):

- dense: `decode_attention(..., selected=None)` in dense mode, every page of all 8 KV heads;
- lserve: 4 streaming KV heads (sink 128 + ring of 256 local tokens) and 4 dense heads attending
  to `token_budget` = 4096 tokens of selected pages; `selector_interval` 1 and 4, page lists per
  KV head ("kv_head") and per query head ("query_head", as LServe does).

One timed call runs `steps` consecutive decode steps of the layer in a `fori_loop` (8 on GPU, so
launch overhead is amortised; 4 on CPU) with the cache donated and carried, as the serving loop
does. A step is DESIGN §1.4 steps 1-3 for the layer: write the new token's K/V (it rewrites the
newest token in place, so the context and the work stay the same from call to call; LServe also
folds the key into its logical page's max/min), then for LServe `select_pages_for_step`, then
`decode_attention`. The selection is recomputed on steps where the clock is a multiple of the
interval and reused otherwise, as `llama.decode` does. The write is cheap (one token), but it
makes every step read a cache the previous step wrote, so XLA can neither merge nor hoist the
page gathers of the steps. Reported: median over calls / steps, which includes one loop
iteration per layer step (the model pays one per token for all its layers).

Bytes per step (the roofline figure; `achieved_gbps` = bytes / time):
- dense: B * Hkv * context * D * 2 (K and V) * itemsize;
- lserve: K and V of dense heads * min(context, budget) + streaming heads * min(context,
  sink + local + one page) tokens, plus the key max/min (pool dtype) of every logical page of the dense
  heads on selection steps, amortised over the interval (none while context <= budget: then the
  selector takes every page without scoring).
`kv_bytes_loaded` counts what the kernel's page lists name: with per-query-head lists each
selected page is named once per query head of its group (G = 4 times), though it is one page.

Writes one JSON line per config with device, backend, JAX version and commit, prints a table of
speed-ups over dense, and plots µs per step vs context next to --out (one panel per batch size).
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.provenance import emit, git_commit  # noqa: E402
from models import kv_cache, llama  # noqa: E402
from models.attention import (  # noqa: E402
    AttentionConfig,
    decode_attention,
    select_pages_for_step,
)
from models.config import LlamaConfig  # noqa: E402

PAGE_SIZE, LOGICAL_PAGE_SIZE = 64, 16
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3-8B attention
GPU_CONTEXTS = (8192, 16384, 32768, 65536, 131072, 262144)
GPU_BATCHES = (1, 8)
# (batch, context) pairs on CPU: about 2.5 minutes on 2 cores.
SMALL_RUNS = ((1, 4096), (1, 8192), (1, 16384), (4, 4096), (4, 8192))
INTERVALS = (1, 4)
PAGE_SELECTIONS = ("kv_head", "query_head")
# HBM bandwidth (GB/s), by a substring of jax's device_kind.
PEAK_GBPS = {"H100 PCIe": 2000.0, "H100": 3350.0, "H200": 4800.0, "A100": 2039.0}
TIME_BUDGET_S = {True: 1.0, False: 0.5}  # per config after warm-up, by on_gpu
MEMORY_CAP_BYTES = 70 * 2**30
# Issue targets on H100 at 256K for LServe (both selections, interval 4 being the default).
TARGET_SPEEDUP, TARGET_US, TARGET_CONTEXT = 40.0, 60.0, 262144


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


def random_cache(config: LlamaConfig, attention: AttentionConfig, *, batch: int, context: int,
                 capacity: int, dtype, seed: int) -> kv_cache.KVCache:
    """A cache whose slots 0..batch-1 each hold `context` tokens of random K/V in every layer.

    Pages for `capacity` >= context tokens are reserved per slot, then the physical page ids
    1..P-1 are relabelled by a random permutation, so a sequence's pages are scattered over the
    pool as after a long run of allocations and releases. Every pool is filled with
    normal(0, 1) keys/values; the key statistics (LServe mode) are the max/min of those keys
    per logical page, so the selector's bounds are consistent with what attention reads.
    `seq_lens` is set to `context`; the selector's clock starts at 0 with no stored selection.
    """
    pages_per_seq = -(-capacity // PAGE_SIZE)
    spec = llama.cache_spec(config, attention, num_pages=batch * pages_per_seq + 1,
                            page_size=PAGE_SIZE, max_seqs=batch, max_pages_per_seq=pages_per_seq,
                            dtype=jnp.dtype(dtype).name, logical_page_size=LOGICAL_PAGE_SIZE)
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
        k = jax.random.normal(kk, cache.k[layer].shape, dtype)
        arrays = dict(k=k, v=jax.random.normal(kv, cache.v[layer].shape, dtype))
        if cache.kmax:
            arrays["kmax"], arrays["kmin"] = _key_stats(k)
        if cache.sk:
            arrays["sk"] = jax.random.normal(ks, cache.sk[layer].shape, dtype)
            arrays["sv"] = jax.random.normal(ksv, cache.sv[layer].shape, dtype)
        cache = cache.replace_layer(layer, **arrays)
        del k, arrays
    return cache


def _steps(cache, qs, new_kv, slots, lengths, clock, *, attention):
    """`len(qs)` decode steps of layer 0: append, select (LServe), attend (DESIGN §1.4 1-3).

    qs [steps, B, Hq, D]; new_kv [steps, 2, B, 1, Hkv, D]; lengths [B] tokens held, the newest
    at lengths - 1. Each step rewrites the newest token's K/V (and, in LServe mode, folds the key
    into its logical page's max/min) in place, as a decode step appends its token, so lengths
    and the work stay the same from call to call. The steps are a `fori_loop` with the cache in
    the carry, like the serving loop: every step reads a cache the previous step wrote, so XLA
    can neither hoist nor merge the page gathers (unrolled steps got theirs merged, and an
    optimisation barrier does not survive XLA's pipeline), and the pools are updated in place
    (unrolled, XLA copied each pool at every write). LServe mode selects pages on steps where
    `clock + step` is a multiple of `selector_interval` and reuses the stored selection
    otherwise, as `llama.decode` does. Returns (cache, summed outputs [B, Hq, D] f32).
    """
    positions = (lengths - 1)[:, None]  # [B, 1]
    valid = jnp.ones_like(positions, bool)
    layout = attention.streaming_layout(PAGE_SIZE) if cache.sk else None
    flags = attention.layer_streaming(0, NUM_KV_HEADS)

    def step(i, carry):
        cache, acc = carry
        cache = kv_cache.write_tokens(cache, 0, slots, positions, valid, lengths, new_kv[i, 0],
                                      new_kv[i, 1], streaming_heads=flags, layout=layout)
        selected = None
        if attention.mode == "lserve":
            need = (clock + i) % attention.selector_interval == 0
            selected = select_pages_for_step(qs[i], cache, slots, lengths, need, layer=0,
                                             config=attention)
            cache = cache.replace_layer(0, selected=cache.selected[0].at[slots].set(selected))
        out = decode_attention(qs[i], cache, slots, lengths, selected, layer=0, config=attention)
        return cache, acc + out.astype(jnp.float32)

    return jax.lax.fori_loop(0, qs.shape[0], step, (cache, jnp.zeros(qs.shape[1:], jnp.float32)))


def step_bytes(*, batch, context, mode, interval, page_selection, itemsize, attention,
               num_streaming) -> dict:
    """Bytes one decode step reads (see the module docstring), and what the page lists name."""
    d, hkv, g = HEAD_DIM, NUM_KV_HEADS, NUM_HEADS // NUM_KV_HEADS
    per_token = 2 * d * itemsize  # K and V of one head
    if mode == "dense":
        kv = batch * hkv * context * per_token
        return dict(kv_bytes=kv, kv_bytes_loaded=kv, stats_bytes=0, bytes_per_step=kv)
    num_dense = hkv - num_streaming
    dense_tokens = min(context, attention.token_budget)
    stream_tokens = min(context, attention.dec_sink_tokens + attention.dec_local_tokens
                        + PAGE_SIZE)
    kv = batch * (num_dense * dense_tokens + num_streaming * stream_tokens) * per_token
    lists = g if page_selection == "query_head" else 1
    loaded = batch * (num_dense * lists * dense_tokens + num_streaming * stream_tokens) * per_token
    # Max and min of every logical page (pool dtype), read only when there is a choice to make.
    stats = (batch * num_dense * (context // LOGICAL_PAGE_SIZE) * d * itemsize * 2
             if context > attention.token_budget else 0)
    return dict(kv_bytes=kv, kv_bytes_loaded=loaded, stats_bytes=stats,
                bytes_per_step=kv + stats / interval)


def cache_bytes(batch, context, itemsize) -> int:
    """Device memory of the dense cache plus the LServe cache (half the heads, plus stats)."""
    dense = batch * NUM_KV_HEADS * context * 2 * HEAD_DIM * itemsize
    stats = batch * (NUM_KV_HEADS // 2) * (context // LOGICAL_PAGE_SIZE) * HEAD_DIM * itemsize * 2
    return dense + dense // 2 + stats


def run_shape(batch, context, args, on_gpu, seed) -> list[dict]:
    """Time dense and every LServe variant at one (batch, context)."""
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    itemsize = jnp.dtype(dtype).itemsize
    impl = "pallas" if on_gpu else "xla"
    config = LlamaConfig(vocab_size=128256, hidden_size=NUM_HEADS * HEAD_DIM,
                         intermediate_size=14336, num_layers=1, num_heads=NUM_HEADS,
                         num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM)
    streaming = (True,) * (NUM_KV_HEADS // 2) + (False,) * (NUM_KV_HEADS // 2)
    dense_cfg = AttentionConfig(mode="dense", impl=impl)
    lserve_cfgs = [AttentionConfig(mode="lserve", impl=impl, streaming_heads=(streaming,),
                                   token_budget=args.budget, selector_interval=n,
                                   page_selection=sel)
                   for sel in PAGE_SELECTIONS for n in INTERVALS]
    base = dict(batch=batch, context=context, Hq=NUM_HEADS, Hkv=NUM_KV_HEADS, D=HEAD_DIM,
                dtype=jnp.dtype(dtype).name, impl=impl, steps_per_call=args.steps)
    rows = [dict(base, mode="dense", interval=None, page_selection=None)]
    rows += [dict(base, mode="lserve", interval=c.selector_interval,
                  page_selection=c.page_selection, num_streaming_heads=sum(streaming),
                  token_budget=c.token_budget, sink_tokens=c.dec_sink_tokens,
                  local_tokens=c.dec_local_tokens) for c in lserve_cfgs]
    if cache_bytes(batch, context, itemsize) > MEMORY_CAP_BYTES:
        need = cache_bytes(batch, context, itemsize) / 2**30
        return [dict(r, status="skipped", error=f"caches need {need:.0f} GiB") for r in rows]

    slots = jnp.arange(batch, dtype=jnp.int32)
    lengths = jnp.full((batch,), context, jnp.int32)
    clock = jnp.zeros((batch,), jnp.int32)
    key_q, key_kv = jax.random.split(jax.random.key(seed))
    qs = jax.random.normal(key_q, (args.steps, batch, NUM_HEADS, HEAD_DIM), dtype)
    new_kv = jax.random.normal(key_kv, (args.steps, 2, batch, 1, NUM_KV_HEADS, HEAD_DIM), dtype)
    records = []
    caches = {}
    for rec, cfg in zip(rows, [dense_cfg] + lserve_cfgs):
        try:
            if cfg.mode not in caches:
                caches.clear()  # the dense cache is done with once LServe starts
                caches[cfg.mode] = random_cache(config, cfg, batch=batch, context=context,
                                                capacity=context, dtype=dtype, seed=seed + 1)
            cache = caches.pop(cfg.mode)  # donated below; the returned one is kept
            if cfg.mode == "lserve":  # page lists per KV head or per query head
                lists = NUM_KV_HEADS // 2 * (NUM_HEADS // NUM_KV_HEADS
                                             if cfg.page_selection == "query_head" else 1)
                k = cfg.budget_pages(PAGE_SIZE)
                cache = cache.replace(selected=(jnp.zeros((batch, lists, k), jnp.int32),))
            fn = jax.jit(functools.partial(_steps, attention=cfg), donate_argnames=("cache",))
            us, compile_s, caches[cfg.mode] = time_steps(
                fn, cache, qs, new_kv, slots, lengths, clock, budget_s=TIME_BUDGET_S[on_gpu])
            del cache
        except Exception as e:  # noqa: BLE001 - record OOMs and unsupported configs, go on
            status = "skipped" if "RESOURCE_EXHAUSTED" in str(e) or "memory" in str(e) else "failed"
            records.append(dict(rec, status=status, error=f"{type(e).__name__}: {str(e)[:300]}"))
            continue
        us /= args.steps
        nbytes = step_bytes(batch=batch, context=context, mode=cfg.mode,
                            interval=cfg.selector_interval, page_selection=cfg.page_selection,
                            itemsize=itemsize, attention=cfg, num_streaming=sum(streaming))
        records.append(dict(rec, status="ok", us_per_step=round(us, 2),
                            compile_s=round(compile_s, 2), **nbytes,
                            achieved_gbps=round(nbytes["bytes_per_step"] / us / 1e3, 2)))
    caches.clear()
    dense_us = records[0].get("us_per_step")
    for rec in records:
        if rec["status"] == "ok" and dense_us:
            rec["speedup_vs_dense"] = round(dense_us / rec["us_per_step"], 3)
    return records


def label(rec) -> str:
    if rec["mode"] == "dense":
        return "dense"
    return f"lserve {rec['page_selection']} i{rec['interval']}"


def print_table(records, on_gpu):
    names = list(dict.fromkeys(label(r) for r in records))
    print(f"{'B':>2} {'context':>7} " + " ".join(f"{n:>22}" for n in names))
    for b, t in dict.fromkeys((r["batch"], r["context"]) for r in records):
        cells = []
        for name in names:
            r = next(r for r in records
                     if (r["batch"], r["context"]) == (b, t) and label(r) == name)
            if r["status"] != "ok":
                cells.append(f"{r['status']:>22}")
            elif r["mode"] == "dense":
                cells.append(f"{r['us_per_step']:>11.1f} us {r['achieved_gbps']:>5.0f}GB/s")
            else:
                cells.append(f"{r['us_per_step']:>11.1f} us {r['speedup_vs_dense']:>6.2f}x")
        print(f"{b:>2} {t:>7} " + " ".join(cells))
    if on_gpu:
        print(f"H100 targets at {TARGET_CONTEXT}: LServe >= {TARGET_SPEEDUP:.0f}x dense and "
              f"<= {TARGET_US:.0f} us per layer")
        for r in records:
            if r["context"] == TARGET_CONTEXT and r["mode"] == "lserve" and r["status"] == "ok":
                ok = r["speedup_vs_dense"] >= TARGET_SPEEDUP and r["us_per_step"] <= TARGET_US
                print(f"  B={r['batch']} {label(r)}: {r['us_per_step']:.1f} us, "
                      f"{r['speedup_vs_dense']:.1f}x -> {'met' if ok else 'NOT met'}")


def plot(records, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = list(dict.fromkeys(r["batch"] for r in records))
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for name in dict.fromkeys(label(r) for r in records):
            pts = [(r["context"], r["us_per_step"]) for r in records
                   if r["batch"] == b and label(r) == name and r["status"] == "ok"]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name,
                        linestyle="-" if name == "dense" else "--")
        ax.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="µs per step",
               title=f"batch {b}")
        contexts = sorted({r["context"] for r in records if r["batch"] == b})
        ax.set_xticks(contexts, [f"{t // 1024}K" for t in contexts])
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    r = records[0]
    fig.suptitle(f"decode attention, one layer (32/8 heads, D=128, {r['dtype']}, {r['impl']}), "
                 f"{r['device']}, jax {r['jax']}, {r['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--contexts", type=int, nargs="+", default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--budget", type=int, default=4096, help="LServe token_budget")
    parser.add_argument("--small", action="store_true", help="CPU-sized runs")
    args = parser.parse_args()

    on_gpu = jax.default_backend() == "gpu"
    small = args.small or not on_gpu
    args.steps = 4 if small else 8  # a multiple of every interval
    if args.contexts or args.batches:
        runs = [(b, t) for b in (args.batches or (1,))
                for t in (args.contexts or (GPU_CONTEXTS if not small else (4096, 8192)))]
    else:
        runs = list(SMALL_RUNS) if small else [(b, t) for b in GPU_BATCHES for t in GPU_CONTEXTS]
    if any(t % PAGE_SIZE for _, t in runs):
        parser.error(f"contexts must be multiples of {PAGE_SIZE}")

    device = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_GBPS.items() if k in device), None) if on_gpu else None
    slug = re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_")
    out = args.out or pathlib.Path(__file__).parent / "results" / f"decode_attention_{slug}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=device, backend=jax.default_backend(), jax=jax.__version__,
                commit=git_commit(), host_cpus=os.cpu_count())
    if small:
        print(f"small run: f32, impl=xla, (batch, context) = {runs}, {args.steps} steps per call")

    records = []
    start = time.perf_counter()
    with out.open("w") as f:
        for i, (b, t) in enumerate(runs):
            load = os.getloadavg()[0]
            for rec in run_shape(b, t, args, on_gpu, seed=100 * i):
                rec = {**meta, "load_avg_1m": round(load, 2), **rec}
                if peak and "achieved_gbps" in rec:
                    rec["fraction_of_peak"] = round(rec["achieved_gbps"] / peak, 3)
                emit(records, f, rec)
    print_table(records, on_gpu)
    plot(records, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
