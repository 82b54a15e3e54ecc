"""Prefill attention: our dense and LServe kernels (arXiv 2502.14866) vs cuDNN and XLA.

    python benchmarks/prefill_attention.py [--out PATH.jsonl] [--plot PATH.png]
                                           [--lengths 8192 32768] [--small]

GPU: Llama-3-8B attention (32 query heads, 8 KV heads, D=128, bf16, B=1) at 8K..256K tokens, our
Pallas kernel with all heads dense and with LServe's 50% streaming heads (sink 128, local 8192),
cuDNN flash attention and plain XLA attention (where its [T, T] scores fit in memory).
CPU (or --small): 512 to 2K tokens, 4 query / 2 KV heads, D=64, f32, sink 64, local 256; on CPU
our `impl="xla"` path (the interpreted kernel is far too slow to time) against XLA attention.
The XLA path computes every (query, key) pair of every head, so on CPU dense and LServe take the
same time: the skipping is the Pallas kernel's.

One JSON line per (T, config): device, JAX version, commit, ms, effective TFLOP/s (full causal
FLOPs 4*B*Hq*D*T*T/2 over the time), achieved TFLOP/s (FLOPs of the tiles actually computed),
fraction of peak where the peak is known, and speed-ups over our dense kernel and over cuDNN
measured in the same run. Chunked prefill (`ours_dense_chunked`, `ours_lserve_chunked`): the
same prompt in chunks of --chunk tokens (2,048 on GPU) through the paged prefill op
(pallas_kernels/paged_prefill.py), the keys and values already in pages, the chunks' times
summed; `chunked_vs_one_shot` is over our one-shot kernel of the same mode (target: at most
1.15 at 128K on a GPU). Writes the lines to --out (default benchmarks/results/
prefill_attention_<device>.jsonl), flushed as each is measured, prints them, and plots ms vs T
to --plot (default next to --out).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.provenance import device_slug, emit, git_commit  # noqa: E402
from pallas_kernels import (  # noqa: E402
    default_prefill_config,
    paged_prefill_attention,
    prefill_tile_counts,
    sparse_prefill_attention,
)
from pallas_kernels.impls import default_impl  # noqa: E402

GPU_LENGTHS = (8192, 32768, 65536, 131072, 262144)
SMALL_LENGTHS = (512, 1024, 2048)
# Dense bf16 tensor-core peaks (TFLOP/s), by a substring of jax's device_kind.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}
TIME_BUDGET_S = {True: 2.0, False: 0.5}  # per config after warm-up, by on_gpu


def time_ms(fn, *args, budget_s) -> float:
    """Median wall time of `fn(*args)` in ms (at least 3 runs, more while within budget_s);
    jitted fn, compiled and warmed up first."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = [first]
    for _ in range(int(np.clip(budget_s / max(first, 1e-6), 3, 100)) - 1):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def make_inputs(seed, shape, dtype):
    b, t, hq, hkv, d = shape
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (b, t, hq, d), dtype),
            jax.random.normal(kk, (b, t, hkv, d), dtype),
            jax.random.normal(kv, (b, t, hkv, d), dtype))


def scores_bytes(shape) -> int:
    b, t, hq, _, _ = shape
    return 4 * b * hq * t * t  # XLA attention materialises f32 [B, Hq, T, T] logits


