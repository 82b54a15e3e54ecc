"""End-to-end decode per token, dense vs LServe, beside the weight-streaming floor.

    python benchmarks/decode_e2e.py [--out PATH.jsonl] [--plot PATH.png] [--contexts 32768 ...]
                                    [--modes dense lserve] [--small]
                                    [--quant auto:auto,int8:int8]

GPU: a Llama-3-8B-shaped model (32 layers, hidden 4096, 32 heads, 8 KV heads, D=128,
intermediate 14336, vocab 128256) with random bf16 weights, batch 1, contexts 32K..256K, our
Pallas kernels. CPU (or --small): a scaled-down model with the same head ratios (4 layers,
hidden 1024, 16 heads, 4 KV heads, D=64, intermediate 2816, vocab 32000) in f32 on the
`impl="xla"` path, contexts 2K..32K.

Prefill is skipped: the cache is built as by `benchmarks/decode_attention.random_cache` (random
K/V in every layer's pools on shuffled pages, key statistics consistent with the keys,
`seq_lens` = context). LServe runs the shipped knobs (`lserve_jax.sparsity.SparsityConfig()`:
pages of 64 tokens, logical pages of 16, sink 128 + local 256, token budget 4096,
`selector_interval` 4, page lists per KV head, `keep_first_pages` 1) with `static_sparsity` 0.5
of the KV heads of every layer streaming (the first half in even layers, the second half in odd
ones); every record carries the knobs. Both modes run `jax.jit(llama.decode,
donate_argnames=("cache",))` on their own returned cache, so pools are updated in place and the
context grows by one token per step (by less than 1% over a run). The 32 layers' caches are
distinct memory, so consecutive steps do not find each other's pages in L2. --modes sets which
modes run and in which order (default dense, then LServe); whichever of the two runs second
carries the speed-up (`speedup_vs_dense` on LServe, `lserve_speedup_vs_dense` on dense).

Quantization: every mode runs with every KV-cache:weight dtype pair of --quant (the syntax of
`python -m lserve_jax.eval`; default auto:auto), the pairs inside each mode. int8 weights
(models/weight_quant.py: every layer's linear weights per output channel; embedding and LM
head in the model dtype) have their own weight floor; int8 / fp8 / int4 KV pages
(pallas_kernels/quant.py) shrink the KV bytes. A record's `speedup_vs_auto` is over the same
mode with float weights and KV in this run; the speed-up over dense pairs records of one (KV,
weight) pair.

Timing: one call compiles and warms up, then blocks of 8 steps (two selection periods) are timed
from the first dispatch to the last step's result; ms per token = median over blocks / 8.

Floor: weight bytes read per token (every parameter once; the embedding table not at all, as the
lookup reads one row) / the copy bandwidth measured in the same run (`benchmarks/provenance.py`:
a jitted `x + 1` over 2 GiB, read + written bytes; or `LSERVE_COPY_GBPS` where gpu_checks.sh
measured it). `roofline_ms` adds the KV bytes each mode reads per token (see
decode_attention.py: dense every token of every KV head; LServe the budget for dense heads,
sink + local + one page for streaming heads, and the key statistics (pool dtype) amortised over
the interval) to the weights; `fraction_of_copy_bw` = (weights + KV bytes) / time / copy
bandwidth.

Writes one JSON line per (context, mode), flushed as it is measured, with device, backend, JAX
version and commit to --out (default benchmarks/results/decode_e2e_<device>.jsonl), prints a
table with the H200 targets at 256K, and plots ms per token vs context with the floor to --plot
(default next to --out).
"""

from __future__ import annotations

import argparse
import os
import pathlib
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
    SPARSITY,
    knob_fields,
    random_cache,
    shipped_attention,
    token_bytes,
)
from benchmarks.provenance import copy_bandwidth, device_slug, emit, git_commit  # noqa: E402
from lserve_jax.head_pattern import num_streaming_heads  # noqa: E402
from models import llama  # noqa: E402
from models.attention import AttentionConfig  # noqa: E402
from models.config import LlamaConfig  # noqa: E402
from models.params import init_params  # noqa: E402
from pallas_kernels.impls import default_impl  # noqa: E402
from lserve_jax.eval import parse_quant  # noqa: E402
from models.weight_quant import quantize_params, weight_bytes  # noqa: E402

LLAMA3_8B = dict(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                 intermediate_size=14336, vocab_size=128256)
SMALL_MODEL = dict(num_layers=4, hidden_size=1024, num_heads=16, num_kv_heads=4, head_dim=64,
                   intermediate_size=2816, vocab_size=32000)
