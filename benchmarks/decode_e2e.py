"""End-to-end decode per token, dense vs LServe, beside the weight-streaming floor (STYLE §12).

    python benchmarks/decode_e2e.py [--out PATH.jsonl] [--contexts 32768 ...] [--small]

GPU: a Llama-3-8B-shaped model (32 layers, hidden 4096, 32 heads, 8 KV heads, D=128,
intermediate 14336, vocab 128256) with random bf16 weights, batch 1, contexts 32K..256K, our
Pallas kernels. CPU (or --small): a scaled-down model with the same head ratios (4 layers,
hidden 1024, 16 heads, 4 KV heads, D=64, intermediate 2816, vocab 32000) in f32 on the
`impl="xla"` path, contexts 2K..32K.

Prefill is skipped: the cache is built as by `benchmarks/decode_attention.random_cache` (random
K/V in every layer's pools on shuffled pages, key statistics consistent with the keys,
`seq_lens` = context). LServe: in every layer half the KV heads are streaming heads (the first
half in even layers, the second half in odd ones), sink 128 + local 256, token budget 4096,
`selector_interval` 4, page lists per KV head (the default). Both modes run
`jax.jit(llama.decode, donate_argnames=("cache",))` on their own returned cache, so pools are
updated in place and the context grows by one token per step (by less than 1% over a run).

Timing: one call compiles and warms up, then blocks of 8 steps (two selection periods) are timed
from the first dispatch to the last step's result; ms per token = median over blocks / 8.

Floor: weight bytes read per token (every parameter once; the embedding table not at all, as the
lookup reads one row) / memory bandwidth measured in the same run as the time of `jnp.sum` over a
2 GiB (GPU) or 512 MiB (CPU) f32 array. `roofline_ms` adds the KV bytes each mode reads per token
(see decode_attention.py: dense every token of every KV head; LServe the budget for dense heads,
sink + local + one page for streaming heads, and the key statistics (pool dtype) amortised over the
interval) to the weights.

Writes one JSON line per (context, mode) with device, backend, JAX version and commit, prints a
table, and plots ms per token vs context with the floor next to --out.
"""

from __future__ import annotations

import argparse
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
from benchmarks.decode_attention import (  # noqa: E402
    LOGICAL_PAGE_SIZE,
    PAGE_SIZE,
    random_cache,
)
from benchmarks.provenance import emit, git_commit  # noqa: E402
from models import llama  # noqa: E402
from models.attention import AttentionConfig  # noqa: E402
from models.config import LlamaConfig  # noqa: E402
from models.params import init_params  # noqa: E402

LLAMA3_8B = dict(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                 intermediate_size=14336, vocab_size=128256)
SMALL_MODEL = dict(num_layers=4, hidden_size=1024, num_heads=16, num_kv_heads=4, head_dim=64,
                   intermediate_size=2816, vocab_size=32000)
GPU_CONTEXTS = (32768, 65536, 131072, 262144)
SMALL_CONTEXTS = (2048, 8192, 16384, 32768)
STEPS_PER_BLOCK = 8  # a multiple of the selector interval
MAX_BLOCKS = {True: 10, False: 3}  # timed blocks, by on_gpu (fewer when over the time budget)
TIME_BUDGET_S = {True: 2.0, False: 1.0}
PROBE_BYTES = {True: 2 * 2**30, False: 512 * 2**20}
MEMORY_CAP_BYTES = 70 * 2**30
# Issue targets on H100 at 256K for LServe.
TARGET_OVER_FLOOR, TARGET_SPEEDUP, TARGET_CONTEXT = 1.15, 2.5, 262144