def device_memory_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def run_length(t, args, on_gpu, seed):
    """Time every config at prompt length t; returns one record per config."""
    b, hq, hkv, d = 1, args.q_heads, args.kv_heads, args.head_dim
    shape = (b, t, hq, hkv, d)
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    impl = default_impl(jax.default_backend())
    streaming = np.arange(hkv) % 2 == 1  # 50% streaming heads (LServe's static_sparsity 0.5)
    cfg = default_prefill_config(d, dtype)
    full_causal_flops = 4 * b * hq * d * t * t / 2

    def ours(flags):
        flags = jnp.asarray(flags, jnp.int32)
        return jax.jit(lambda q, k, v: sparse_prefill_attention(
            q, k, v, flags, sink_tokens=args.sink, local_tokens=args.local, impl=impl))

    def computed_flops(flags):
        if impl == "xla":  # the blockwise reference computes every (query, key) pair
            return 4 * b * hq * d * t * t
        dense, stream = prefill_tile_counts(t, flags, args.sink, args.local, cfg["block_q"],
                                            cfg["block_k"])
        return b * (hq // hkv) * (dense + stream) * 4 * cfg["block_q"] * cfg["block_k"] * d

    def library(implementation):
        return jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation=implementation))

    def chunked(flags):
        """The same prompt in chunks of args.chunk through the paged prefill op, the keys and
        values already in pages (one page table, the streaming heads' pool windowed): the sum
        of the chunks' attention, to set against one-shot prefill."""
        page_size = 64 if on_gpu else 16
        num_pages = t // page_size
        dense, stream = np.flatnonzero(~flags), np.flatnonzero(flags)
        table = jnp.arange(1, num_pages + 1, dtype=jnp.int32)[None]  # page 0: the null page
        tables, windowed, groups = [], [], [g for g in (dense, stream) if g.size]
        for group in groups:
            tables.append(table)
            windowed.append(group is stream)
        sources = tuple((p, int(np.flatnonzero(groups[p] == h)[0]))
                        for h in range(hkv) for p in range(len(groups)) if h in groups[p])
        step = jax.jit(lambda q, pools, start: paged_prefill_attention(
            q, pools, tuple(tables), start, jnp.full((b,), args.chunk, jnp.int32),
            sources=sources, windowed=tuple(windowed), sink_tokens=args.sink,
            local_tokens=args.local, impl=impl))

        def run(q, k, v):
            def paged(x):  # [B, T, Hkv, D] -> [Hkv, 1 + pages, S, D]
                x = jnp.moveaxis(x[0].reshape(num_pages, page_size, hkv, d), 2, 0)
                return jnp.pad(x, ((0, 0), (1, 0), (0, 0), (0, 0)))
            k, v = paged(k), paged(v)
            pools = tuple((k[g], v[g]) for g in groups)
            return [step(q[:, c:c + args.chunk], pools, jnp.full((b,), c, jnp.int32))
                    for c in range(0, t, args.chunk)]
        return run

    configs = [("ours_dense", ours(np.zeros(hkv, bool)), computed_flops(np.zeros(hkv, bool))),
               ("ours_lserve", ours(streaming), computed_flops(streaming))]
    if on_gpu:
        configs.append(("cudnn", library("cudnn"), None))
    configs.append(("xla", library("xla"), None))
    if t % args.chunk == 0 and t > args.chunk:
        configs += [("ours_dense_chunked", chunked(np.zeros(hkv, bool)), None),
                    ("ours_lserve_chunked", chunked(streaming), None)]

    records = []
    for i, (name, fn, flops) in enumerate(configs):
        rec = dict(T=t, impl=name, kernel_impl=impl if name.startswith("ours") else name,
                   B=b, Hq=hq, Hkv=hkv, D=d, dtype=jnp.dtype(dtype).name, sink_tokens=args.sink,
                   local_tokens=args.local,
                   streaming_fraction=float(streaming.mean()) if "lserve" in name else 0.0)
        limit = device_memory_bytes()
        if name == "xla" and limit is not None and scores_bytes(shape) > 0.8 * limit:
            rec.update(status="skipped", error=f"needs {scores_bytes(shape) / 2**30:.0f} GiB")
            records.append(rec)
            continue
        try:
            q, k, v = make_inputs(seed + i, shape, dtype)
            ms = time_ms(fn, q, k, v, budget_s=TIME_BUDGET_S[on_gpu])
            del q, k, v
        except Exception as e:  # noqa: BLE001 - record OOMs and unsupported configs, go on
            status = "skipped" if "RESOURCE_EXHAUSTED" in str(e) or "memory" in str(e) else "failed"
            rec.update(status=status, error=f"{type(e).__name__}: {str(e)[:300]}")
            records.append(rec)
            continue
        rec.update(status="ok", ms=round(ms, 4),
                   effective_tflops=round(full_causal_flops / ms / 1e9, 3))
        if flops is not None:
            rec["achieved_tflops"] = round(flops / ms / 1e9, 3)
            rec["block_q"], rec["block_k"] = cfg["block_q"], cfg["block_k"]
        records.append(rec)

    baselines = {r["impl"]: r.get("ms") for r in records}
    for rec in records:
        if rec["status"] != "ok":
            continue
        if rec["impl"].endswith("_chunked"):
            rec["chunk"] = args.chunk
            one_shot = baselines.get(rec["impl"][:-len("_chunked")])
            if one_shot:  # target on a GPU: at most 1.15
                rec["chunked_vs_one_shot"] = round(rec["ms"] / one_shot, 3)
        for base, key in (("ours_dense", "speedup_vs_ours_dense"), ("cudnn", "speedup_vs_cudnn")):
            if baselines.get(base):
                rec[key] = round(baselines[base] / rec["ms"], 3)
    return records


def plot(records, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["impl"] for r in records):
        pts = [(r["T"], r["ms"]) for r in records if r["impl"] == name and r["status"] == "ok"]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="prompt tokens T", ylabel="ms per layer",
           title=f"prefill attention, {records[0]['device']}")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--plot", type=pathlib.Path, default=None,
                        help="where the png goes (default: next to --out)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--small", action="store_true", help="CPU-sized shapes")
    parser.add_argument("--chunk", type=int, default=None,
                        help="chunked-prefill chunk (default 2048 on GPU, 256 on CPU)")
    args = parser.parse_args()

    on_gpu = jax.default_backend() == "gpu"
    small = args.small or not on_gpu
    # Llama-3-8B attention on GPU; an eighth of its heads, D=64 and a scaled-down Λ window on CPU.
    args.q_heads, args.kv_heads, args.head_dim = (4, 2, 64) if small else (32, 8, 128)
    args.sink, args.local = (64, 256) if small else (128, 8192)
    lengths = args.lengths or (SMALL_LENGTHS if small else GPU_LENGTHS)
    args.chunk = args.chunk or (256 if small else 2048)

    device = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in device), None) if on_gpu else None
    out = args.out or (pathlib.Path(__file__).parent / "results"
                       / f"prefill_attention_{device_slug(device)}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=device, jax=jax.__version__, commit=git_commit())

    records = []
    with out.open("w") as f:
        for i, t in enumerate(lengths):
            for rec in run_length(t, args, on_gpu, seed=10 * i):
                rec = {**meta, **rec}
                if peak and "achieved_tflops" in rec:
                    rec["fraction_of_peak"] = round(rec["achieved_tflops"] / peak, 3)
                emit(records, f, rec)
    png = args.plot or out.with_suffix(".png")
    plot(records, png)
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