GPU_CONTEXTS = (32768, 65536, 131072, 262144)
SMALL_CONTEXTS = (2048, 8192, 16384, 32768)
MODES = ("dense", "lserve")
STEPS_PER_BLOCK = 8  # a multiple of the selector interval
MAX_BLOCKS = {True: 10, False: 3}  # timed blocks, by on_gpu (fewer when over the time budget)
TIME_BUDGET_S = {True: 2.0, False: 1.0}
MEMORY_CAP_BYTES = 70 * 2**30
# Targets on an H200 at 256K for LServe (shipped knobs): at most 1.3x the weight floor and at
# least 2.5x faster than dense; with int8 weights and int8 KV, at most 1.3x its own (int8)
# weight floor.
TARGET_OVER_FLOOR, TARGET_SPEEDUP, TARGET_CONTEXT = 1.3, 2.5, 262144


def streaming_pattern(config: LlamaConfig) -> tuple[tuple[bool, ...], ...]:
    """`static_sparsity` of every layer's KV heads stream: the first ones in even layers, the
    last ones in odd layers."""
    n = num_streaming_heads(SPARSITY.static_sparsity, config.num_kv_heads)
    first = (True,) * n + (False,) * (config.num_kv_heads - n)
    return tuple(first if layer % 2 == 0 else first[::-1] for layer in range(config.num_layers))