def measure_bandwidth(nbytes: int) -> float:
    """Memory bandwidth in GB/s: median time of a jitted `jnp.sum` over an f32 array."""
    x = jnp.full((nbytes // 4,), 1.0, jnp.float32)
    total = jax.jit(jnp.sum)
    jax.block_until_ready(total(x))
    times = []
    for _ in range(10):
        start = time.perf_counter()
        jax.block_until_ready(total(x))
        times.append(time.perf_counter() - start)
    del x
    return nbytes / statistics.median(times) / 1e9


def streaming_pattern(config: LlamaConfig) -> tuple[tuple[bool, ...], ...]:
    """Half the KV heads of every layer stream: the first half in even layers, else the second."""
    half = config.num_kv_heads // 2
    first = (True,) * half + (False,) * (config.num_kv_heads - half)
    second = (False,) * (config.num_kv_heads - half) + (True,) * half
    return tuple(first if layer % 2 == 0 else second for layer in range(config.num_layers))


def kv_bytes_per_token(config: LlamaConfig, attention: AttentionConfig, context: int,
                       itemsize: int) -> float:
    """KV (and key-statistics) bytes one decode step reads over all layers, batch 1."""
    per_token = 2 * config.head_dim * itemsize  # K and V of one head
    if attention.mode == "dense":
        return config.num_layers * config.num_kv_heads * context * per_token
    total = 0.0
    for layer in range(config.num_layers):
        num_stream = sum(attention.layer_streaming(layer, config.num_kv_heads))
        num_dense = config.num_kv_heads - num_stream
        stream_tokens = min(context, attention.dec_sink_tokens + attention.dec_local_tokens
                            + PAGE_SIZE)
        total += (num_dense * min(context, attention.token_budget)
                  + num_stream * stream_tokens) * per_token
        if context > attention.token_budget:  # max and min per logical page, pool dtype
            total += (num_dense * (context // LOGICAL_PAGE_SIZE) * config.head_dim * itemsize * 2
                      / attention.selector_interval)
    return total


def time_decode(params, cache, config, attention, on_gpu):
    """Per-token ms of `llama.decode` (median over blocks), compile seconds, block count."""
    step = jax.jit(llama.decode, static_argnames=("config", "attention"),
                   donate_argnames=("cache",))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (1,)),
                         jnp.int32)
    slots, active = jnp.zeros((1,), jnp.int32), jnp.ones((1,), bool)

    start = time.perf_counter()
    cache, logits = step(params, cache, tokens, slots, active, config=config, attention=attention)
    jax.block_until_ready((cache, logits))
    compile_s = time.perf_counter() - start
    times = []
    while len(times) < 3 or (sum(times) < TIME_BUDGET_S[on_gpu]
                             and len(times) < MAX_BLOCKS[on_gpu]):
        start = time.perf_counter()
        for _ in range(STEPS_PER_BLOCK):
            cache, logits = step(params, cache, tokens, slots, active, config=config,
                                 attention=attention)
        jax.block_until_ready((cache, logits))
        times.append(time.perf_counter() - start)
    del cache
    return 1e3 * statistics.median(times) / STEPS_PER_BLOCK, compile_s, len(times)


def run_context(context, params, config, on_gpu, meta):
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    itemsize = jnp.dtype(dtype).itemsize
    impl = "pallas" if on_gpu else "xla"
    attentions = [AttentionConfig(mode="dense", impl=impl),
                  AttentionConfig(mode="lserve", impl=impl, streaming_heads=streaming_pattern(config),
                                  selector_interval=4)]
    # Room for the warm-up step and every timed block.
    capacity = context + STEPS_PER_BLOCK * MAX_BLOCKS[on_gpu] + 1
    records = []
    for attention in attentions:
        rec = dict(meta, context=context, mode=attention.mode, impl=impl, batch=1,
                   steps_per_block=STEPS_PER_BLOCK)
        if attention.mode == "lserve":
            rec.update(selector_interval=attention.selector_interval,
                       page_selection=attention.page_selection,
                       token_budget=attention.token_budget,
                       sink_tokens=attention.dec_sink_tokens,
                       local_tokens=attention.dec_local_tokens, streaming_fraction=0.5)
        dense_bytes = (config.num_layers * config.num_kv_heads * capacity * 2 * config.head_dim
                       * itemsize)
        if dense_bytes + meta["weight_bytes"] > MEMORY_CAP_BYTES:
            rec.update(status="skipped", error=f"cache needs {dense_bytes / 2**30:.0f} GiB")
            records.append(rec)
            continue
        try:
            cache = random_cache(config, attention, batch=1, context=context, capacity=capacity,
                                 dtype=dtype, seed=context)
            ms, compile_s, blocks = time_decode(params, cache, config, attention, on_gpu)
            del cache
        except Exception as e:  # noqa: BLE001 - record OOMs and unsupported configs, go on
            status = "skipped" if "RESOURCE_EXHAUSTED" in str(e) or "memory" in str(e) else "failed"
            rec.update(status=status, error=f"{type(e).__name__}: {str(e)[:300]}")
            records.append(rec)
            continue
        kv = kv_bytes_per_token(config, attention, context, itemsize)
        bw = meta["bandwidth_gbps"]
        roofline = (meta["weight_bytes"] + kv) / bw / 1e6
        rec.update(status="ok", ms_per_token=round(ms, 3), tokens_per_s=round(1e3 / ms, 2),
                   compile_s=round(compile_s, 1), timed_blocks=blocks,
                   kv_bytes_per_token=int(kv),
                   achieved_gbps=round((meta["weight_bytes"] + kv) / ms / 1e6, 2),
                   floor_ms=meta["floor_ms"], ours_over_floor=round(ms / meta["floor_ms"], 3),
                   roofline_ms=round(roofline, 3), ours_over_roofline=round(ms / roofline, 3))
        records.append(rec)
    dense_ms = records[0].get("ms_per_token")
    for rec in records:
        if rec["status"] == "ok" and dense_ms:
            rec["speedup_vs_dense"] = round(dense_ms / rec["ms_per_token"], 3)
    return records


def print_table(records, on_gpu):
    print(f"{'context':>7} {'dense ms':>9} {'lserve ms':>9} {'floor ms':>8} {'dense/floor':>11} "
          f"{'lserve/floor':>12} {'lserve speed-up':>15}")
    for t in dict.fromkeys(r["context"] for r in records):
        d, s = (next(r for r in records if r["context"] == t and r["mode"] == m)
                for m in ("dense", "lserve"))
        if d["status"] != "ok" or s["status"] != "ok":
            print(f"{t:>7} dense {d['status']}, lserve {s['status']}")
            continue
        print(f"{t:>7} {d['ms_per_token']:>9.2f} {s['ms_per_token']:>9.2f} {d['floor_ms']:>8.2f} "
              f"{d['ours_over_floor']:>11.2f} {s['ours_over_floor']:>12.2f} "
              f"{s['speedup_vs_dense']:>14.2f}x")
    if on_gpu:
        print(f"H100 targets at {TARGET_CONTEXT}: LServe <= {TARGET_OVER_FLOOR}x the floor and "
              f">= {TARGET_SPEEDUP}x dense")
        for r in records:
            if r["context"] == TARGET_CONTEXT and r["mode"] == "lserve" and r["status"] == "ok":
                ok = (r["ours_over_floor"] <= TARGET_OVER_FLOOR
                      and r["speedup_vs_dense"] >= TARGET_SPEEDUP)
                print(f"  {r['ours_over_floor']:.2f}x floor, {r['speedup_vs_dense']:.2f}x dense "
                      f"-> {'met' if ok else 'NOT met'}")


def plot(records, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in ("dense", "lserve"):
        ok = [r for r in records if r["mode"] == mode and r["status"] == "ok"]
        if ok:
            line, = ax.plot([r["context"] for r in ok], [r["ms_per_token"] for r in ok],
                            marker="o", label=mode)
            ax.plot([r["context"] for r in ok], [r["roofline_ms"] for r in ok], linestyle=":",
                    color=line.get_color(), label=f"{mode} roofline (weights + KV)")
    r = records[0]
    ax.axhline(r["floor_ms"], color="black", linestyle="--",
               label=f"weight floor {r['floor_ms']:.2f} ms ({r['bandwidth_gbps']:.0f} GB/s)")
    ax.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="ms per token")
    contexts = sorted({r["context"] for r in records})
    ax.set_xticks(contexts, [f"{t // 1024}K" for t in contexts])
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.set_title(f"decode per token, {r['model']}, {r['dtype']}\n{r['device']}, jax {r['jax']}, "
                 f"{r['commit']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--contexts", type=int, nargs="+", default=None)
    parser.add_argument("--small", action="store_true", help="CPU-sized model and contexts")
    args = parser.parse_args()

    on_gpu = jax.default_backend() == "gpu"
    small = args.small or not on_gpu
    dims = SMALL_MODEL if small else LLAMA3_8B
    config = LlamaConfig(**dims, rope_theta=500000.0, max_position_embeddings=2**20)
    contexts = args.contexts or (SMALL_CONTEXTS if small else GPU_CONTEXTS)
    if any(t % PAGE_SIZE for t in contexts):
        parser.error(f"contexts must be multiples of {PAGE_SIZE}")
    dtype = jnp.bfloat16 if on_gpu else jnp.float32

    device = jax.devices()[0].device_kind
    slug = re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_")
    out = args.out or pathlib.Path(__file__).parent / "results" / f"decode_e2e_{slug}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    bandwidth = measure_bandwidth(PROBE_BYTES[on_gpu])
    params = init_params(config, jax.random.key(0), dtype=dtype)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params)) - params["embed"].nbytes
    floor_ms = weight_bytes / bandwidth / 1e6
    model = (f"{config.num_layers}L h{config.hidden_size} {config.num_heads}/"
             f"{config.num_kv_heads} heads D{config.head_dim} i{config.intermediate_size} "
             f"v{config.vocab_size}")
    meta = dict(device=device, backend=jax.default_backend(), jax=jax.__version__,
                commit=git_commit(), host_cpus=os.cpu_count(), model=model,
                dtype=jnp.dtype(dtype).name, weight_bytes=weight_bytes,
                bandwidth_gbps=round(bandwidth, 2), bandwidth_probe_bytes=PROBE_BYTES[on_gpu],
                floor_ms=round(floor_ms, 3))
    print(f"{model}, {jnp.dtype(dtype).name}: {weight_bytes / 2**20:.0f} MiB of weights per "
          f"token, measured bandwidth {bandwidth:.1f} GB/s -> floor {floor_ms:.2f} ms/token")

    records = []
    with out.open("w") as f:
        for t in contexts:
            load = round(os.getloadavg()[0], 2)
            for rec in run_context(t, params, config, on_gpu, meta):
                emit(records, f, {**rec, "load_avg_1m": load})
    print_table(records, on_gpu)
    plot(records, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
