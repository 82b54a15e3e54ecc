"""End-to-end greedy generation on CPU: our `LLM` vs HF transformers, same GGUF, same prompt ids.

    python benchmarks/generate_cpu.py [--prompt-tokens 1024] [--new-tokens 128] [--repeats 3]
                                      [--out benchmarks/results/generate_cpu.jsonl] [--peak-gbps X]

Model: the embedded SmolLM2-135M-Instruct GGUF (Q4_1, dequantized to float32 by both systems),
batch 1, a `--prompt-tokens`-long English prompt (fixed paragraphs, cut to exactly that many ids
by the HF tokenizer of the GGUF), greedy, EOS ignored, `--new-tokens` generated tokens.

How each figure is measured. One warm-up first: ours a full call, which compiles; HF a prompt
forward and a 2-token generate, as it has nothing to compile. Then `--repeats` rounds, each
running ours then HF back to back so that a drifting background load hits both alike; medians:

- ours, prefill_ms: `llm.stats.prefill_ms`, the jitted prefill over the (bucketed) prompt plus
  sampling the first token, to the host sync.
- ours, decode_tokens_per_s: `llm.stats.decode_tokens_per_s`, the `new_tokens - 1` tokens after
  the first, timed around the jitted decode `while_loop`. Compiles are timed apart
  (`compile_s`, from the warm-up call; later calls reuse the executables).
- HF, prefill_ms: one `model(ids, use_cache=True)` forward over the prompt plus the argmax of the
  last logits, under `torch.no_grad()`.
- HF, decode_tokens_per_s: `model.generate(ids, max_new_tokens=N, min_new_tokens=N,
  do_sample=False)` timed with N = new_tokens and with N = 1 in the same round; both include the
  same prefill and first token, so (new_tokens - 1) / (t_N - t_1) is the decode rate.
- achieved_gbps (ours and HF): weight bytes read per decoded token (every parameter once; the tied
  embedding counts once, as the LM head reads it whole and the lookup reads one row) times
  tokens/s, as gpt-fast reports it. KV-cache reads (about 46 KB per context token here, ~8% of the
  weights at 1K tokens) are not counted. fraction_of_peak only with --peak-gbps.
- same_tokens / matching_prefix: our greedy ids against HF's from the last generate(N).

Writes one JSON line per system and a summary line with decode_speedup = ours_tok_s / hf_tok_s
and prefill_speedup = hf_ms / ours_ms (same run), prints them, and plots a bar chart next to --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import torch
import transformers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.provenance import git_commit  # noqa: E402
from lserve_jax import LLM, SamplingParams  # noqa: E402
from lserve_jax.checkpoint import default_gguf  # noqa: E402

# Plain expository English, repeated with a section number so that the prompt is not one period.
PARAGRAPHS = (
    "The history of the lighthouse is a history of coastlines and the people who worked them. "
    "Before electric lamps, keepers trimmed wicks and polished brass lenses through the night, "
    "writing the weather, the passing ships and the oil they burned into a daily log.",
    "A river carries more than water. It moves sand from the mountains to the sea, shapes the "
    "valleys it runs through, and for thousands of years it gave towns their drinking water, "
    "their mills and their roads long before railways reached the interior.",
    "When the committee met on Tuesday morning, the first question was the budget for the new "
    "library wing. Several members argued that the reading rooms should come first, while "
    "others wanted the archive moved out of the damp basement before another winter.",
    "Bread is made from four simple things: flour, water, salt and yeast. The baker mixes them, "
    "lets the dough rise slowly, folds it to build strength, and bakes it in a hot oven until "
    "the crust is dark and the loaf sounds hollow when tapped underneath.",
    "Migrating birds find their way using the sun, the stars and the magnetic field of the "
    "earth. Young birds on their first journey often follow older ones, and many return each "
    "spring to the same hedge or barn where they were hatched the year before.",
)


def cpu_name() -> str:
    """platform.processor() is empty on many Linux systems; fall back to /proc/cpuinfo."""
    name = platform.processor()
    if not name or name == platform.machine():
        try:
            for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
    return name or platform.machine()


def make_prompt(tokenizer, num_tokens: int) -> list[int]:
    """Exactly `num_tokens` ids of English text."""
    parts, ids, section = [], [], 1
    while len(ids) < num_tokens:
        for p in PARAGRAPHS:
            parts.append(f"Section {section}. {p}")
            section += 1
        ids = tokenizer("\n\n".join(parts)).input_ids
    return list(ids[:num_tokens])


def matching_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Ours:
    def __init__(self, new_tokens: int):
        self.llm = LLM(dtype="float32", attention="dense")
        self.sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        self.weight_bytes = sum(x.nbytes for x in jax.tree.leaves(self.llm.params))
        if "lm_head" in self.llm.params:  # untied: the embedding lookup reads one row only
            self.weight_bytes -= self.llm.params["embed"].nbytes

    def __call__(self, ids: list[int]) -> tuple[list[int], dict]:
        [out] = self.llm.generate([ids], self.sp)
        s = self.llm.stats
        return out.token_ids, dict(prefill_ms=s.prefill_ms, compile_s=s.compile_s,
                                   decode_tokens_per_s=s.decode_tokens_per_s)


class HF:
    def __init__(self, gguf: pathlib.Path, new_tokens: int):
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
        self.new_tokens = new_tokens
        # Every parameter once (tied embedding counted once: parameters() deduplicates it).
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        if not self.model.config.tie_word_embeddings:
            self.weight_bytes -= self.model.get_input_embeddings().weight.nbytes

    def _generate(self, ids: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False,
                                  pad_token_id=self.model.config.eos_token_id)
        return out, time.perf_counter() - t0

    @torch.no_grad()
    def warm_up(self, prompt: list[int]):
        """Allocator and thread pools; no compiles to amortise, so a short generate suffices."""
        ids = torch.tensor([prompt])
        self.model(ids, use_cache=True)
        self._generate(ids, 2)

    @torch.no_grad()
    def __call__(self, prompt: list[int]) -> tuple[list[int], dict]:
        ids = torch.tensor([prompt])
        t0 = time.perf_counter()
        logits = self.model(ids, use_cache=True).logits
        int(logits[0, -1].argmax())
        prefill_s = time.perf_counter() - t0
        out, t_n = self._generate(ids, self.new_tokens)
        _, t_1 = self._generate(ids, 1)
        decode_s = t_n - t_1
        tok_s = (self.new_tokens - 1) / decode_s if decode_s > 0 else float("nan")
        return out[0, ids.shape[1]:].tolist(), dict(prefill_ms=1e3 * prefill_s,
                                                    decode_tokens_per_s=tok_s,
                                                    generate_s=t_n, generate_1_s=t_1)


def plot(records: list[dict], path: pathlib.Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = [r for r in records if r["system"] in ("ours", "hf")]
    names = [r["system"] for r in systems]
    colors = ["tab:blue", "tab:gray"]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    for ax, key, label in ((axes[0], "prefill_ms", "prefill ms (lower is better)"),
                           (axes[1], "decode_tokens_per_s", "decode tokens/s (higher is better)")):
        values = [r[key] for r in systems]
        bars = ax.bar(names, values, color=colors[:len(names)])
        ax.bar_label(bars, fmt="%.1f")
        ax.margins(y=0.15)
        ax.set_title(label, fontsize=10)
    r = systems[0]
    fig.suptitle(f"SmolLM2-135M f32, {r['prompt_tokens']} prompt + {r['new_tokens']} new tokens, "
                 f"{r['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).parent / "results" / "generate_cpu.jsonl")
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="the machine's memory bandwidth, for fraction_of_peak")
    args = parser.parse_args()
    if args.new_tokens < 2 or args.repeats < 1 or args.prompt_tokens < 1:
        parser.error("need --new-tokens >= 2, --repeats >= 1, --prompt-tokens >= 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(os.cpu_count())

    gguf = default_gguf()
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    prompt = make_prompt(tokenizer, args.prompt_tokens)
    ours, hf = Ours(args.new_tokens), HF(gguf, args.new_tokens)

    load_before = os.getloadavg()[0]
    _, warm = ours(prompt)  # compiles; allocator and thread pools for both
    hf.warm_up(prompt)
    runs = {"ours": [], "hf": []}
    for _ in range(args.repeats):
        ours_ids, r = ours(prompt)
        runs["ours"].append(r)
        hf_ids, r = hf(prompt)
        runs["hf"].append(r)

    meta = dict(device=f"{cpu_name()} ({os.cpu_count()} cores)", backend=jax.default_backend(),
                jax=jax.__version__, torch=torch.__version__, transformers=transformers.__version__,
                commit=git_commit(), model=gguf.name, dtype="float32", batch=1,
                prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                repeats=args.repeats, torch_threads=torch.get_num_threads(),
                # Other processes' CPU use skews both systems (torch's OpenMP barriers the most).
                load_avg_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)])
    records, medians = [], {}
    for name, system in (("ours", ours), ("hf", hf)):
        med = medians[name] = {k: statistics.median(r[k] for r in runs[name])
                               for k in runs[name][0]}
        tok_s = med["decode_tokens_per_s"]
        rec = dict(meta, system=name, prefill_ms=round(med["prefill_ms"], 2),
                   prefill_tokens_per_s=round(1e3 * args.prompt_tokens / med["prefill_ms"], 1),
                   decode_tokens_per_s=round(tok_s, 2),
                   decode_ms_per_token=round(1e3 / tok_s, 3),
                   weight_bytes=system.weight_bytes,
                   achieved_gbps=round(system.weight_bytes * tok_s / 1e9, 3),
                   decode_tokens_per_s_runs=[round(r["decode_tokens_per_s"], 2)
                                             for r in runs[name]],
                   prefill_ms_runs=[round(r["prefill_ms"], 2) for r in runs[name]])
        if args.peak_gbps:
            rec["fraction_of_peak"] = round(rec["achieved_gbps"] / args.peak_gbps, 3)
        if name == "ours":
            rec.update(compile_s=round(warm["compile_s"], 2), attention="dense",
                       impl=ours.llm.impl)
        else:
            rec.update(generate_s=round(med["generate_s"], 3),
                       generate_1_s=round(med["generate_1_s"], 3))
        records.append(rec)
    o, h = records
    match = matching_prefix(ours_ids, hf_ids)
    mo, mh = medians["ours"], medians["hf"]
    decode_speedup = mo["decode_tokens_per_s"] / mh["decode_tokens_per_s"]
    records.append(dict(meta, system="summary", decode_speedup=round(decode_speedup, 3),
                        prefill_speedup=round(mh["prefill_ms"] / mo["prefill_ms"], 3),
                        same_tokens=ours_ids == hf_ids, matching_prefix=match,
                        compared_tokens=min(len(ours_ids), len(hf_ids))))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as f:
        for rec in records:
            line = json.dumps(rec)
            print(line, flush=True)
            f.write(line + "\n")
    for r in (o, h):
        print(f"{r['system']:>4}: prefill {r['prefill_ms']:9.1f} ms   decode "
              f"{r['decode_tokens_per_s']:7.2f} tok/s   {r['achieved_gbps']:6.2f} GB/s")
    s = records[-1]
    print(f"decode speed-up {s['decode_speedup']:.2f}x, prefill speed-up "
          f"{s['prefill_speedup']:.2f}x, same greedy tokens: {s['same_tokens']} "
          f"({match}/{s['compared_tokens']})")
    png = args.out.with_suffix(".png")
    plot(records, png)
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
