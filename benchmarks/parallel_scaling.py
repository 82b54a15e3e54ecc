"""Prefill and decode time per token against the tensor-parallel size, with the communication
each token needs.

    python benchmarks/parallel_scaling.py [--out PATH.jsonl] [--tp 1 2 4 8] [--modes dense lserve]

Runs the serving engine's own jitted steps (`lserve_jax.engine.device.prefill_step` and
`decode_step`, under `shard_map` for TP > 1, models/parallel.py) on a model with random
weights: 8 layers, hidden 1024, 16 query / 8 KV heads (D 64), MLP 2816, vocabulary 32000, f32
on the CPU (bf16 on a GPU). Batch 4: prefill one 512-token chunk per row (ms per prompt token),
then `decode_step` calls of 8 steps each on those rows (ms per generated token). LServe runs
with half of each layer's KV heads streaming (the pattern balanced for 8 devices, so every TP
size runs the same pattern) and the shipped knobs scaled to the context (pages of 16, budget
256). Each figure is the median of 5 timed calls after one that compiles.

On the CPU, JAX's host devices (`--xla_force_host_platform_device_count`, set by this script
before JAX starts) share the machine's cores, so the ratios measure the cost of the split (the
collectives and the smaller per-device matmuls), not a speed-up. On a machine with several GPUs
the same script measures the scaling. Each record carries the expected communication per
token: the bytes each device sends and receives in its all-reduces (two per layer of
[hidden] activations, one for the embedding; a ring all-reduce moves 2 (N-1)/N of the buffer)
and in the logits' all-gather ((N-1)/N of [vocab]).

Writes one JSON line per (mode, TP) to --out (default benchmarks/results/parallel_scaling_<device>.jsonl)
with device, JAX version and commit, and prints the ratios to TP = 1 measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.provenance import device_slug, emit, git_commit  # noqa: E402
from lserve_jax import head_pattern  # noqa: E402
from lserve_jax.engine import device  # noqa: E402
from lserve_jax.engine.scheduler import ScheduledRow  # noqa: E402
from lserve_jax.sparsity import SparsityConfig  # noqa: E402
from models import kv_cache, llama, parallel  # noqa: E402
from models.attention import AttentionConfig  # noqa: E402
from models.config import LlamaConfig  # noqa: E402
from models.params import init_params  # noqa: E402
from pallas_kernels.impls import default_impl  # noqa: E402

CONFIG = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=8,
                     num_heads=16, num_kv_heads=8, head_dim=64, max_position_embeddings=4096)
ROWS, PROMPT, STEPS, REPEATS = 4, 512, 8, 5
KNOBS = dict(page_size=16, logical_page_size=8, token_budget=256, ctx_sink_tokens=64,
             ctx_local_tokens=256, dec_sink_tokens=16, dec_local_tokens=64, selector_interval=4,
             static_sparsity=0.5)


def attention_config(mode: str, impl: str) -> AttentionConfig:
    sparsity = SparsityConfig(**{k: v for k, v in KNOBS.items() if k != "static_sparsity"})
    if mode == "dense":
        return AttentionConfig(mode="dense", impl=impl, sparsity=sparsity)
    gates = np.random.default_rng(0).uniform(size=(CONFIG.num_layers, CONFIG.num_kv_heads))
    flags = head_pattern.streaming_heads_from_gates(gates, KNOBS["static_sparsity"])
    balanced = head_pattern.balance_for_devices(gates, flags, 8)
    return AttentionConfig(mode="lserve", impl=impl, streaming_heads=balanced, sparsity=sparsity)


def communication_bytes(n: int, itemsize: int) -> dict:
    """Bytes each device sends (and receives) per token in the split's collectives."""
    if n == 1:
        return dict(all_reduce_bytes=0, all_gather_bytes=0)
    per_buffer = CONFIG.hidden_size * itemsize
    all_reduce = (2 * CONFIG.num_layers + 1) * per_buffer * 2 * (n - 1) / n
    all_gather = -(-CONFIG.vocab_size // n) * n * 4 * (n - 1) / n  # f32 logits
    return dict(all_reduce_bytes=int(all_reduce), all_gather_bytes=int(all_gather))


def rows(decode: bool, pages_per_row: int) -> list[ScheduledRow]:
    out = []
    for i in range(ROWS):
        pages = tuple(range(1 + i * pages_per_row, 1 + (i + 1) * pages_per_row))
        tokens = (7,) if decode else tuple(int(t) for t in
                                           np.random.default_rng(i).integers(3, 1000, PROMPT))
        out.append(ScheduledRow(request_id=i, slot=i, start=PROMPT if decode else 0,
                                token_ids=tokens, sample=True, pages=pages, admitted=not decode,
                                num_output_tokens=1 if decode else 0, num_prompt_tokens=PROMPT,
                                num_steps=STEPS if decode else 1))
    return out


def run(mode: str, n: int, params, dtype, impl: str) -> dict:
    attention = attention_config(mode, impl)
    shard = parallel.Shard(parallel.make_mesh(n)) if n > 1 else None
    if shard is not None:  # laid out as the engine loads it (heads permuted, padding)
        params, flags, _ = parallel.split_model(params, CONFIG, attention.streaming_heads, n)
        attention = dataclasses.replace(attention, streaming_heads=flags)
    pages_per_row = -(-(PROMPT + STEPS * (REPEATS + 1) + 1) // KNOBS["page_size"])
    spec = llama.cache_spec(CONFIG, attention, num_pages=ROWS * pages_per_row + 1,
                            max_seqs=ROWS, max_pages_per_seq=pages_per_row,
                            dtype=jnp.dtype(dtype).name)
    cache = kv_cache.init_cache(spec)
    if shard is not None:
        params = parallel.place(params, parallel.param_specs(params), shard.mesh)
        cache = parallel.place(cache, parallel.cache_specs(cache), shard.mesh)
    sampling = {i: device.RowSampling(0.0, 0, 1.0, 0.0, 0, 0.0, 0.0, 1.0,
                                      np.zeros(2, np.uint32)) for i in range(ROWS)}
    shape = dict(max_seqs=ROWS, num_rows=ROWS, num_columns=pages_per_row, sampling=sampling)
    prefill = device.build_batch(rows(False, pages_per_row), num_tokens=PROMPT, **shape)
    decode = device.build_batch(rows(True, pages_per_row), num_tokens=1, **shape)
    static = dict(config=CONFIG, attention=attention, shard=shard)
    prefill_fn = device.prefill_step.lower(params, cache, prefill, fresh=True,
                                           **static).compile()
    decode_fn = device.decode_step.lower(params, cache, decode, num_steps=STEPS,
                                         **static).compile()
    prefill_s = []
    for _ in range(REPEATS + 1):  # the same prompts again: the pages are rewritten in place
        t0 = time.perf_counter()
        cache, *outputs = prefill_fn(params, cache, prefill)
        jax.block_until_ready(outputs)
        prefill_s.append(time.perf_counter() - t0)
    decode_s = []
    for i in range(REPEATS + 1):
        batch = decode.replace(starts=decode.starts + i * STEPS)
        t0 = time.perf_counter()
        cache, *outputs = decode_fn(params, cache, batch)
        jax.block_until_ready(outputs)
        decode_s.append(time.perf_counter() - t0)
    return dict(prefill_ms_per_token=round(1e3 * statistics.median(prefill_s[1:])
                                           / (ROWS * PROMPT), 4),
                decode_ms_per_token=round(1e3 * statistics.median(decode_s[1:])
                                          / (ROWS * STEPS), 3))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--modes", nargs="+", choices=("dense", "lserve"),
                        default=["dense", "lserve"])
    args = parser.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    impl = default_impl(jax.default_backend())
    kind = jax.devices()[0].device_kind
    out = args.out or (pathlib.Path(__file__).parent / "results"
                       / f"parallel_scaling_{device_slug(kind)}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=kind, devices=jax.device_count(), backend=jax.default_backend(),
                jax=jax.__version__, commit=git_commit(), host_cpus=os.cpu_count(),
                model=(f"{CONFIG.num_layers}L h{CONFIG.hidden_size} {CONFIG.num_heads}/"
                       f"{CONFIG.num_kv_heads} heads D{CONFIG.head_dim} "
                       f"i{CONFIG.intermediate_size} v{CONFIG.vocab_size}"),
                dtype=jnp.dtype(dtype).name, rows=ROWS, prompt=PROMPT, steps_per_call=STEPS)
    params = init_params(CONFIG, jax.random.key(0), dtype=dtype)
    records = []
    with out.open("w") as f:
        for mode in args.modes:
            base = None
            for n in args.tp:
                if n > jax.device_count():
                    print(f"skip TP={n}: {jax.device_count()} devices")
                    continue
                rec = dict(meta, mode=mode, tp=n, **run(mode, n, params, dtype, impl),
                           **communication_bytes(n, jnp.dtype(dtype).itemsize),
                           load_avg_1m=round(os.getloadavg()[0], 2))
                base = base or rec
                rec["prefill_vs_tp1"] = round(rec["prefill_ms_per_token"]
                                              / base["prefill_ms_per_token"], 3)
                rec["decode_vs_tp1"] = round(rec["decode_ms_per_token"]
                                             / base["decode_ms_per_token"], 3)
                emit(records, f, rec)
    print(f"{'mode':7} {'TP':>3} {'prefill ms/tok':>15} {'x TP=1':>7} {'decode ms/tok':>14} "
          f"{'x TP=1':>7} {'all-reduce B/tok':>17} {'all-gather B/tok':>17}")
    for r in records:
        print(f"{r['mode']:7} {r['tp']:>3} {r['prefill_ms_per_token']:>15.4f} "
              f"{r['prefill_vs_tp1']:>7.2f} {r['decode_ms_per_token']:>14.3f} "
              f"{r['decode_vs_tp1']:>7.2f} {r['all_reduce_bytes']:>17,} "
              f"{r['all_gather_bytes']:>17,}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
