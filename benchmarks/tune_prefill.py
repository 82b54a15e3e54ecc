"""Sweep tiles, warps and stages of the sparse prefill kernel against cuDNN, in one run.

    python benchmarks/tune_prefill.py [--lengths 32768] [--module PATH] [--out PATH.jsonl]

Llama-3-8B attention shape (32 query heads, 8 KV heads, D=128, bf16, B=1), all heads dense;
prints one JSON line per configuration with ms and the ratio to cuDNN timed in the same run.
`--module` loads another version of pallas_kernels/sparse_prefill.py for an A/B comparison.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.prefill_attention import make_inputs, time_ms  # noqa: E402
from benchmarks.provenance import git_commit  # noqa: E402
from pallas_kernels import sparse_prefill  # noqa: E402

CONFIGS = [  # (block_q, block_k, num_warps, num_stages)
    (128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 4, 3), (128, 128, 8, 2), (128, 128, 8, 3),
    (64, 64, 4, 3), (64, 128, 4, 2), (128, 32, 4, 4), (256, 64, 8, 2),
]


def load(path: str | None):
    if path is None:
        return sparse_prefill
    spec = importlib.util.spec_from_file_location("prefill_variant", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768])
    parser.add_argument("--module", action="append", default=None)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    modules = [("current", sparse_prefill)] + [(m, load(m)) for m in (args.module or [])]
    device = jax.devices()[0].device_kind
    lines = []
    for t in args.lengths:
        q, k, v = make_inputs(0, (1, t, 32, 8, 128), jnp.bfloat16)
        cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"))
        cudnn_ms = time_ms(cudnn, q, k, v, budget_s=1.0)
        flags = jnp.zeros((8,), jnp.int32)
        for (name, mod), (bq, bk, warps, stages) in itertools.product(modules, CONFIGS):
            fn = jax.jit(lambda q, k, v, mod=mod, bq=bq, bk=bk, w=warps, s=stages:
                         mod.sparse_prefill_attention(
                             q, k, v, flags, sink_tokens=128, local_tokens=8192, block_q=bq,
                             block_k=bk, num_warps=w, num_stages=s))
            rec = dict(device=device, jax=jax.__version__, commit=git_commit(), T=t,
                       module=name, block_q=bq, block_k=bk, num_warps=warps, num_stages=stages)
            try:
                ms = time_ms(fn, q, k, v, budget_s=1.0)
                flops = 4 * 32 * 128 * t * t / 2
                rec.update(ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1),
                           cudnn_ms=round(cudnn_ms, 3), vs_cudnn=round(cudnn_ms / ms, 3))
            except Exception as e:  # noqa: BLE001 - a config that does not fit is a result too
                rec.update(error=f"{type(e).__name__}: {str(e)[:160]}")
            print(json.dumps(rec), flush=True)
            lines.append(rec)
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in lines))


if __name__ == "__main__":
    main()
