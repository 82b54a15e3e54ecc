"""Which part of LServe's decode loses the passkeys at budget 1024? Dense heads only (static
sparsity 0), budget 1024, on passkey prompts built as by `python -m lserve_jax.eval` (filler
haystack, lengths 1K-8K), with the page selector varied: reselect every step
instead of every 4, one page list per query head instead of per KV head, and the first page (the
attention sink) kept in every selection. Depths 0 and 25%
by default: where the budget-1024 misses of the default grid are.

    python benchmarks/passkey_selector_ablation.py [--out benchmarks/results/...jsonl]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.provenance import git_commit  # noqa: E402
from lserve_jax import eval as harness  # noqa: E402
from lserve_jax.checkpoint import load_text_model  # noqa: E402
from models.attention import AttentionConfig  # noqa: E402
from models.sparsity import SparsityConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/passkey_selector_ablation_cpu.jsonl")
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--depths", type=harness._floats, default=[0.0, 0.25])
    args = p.parse_args()
    _, config, params, tokenizer = load_text_model(None, dtype="float32", purpose="ablation")
    # The base is LServe's own selection rule (keep_first_pages=0); one variant keeps the sink.
    base = SparsityConfig(static_sparsity=0.0, token_budget=args.budget, keep_first_pages=0)
    variants = {
        "kv_head, interval 4": base,
        "kv_head, interval 1": dataclasses.replace(base, selector_interval=1),
        "query_head, interval 4": dataclasses.replace(base, page_selection="query_head"),
        "kv_head, interval 4, first page kept": dataclasses.replace(base, keep_first_pages=1),
    }
    variants = {name: AttentionConfig(mode="lserve", impl="xla", sparsity=knobs)
                for name, knobs in variants.items()}
    settings = [harness.Setting("dense", AttentionConfig(mode="dense", impl="xla",
                                                         sparsity=base))]
    settings += [harness.Setting(name, att, None, 0.0, args.budget) for name, att in variants.items()]
    lengths = [1024, 2048, 4096, config.max_position_embeddings - 8]
    runner = harness.Runner(config, params, max_tokens=max(lengths) + 8)
    records = harness.passkey_grid(runner, tokenizer, settings, lengths=lengths,
                                   depths=args.depths, progress=print)
    commit = git_commit()
    with open(args.out, "w") as f:
        for r in records:
            f.write(json.dumps(dict(r, commit=commit)) + "\n")
    for name in [s.name for s in settings]:
        hits = [r["hit"] for r in records if r["setting"] == name]
        print(f"{name}: {sum(hits)}/{len(hits)} hits")


if __name__ == "__main__":
    main()