def kv_bytes_per_token(config: LlamaConfig, attention: AttentionConfig, context: int,
                       itemsize: int, kv_cache_dtype: str = "auto") -> float:
    """KV (and key-statistics) bytes one decode step reads over all layers, batch 1."""
    per_token = token_bytes(kv_cache_dtype, itemsize, config.head_dim)  # K and V of one head
    if attention.mode == "dense":
        return config.num_layers * config.num_kv_heads * context * per_token
    s = attention.sparsity
    total = 0.0
    for layer in range(config.num_layers):
        num_stream = sum(attention.layer_streaming(layer, config.num_kv_heads))
        num_dense = config.num_kv_heads - num_stream
        stream_tokens = min(context, s.dec_sink_tokens + s.dec_local_tokens
                            + PAGE_SIZE)
        total += (num_dense * min(context, s.token_budget)
                  + num_stream * stream_tokens) * per_token
        if context > s.token_budget:  # max and min per logical page, pool dtype
            total += (num_dense * (context // LOGICAL_PAGE_SIZE) * config.head_dim * itemsize * 2
                      / s.selector_interval)
    return total


def cache_bytes(config: LlamaConfig, attention: AttentionConfig, capacity: int,
                itemsize: int, kv_cache_dtype: str = "auto") -> int:
    """Device memory of a mode's dense pools and key statistics (streaming pages left out)."""
    heads = sum(config.num_kv_heads - sum(attention.layer_streaming(layer, config.num_kv_heads))
                for layer in range(config.num_layers))
    kv = heads * capacity * token_bytes(kv_cache_dtype, itemsize, config.head_dim)
    stats = heads * (capacity // LOGICAL_PAGE_SIZE) * config.head_dim * itemsize * 2
    return kv + (stats if attention.mode == "lserve" else 0)


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


def run_context(context, modes, pairs, weights, config, on_gpu, meta):
    """Time each mode at one context, in the order of `modes`, with each (KV cache dtype,
    weight dtype) of `pairs`; `weights` maps a weight dtype to (params, its meta: weight bytes
    and floor). Yields one record per measurement as soon as it is measured."""
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    itemsize = jnp.dtype(dtype).itemsize
    impl = default_impl(jax.default_backend())
    attentions = {"dense": AttentionConfig(mode="dense", impl=impl, sparsity=SPARSITY),
                  "lserve": shipped_attention(impl, streaming_pattern(config))}
    num_kv = config.num_kv_heads
    fraction = num_streaming_heads(SPARSITY.static_sparsity, num_kv) / num_kv
    # Room for the warm-up step and every timed block.
    capacity = context + STEPS_PER_BLOCK * MAX_BLOCKS[on_gpu] + 1
    measured = {}  # (mode, kv dtype, weight dtype) -> ms per token
    for mode in modes:
        for kv_dtype, weight_dtype in pairs:
            params, wmeta = weights[weight_dtype]
            attention = attentions[mode]
            rec = dict(meta, **wmeta, context=context, mode=mode, impl=impl, batch=1,
                       weight_dtype=weight_dtype, kv_cache_dtype=kv_dtype,
                       steps_per_block=STEPS_PER_BLOCK, **knob_fields(attention, fraction))
            need = cache_bytes(config, attention, capacity, itemsize, kv_dtype)
            if need + wmeta["weight_bytes"] > MEMORY_CAP_BYTES:
                yield dict(rec, status="skipped", error=f"cache needs {need / 2**30:.0f} GiB")
                continue
            try:
                cache = random_cache(config, attention, batch=1, context=context,
                                     capacity=capacity, dtype=dtype, seed=context,
                                     kv_cache_dtype=kv_dtype)
                ms, compile_s, blocks = time_decode(params, cache, config, attention, on_gpu)
                del cache
            except Exception as e:  # noqa: BLE001 - record OOMs and unsupported configs
                status = ("skipped" if "RESOURCE_EXHAUSTED" in str(e) or "memory" in str(e)
                          else "failed")
                yield dict(rec, status=status, error=f"{type(e).__name__}: {str(e)[:300]}")
                continue
            kv = kv_bytes_per_token(config, attention, context, itemsize, kv_dtype)
            total = wmeta["weight_bytes"] + kv
            roofline = total / meta["copy_gbps"] / 1e6
            rec.update(status="ok", ms_per_token=round(ms, 3),
                       tokens_per_s=round(1e3 / ms, 2), compile_s=round(compile_s, 1),
                       timed_blocks=blocks, kv_bytes_per_token=int(kv),
                       achieved_gbps=round(total / ms / 1e6, 2),
                       fraction_of_copy_bw=round(total / ms / 1e6 / meta["copy_gbps"], 3),
                       ours_over_floor=round(ms / wmeta["floor_ms"], 3),
                       roofline_ms=round(roofline, 3),
                       ours_over_roofline=round(ms / roofline, 3))
            measured[mode, kv_dtype, weight_dtype] = ms
            other = "dense" if mode == "lserve" else "lserve"
            if (other, kv_dtype, weight_dtype) in measured:
                key = "speedup_vs_dense" if mode == "lserve" else "lserve_speedup_vs_dense"
                ms_by_mode = {mode: ms, other: measured[other, kv_dtype, weight_dtype]}
                rec[key] = round(ms_by_mode["dense"] / ms_by_mode["lserve"], 3)
            if (kv_dtype, weight_dtype) != ("auto", "auto") and (mode, "auto", "auto") in measured:
                rec["speedup_vs_auto"] = round(measured[mode, "auto", "auto"] / ms, 3)
            yield rec


def label(rec) -> str:
    quant = "".join(f" {name}{rec.get(key, 'auto')}" for name, key in
                    (("w", "weight_dtype"), ("kv", "kv_cache_dtype"))
                    if rec.get(key, "auto") != "auto")
    return rec["mode"] + quant


def print_table(records, on_gpu):
    print(f"{'context':>7} {'config':>22} {'ms/token':>9} {'floor ms':>8} {'x floor':>7} "
          f"{'roofline':>8} {'GB/s':>6} {'of copy':>7} {'lserve speed-up':>15} {'vs float':>8}")
    for r in records:
        head = f"{r['context']:>7} {label(r):>22}"
        if r["status"] != "ok":
            print(f"{head} {r['status']}: {r.get('error', '')[:80]}")
            continue
        speedup = r.get("speedup_vs_dense", r.get("lserve_speedup_vs_dense"))
        print(f"{head} {r['ms_per_token']:>9.2f} {r['floor_ms']:>8.2f} "
              f"{r['ours_over_floor']:>7.2f} {r['roofline_ms']:>8.2f} {r['achieved_gbps']:>6.0f} "
              f"{r['fraction_of_copy_bw']:>7.2f} "
              + (f"{speedup:>14.2f}x" if speedup is not None else f"{'':>15}")
              + (f" {r['speedup_vs_auto']:>7.2f}x" if "speedup_vs_auto" in r else ""))
    if not on_gpu:
        return
    print(f"H200 targets at {TARGET_CONTEXT}: LServe <= {TARGET_OVER_FLOOR}x the weight floor and "
          f">= {TARGET_SPEEDUP}x dense")
    quantized = [r for r in records if r["context"] == TARGET_CONTEXT and r["status"] == "ok"
                 and r["mode"] == "lserve" and r["weight_dtype"] == "int8"
                 and r["kv_cache_dtype"] == "int8"]
    for r in quantized:
        met = r["ours_over_floor"] <= TARGET_OVER_FLOOR
        print(f"  LServe, int8 weights and KV: {r['ms_per_token']:.2f} ms, "
              f"{r['ours_over_floor']:.2f}x its weight floor ({r['floor_ms']:.2f} ms) -> "
              f"{'met' if met else 'NOT met'}")
    at = [r for r in records if r["context"] == TARGET_CONTEXT and r["status"] == "ok"
          and r["weight_dtype"] == "auto" and r["kv_cache_dtype"] == "auto"]
    lserve = next((r for r in at if r["mode"] == "lserve"), None)
    speedup = next((r.get("speedup_vs_dense", r.get("lserve_speedup_vs_dense")) for r in at
                    if "speedup_vs_dense" in r or "lserve_speedup_vs_dense" in r), None)
    if lserve is not None:
        met = lserve["ours_over_floor"] <= TARGET_OVER_FLOOR
        print(f"  LServe {lserve['ms_per_token']:.2f} ms, {lserve['ours_over_floor']:.2f}x floor "
              f"-> {'met' if met else 'NOT met'}")
    if speedup is not None:
        print(f"  LServe {speedup:.2f}x dense -> "
              f"{'met' if speedup >= TARGET_SPEEDUP else 'NOT met'}")


def plot(records, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(label(r) for r in records):
        ok = sorted((r for r in records if label(r) == name and r["status"] == "ok"),
                    key=lambda r: r["context"])
        if ok:
            line, = ax.plot([r["context"] for r in ok], [r["ms_per_token"] for r in ok],
                            marker="o", label=name)
            ax.plot([r["context"] for r in ok], [r["roofline_ms"] for r in ok], linestyle=":",
                    color=line.get_color(), label=f"{name} roofline (weights + KV)")
    r = records[0]
    for floor, weights in dict.fromkeys((x["floor_ms"], x.get("weight_dtype", "auto"))
                                        for x in records):
        ax.axhline(floor, color="black", linestyle="--" if weights == "auto" else "-.",
                   label=f"{weights} weight floor {floor:.2f} ms ({r['copy_gbps']:.0f} GB/s "
                   "copy)")
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
    parser.add_argument("--plot", type=pathlib.Path, default=None,
                        help="where the png goes (default: next to --out)")
    parser.add_argument("--contexts", type=int, nargs="+", default=None)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="modes to time, in this order")
    parser.add_argument("--small", action="store_true", help="CPU-sized model and contexts")
    parser.add_argument("--quant", type=parse_quant, default=[("auto", "auto")],
                        help="KV-cache:weight dtype pairs, e.g. auto:auto,int8:int8")
    args = parser.parse_args()

    on_gpu = jax.default_backend() == "gpu"
    small = args.small or not on_gpu
    dims = SMALL_MODEL if small else LLAMA3_8B
    config = LlamaConfig(**dims, rope_theta=500000.0, max_position_embeddings=2**20)
    contexts = args.contexts or (SMALL_CONTEXTS if small else GPU_CONTEXTS)
    if any(t % PAGE_SIZE for t in contexts):
        parser.error(f"contexts must be multiples of {PAGE_SIZE}")
    modes = list(dict.fromkeys(args.modes))
    dtype = jnp.bfloat16 if on_gpu else jnp.float32

    device = jax.devices()[0].device_kind
    out = args.out or (pathlib.Path(__file__).parent / "results"
                       / f"decode_e2e_{device_slug(device)}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    bandwidth, source, probe = copy_bandwidth(on_gpu and not small)
    params = init_params(config, jax.random.key(0), dtype=dtype)
    model = (f"{config.num_layers}L h{config.hidden_size} {config.num_heads}/"
             f"{config.num_kv_heads} heads D{config.head_dim} i{config.intermediate_size} "
             f"v{config.vocab_size}")
    meta = dict(device=device, backend=jax.default_backend(), jax=jax.__version__,
                commit=git_commit(), host_cpus=os.cpu_count(), model=model,
                dtype=jnp.dtype(dtype).name, copy_gbps=round(bandwidth, 1),
                copy_gbps_source=source, copy_probe_bytes=probe)
    weights = {}  # weight dtype -> (params, weight bytes read per token and their floor)
    for weight_dtype in dict.fromkeys(w for _, w in args.quant):
        quantized = quantize_params(params, weight_dtype)
        nbytes = weight_bytes(quantized) - params["embed"].nbytes  # a lookup reads one row
        floor_ms = nbytes / bandwidth / 1e6
        weights[weight_dtype] = (quantized, dict(weight_bytes=nbytes, floor_ms=round(floor_ms, 3)))
        print(f"{model}, {jnp.dtype(dtype).name}, {weight_dtype} weights: "
              f"{nbytes / 2**20:.0f} MiB of weights per token, copy bandwidth {bandwidth:.1f} "
              f"GB/s ({source}) -> weight-streaming floor {floor_ms:.2f} ms/token")

    records = []
    with out.open("w") as f:
        for t in contexts:
            load = round(os.getloadavg()[0], 2)
            for rec in run_context(t, modes, args.quant, weights, config, on_gpu, meta):
                emit(records, f, {**rec, "load_avg_1m": load})
    print_table(records, on_gpu)
    png = args.plot or out.with_suffix(".png")
    plot(records, png)
    print(f"wrote {out} and {png} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
