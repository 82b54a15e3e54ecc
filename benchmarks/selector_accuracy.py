"""Page selection per KV head vs per query head: passkey retrieval and agreement with dense.

    python benchmarks/selector_accuracy.py [--lengths 45 110] [--depths 0.1 0.5 0.9]
        [--budgets 128 256] [--new-tokens 8] [--out benchmarks/results/selector_accuracy_cpu.jsonl]

Model: the embedded SmolLM2-135M-Instruct (f32), every KV head a dense head (no streaming
pattern), so only the page selector decides what decode attends to; the prefill is dense. For
each prompt length (in filler paragraphs: 45 is 1,133 tokens, 110 is 2,693) and depth, a
plain-completion passkey prompt (tests/test_smollm2.py's form); all prompts run as one ragged
batch per prompt length and configuration. Configurations: dense decode, then LServe with each token budget and
`page_selection` in {kv_head, query_head}, `selector_interval` 4.

Per configuration: `hits` (the passkey appears in the greedy continuation), `agreement` (share of
the generated tokens equal to dense's at the same step, up to the first difference counted as
the rest being different: the prefix match over new_tokens), and the decode tokens/s of that
batch. One JSON line per configuration with the device, JAX version and commit.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the benchmarks package, passkey prompts

from benchmarks.provenance import git_commit  # noqa: E402
from lserve_jax import LLM, SamplingParams  # noqa: E402
from test_smollm2 import passkey_prompt  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[45, 110])
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--budgets", type=int, nargs="+", default=[128, 256])
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--out", default="benchmarks/results/selector_accuracy_cpu.jsonl")
    args = p.parse_args()

    cases = [(n, d, 10000 + 7919 * i % 89999)
             for i, (n, d) in enumerate((n, d) for n in args.lengths for d in args.depths)]
    prompts = [passkey_prompt(n, key, d) for n, d, key in cases]
    sp = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    provenance = dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(),
                      jax=jax.__version__, commit=git_commit())
    configs = [dict(attention="dense")] + [
        dict(attention="lserve", token_budget=b, selector_interval=4, page_selection=s)
        for b in args.budgets for s in ("kv_head", "query_head")]
    rows, dense_ids = [], None
    for config in configs:
        llm = LLM(**config)
        t0 = time.perf_counter()
        outs, decode_s, decode_tokens = [], 0.0, 0
        for n in args.lengths:  # one batch per length: less padding
            outs += llm.generate([p for p, (m, _, _) in zip(prompts, cases) if m == n], sp)
            decode_s += llm.stats.decode_s
            decode_tokens += llm.stats.decode_tokens
        wall = time.perf_counter() - t0
        ids = [o.token_ids for o in outs]
        if dense_ids is None:
            dense_ids = ids

        def prefix(a, b):
            n = 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            return n

        hits = [str(key) in o.text for (_, _, key), o in zip(cases, outs)]
        row = dict(provenance, **config, num_prompts=len(prompts),
                   prompt_tokens=[len(o.prompt_token_ids) for o in outs], hits=sum(hits),
                   hit_by_prompt=hits,
                   agreement=sum(prefix(a, b) for a, b in zip(ids, dense_ids))
                   / sum(len(b) for b in dense_ids),
                   decode_tokens_per_s=round(decode_tokens / decode_s, 2),
                   wall_s=round(wall, 1))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in provenance}), flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
