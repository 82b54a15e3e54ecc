"""Serving throughput and latency of the engine on a seeded synthetic workload.

    python -m benchmarks.serve_throughput [--ckpt ...] [--requests 24] [--out DIR] [--no-hf]

Requests draw prompts from the shipped book text (a third of them share a 128-token prefix, as
a system prompt would), prompt lengths from a mix of short (16-96 tokens) and long (256-640)
ones, output lengths from 8 to 48 tokens, greedy, EOS ignored so every run generates the same
number of tokens. Scenarios, all measured in the same run (so ratios hold on a noisy machine):

- offline: every request at time 0. Engine throughput (generated tokens / wall time) against
  (a) the static batch (every prompt in one right-padded batch, then decode until the longest
  output is done: `decode_loop.start` + `run`, what a generate() without an engine does) and
  (b) HF transformers' continuous batching (`generate_batch`, paged attention on the CPU; it
  takes one `max_new_tokens` for the batch, so it runs the mean output length and is compared
  in generated tokens per second).
- online: Poisson arrivals; TTFT and time per output token p50/p99, preemptions, prefix hits.
- head_of_line: short requests arriving right behind a long prompt; their TTFT p99 against
  their TTFT alone (the same requests arriving together without the long prompt; each one on
  its own is recorded too). Chunked prefill lets them in before the long prompt is done.
- steps_per_call: `num_scheduler_steps` 1, 4, 8, 16 on the offline workload (throughput) and
  the TTFT of one request arriving while the others decode.

Writes serve_throughput.jsonl (one JSON object per scenario and system) and
serve_throughput.png under --out (default benchmarks/results/, suffixed with the backend).
Compiles are warmed up before timing: a throughput run first runs the same requests once (the
prefix cache is emptied in between), so it meets no new shape bucket; `compile_s` in a record
says what compiling a record's run still included.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.provenance import device_slug, git_commit
from lserve_jax import Engine, SamplingParams, corpus
from lserve_jax.sampling import SamplingArrays


@dataclasses.dataclass(frozen=True)
class Req:
    arrival: float  # seconds after the start
    prompt: tuple[int, ...]
    max_tokens: int


def workload(tokenizer, n: int, seed: int, rate: float | None) -> list[Req]:
    """n requests; Poisson arrivals at `rate` per second (None: all at 0)."""
    rng = np.random.default_rng(seed)
    book = corpus.book_ids(tokenizer, corpus.book_names()[0])
    prefix = book[:128].tolist()
    t, reqs = 0.0, []
    for i in range(n):
        length = int(rng.integers(256, 641) if rng.random() < 0.25 else rng.integers(16, 97))
        start = int(rng.integers(200, len(book) - length))
        body = book[start:start + length].tolist()
        prompt = (prefix + body[:max(length - 128, 8)]) if i % 3 == 0 else body
        if rate is not None:
            t += float(rng.exponential(1.0 / rate))
        reqs.append(Req(t if rate else 0.0, tuple(prompt), int(rng.integers(8, 49))))
    return reqs


def percentile(values, q):
    return float(np.percentile(values, q)) if values else None


def run_engine(engine: Engine, reqs: list[Req], *, realtime: bool) -> dict:
    """Feed `reqs` to the engine (at their arrival times when `realtime`) and step until all
    finish; throughput and per-request latencies."""
    sp = lambda r: SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True)  # noqa: E731
    before = dict(engine.stats())
    pending = sorted(enumerate(reqs), key=lambda x: x[1].arrival)
    final = {}
    t0 = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - t0
        while pending and (not realtime or pending[0][1].arrival <= now):
            i, r = pending.pop(0)
            engine.add_request(i, list(r.prompt), sp(r))
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, pending[0][1].arrival - now))
            continue
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    wall = time.perf_counter() - t0
    after = engine.stats()
    generated = sum(len(o.token_ids) for o in final.values())
    ttft = [o.metrics.ttft for o in final.values()]
    tpot = [o.metrics.tpot for o in final.values() if o.metrics.tpot is not None]
    return dict(requests=len(final), generated_tokens=generated, wall_s=wall,
                tokens_per_s=generated / wall, ttft_p50_s=percentile(ttft, 50),
                ttft_p99_s=percentile(ttft, 99), tpot_p50_s=percentile(tpot, 50),
                tpot_p99_s=percentile(tpot, 99),
                preemptions=after["preemptions"] - before["preemptions"],
                prefix_hit_tokens=after["prefix_hit_tokens"] - before["prefix_hit_tokens"],
                decode_calls=after["decode_calls"] - before["decode_calls"],
                prefill_calls=after["prefill_calls"] - before["prefill_calls"],
                # seconds in device calls; the rest of wall_s is host work (and compiles)
                prefill_s=after["prefill_s"] - before["prefill_s"],
                decode_s=after["decode_s"] - before["decode_s"],
                # compiles of shape buckets the warm-up did not meet count in wall_s
                compile_s=after["compile_s"] - before["compile_s"],
                outputs={i: final[i].token_ids for i in final},
                ttft={i: final[i].metrics.ttft for i in final})


def warm_then_run(engine: Engine, reqs: list[Req], *, realtime: bool = False) -> dict:
    """`run_engine` after a warm-up on the same requests (all at once), which compiles the
    shape buckets the run uses; the prefix cache is emptied in between, so the measured run
    hits only what it caches itself."""
    run_engine(engine, reqs, realtime=False)
    engine.reset_prefix_cache()
    return run_engine(engine, reqs, realtime=realtime)


def run_static(engine: Engine, reqs: list[Req]) -> dict:
    """Every prompt in one right-padded batch, decoded until the longest output is done."""
    from lserve_jax import decode_loop
    from models import kv_cache, llama

    b, n = len(reqs), max(r.max_tokens for r in reqs)
    t = max(len(r.prompt) for r in reqs)
    t = -(-t // 64) * 64
    config, attention = engine.config, engine.attention
    pages = -(-(t + n) // attention.sparsity.page_size)
    spec = llama.cache_spec(config, attention, num_pages=b * pages + 1, max_seqs=b,
                            max_pages_per_seq=pages, dtype=engine.spec.dtype)

    def once():
        cache = kv_cache.init_cache(spec)
        for s, r in enumerate(reqs):
            cache, _ = kv_cache.reserve(cache, s, len(r.prompt) + n)
        tokens = np.zeros((b, t), np.int32)
        for i, r in enumerate(reqs):
            tokens[i, :len(r.prompt)] = r.prompt
        sampling = SamplingArrays(temperature=jnp.zeros(b), top_k=jnp.zeros(b, jnp.int32),
                                  top_p=jnp.ones(b), keys=jnp.zeros((b, 2), jnp.uint32))
        t0 = time.perf_counter()
        state = decode_loop.start(engine.params, cache, jnp.asarray(tokens),
                                  jnp.asarray([len(r.prompt) for r in reqs], jnp.int32),
                                  jnp.arange(b, dtype=jnp.int32), sampling,
                                  jnp.asarray([r.max_tokens for r in reqs], jnp.int32),
                                  jnp.full((b, 1), -1, jnp.int32), config=config,
                                  attention=attention, capacity=n)
        state = decode_loop.run(engine.params, state, config=config, attention=attention,
                                num_steps=n)
        out = np.asarray(state.out_tokens)
        return time.perf_counter() - t0, out

    once()  # compile
    wall, out = once()
    generated = sum(r.max_tokens for r in reqs)
    return dict(requests=b, generated_tokens=generated, wall_s=wall, tokens_per_s=generated / wall,
                outputs={i: out[i, :r.max_tokens].tolist() for i, r in enumerate(reqs)})


def run_hf(reqs: list[Req]) -> dict | None:
    """HF transformers' continuous batching (`generate_batch`) on the same prompts, with the
    mean output length for every request (it takes one max_new_tokens)."""
    try:
        import torch
        import transformers
        from lserve_jax.checkpoint import default_gguf
    except ImportError:
        return None
    gguf = default_gguf()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, attn_implementation="paged|sdpa")
    model.eval()
    n = int(round(np.mean([r.max_tokens for r in reqs])))
    config = transformers.GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=-1,
                                           pad_token_id=0)
    prompts = [list(r.prompt) for r in reqs]
    with torch.inference_mode():
        model.generate_batch(prompts[:2], generation_config=config, progress_bar=False)  # warm
        t0 = time.perf_counter()
        outs = model.generate_batch(prompts, generation_config=config, progress_bar=False)
        wall = time.perf_counter() - t0
    generated = sum(len(o.generated_tokens) for o in outs.values())
    return dict(requests=len(outs), generated_tokens=generated, wall_s=wall,
                tokens_per_s=generated / wall, max_new_tokens=n, torch_threads=torch.get_num_threads())


def head_of_line(engine: Engine, tokenizer, num_short: int = 4) -> dict:
    """TTFT of short requests queued right behind a long prompt, against each alone."""
    book = corpus.book_ids(tokenizer, corpus.book_names()[0])
    long_len = min(4 * engine.max_num_batched_tokens, engine.max_model_len - 64)
    long = Req(0.0, tuple(book[:long_len].tolist()), 8)
    shorts = [Req(0.0, tuple(book[5000 + 100 * i:5000 + 100 * i + 32].tolist()), 8)
              for i in range(num_short)]
    warm = [Req(0.0, tuple(book[9000:9000 + long_len].tolist()), 8)] + [
        Req(0.0, tuple(book[20000 + 100 * i:20000 + 100 * i + 32].tolist()), 8)
        for i in range(num_short)]
    run_engine(engine, warm, realtime=False)  # warm-up
    run_engine(engine, warm[1:], realtime=False)
    run_engine(engine, warm[1:2], realtime=False)
    engine.reset_prefix_cache()
    # The shorts without the long prompt (arriving together, as they do behind it): the
    # baseline of the ratio. Each short on its own is recorded too.
    group = run_engine(engine, shorts, realtime=False)
    ttft_group = list(group["ttft"].values())
    engine.reset_prefix_cache()
    ttft_each = [run_engine(engine, [s], realtime=False)["ttft_p50_s"] for s in shorts]
    engine.reset_prefix_cache()
    behind = run_engine(engine, [long] + shorts, realtime=False)
    ttft_behind = [behind["ttft"][i] for i in range(1, num_short + 1)]
    return dict(long_prompt_tokens=long_len, short_prompt_tokens=32, num_short=num_short,
                ttft_alone_p99_s=percentile(ttft_group, 99),
                ttft_each_alone_p99_s=percentile(ttft_each, 99),
                ttft_behind_long_p99_s=percentile(ttft_behind, 99),
                ratio=percentile(ttft_behind, 99) / percentile(ttft_group, 99),
                ratio_to_each_alone=percentile(ttft_behind, 99) / percentile(ttft_each, 99),
                long_ttft_s=behind["ttft"][0], mixed_wall_s=behind["wall_s"],
                compile_s=behind["compile_s"])


SCENARIOS = ("offline", "online", "head_of_line", "steps_per_call")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=None)
    p.add_argument("--attention", default="dense", choices=("dense", "lserve"))
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--rate", type=float, default=2.0, help="online arrivals per second")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--steps", type=int, nargs="*", default=[1, 4, 8, 16])
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--scenarios", nargs="*", default=list(SCENARIOS), choices=SCENARIOS,
                   help="which scenarios to run (default: all)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    backend = device_slug(jax.devices()[0].device_kind)
    out = Path(args.out or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"serve_throughput_{backend}.jsonl"
    path.write_text("")
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, commit=git_commit(),
                cpu_count=os.cpu_count())

    def record(scenario, system, result):
        result = {k: v for k, v in result.items() if k not in ("outputs", "ttft")}
        line = dict(scenario=scenario, system=system, attention=args.attention, **result, **meta)
        with path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        print(json.dumps({k: v for k, v in line.items() if k not in meta}), flush=True)

    def make(steps):
        return Engine(args.ckpt, attention=args.attention, max_num_seqs=args.requests,
                      max_num_batched_tokens=args.max_num_batched_tokens,
                      num_scheduler_steps=steps)

    engine = make(8)
    tok = engine.tokenizer
    offline = workload(tok, args.requests, args.seed, None)
    eng = static = None
    if "offline" in args.scenarios:
        eng = warm_then_run(engine, offline)  # as the static batch is timed after its compile
        record("offline", "engine", eng)
        static = run_static(engine, offline)
        record("offline", "static_batch", static)
        same = sum(eng["outputs"][i] == static["outputs"][i] for i in range(len(offline)))
        record("offline", "ratio", dict(
            engine_over_static=eng["tokens_per_s"] / static["tokens_per_s"],
            same_tokens=f"{same}/{len(offline)}"))
        if not args.no_hf:
            hf = run_hf(offline)
            if hf is not None:
                record("offline", "hf_generate_batch", hf)
                record("offline", "ratio",
                       dict(engine_over_hf=eng["tokens_per_s"] / hf["tokens_per_s"]))
    if "online" in args.scenarios:
        online = workload(tok, args.requests, args.seed + 1, args.rate)
        # (realtime arrivals batch differently from the warm-up: compile_s says what is left)
        record("online", "engine",
               warm_then_run(engine, online, realtime=True) | dict(rate=args.rate))
    if "head_of_line" in args.scenarios:
        record("head_of_line", "engine", head_of_line(engine, tok))
    sweep = {}
    for steps in args.steps if "steps_per_call" in args.scenarios else ():
        e = engine if steps == 8 else make(steps)
        res = warm_then_run(e, workload(tok, args.requests, args.seed + 3000, None))
        # One request arriving while the others decode: its TTFT.
        sp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        ids = [e.add_request(None, list(r.prompt[:32]), sp) for r in offline[:8]]
        calls = e.counters["decode_calls"]
        while e.counters["decode_calls"] < calls + 2:  # the batch is decoding
            e.step()
        late = e.add_request(None, list(offline[1].prompt[:32]), sp)
        final = e.run_until_done(ids + [late])
        sweep[steps] = dict(tokens_per_s=res["tokens_per_s"], late_ttft_s=final[late].metrics.ttft,
                            decode_calls=res["decode_calls"])
        record("steps_per_call", f"engine_steps_{steps}", dict(num_scheduler_steps=steps,
                                                               **sweep[steps]))
    if eng is not None and sweep:
        plot(out / f"serve_throughput_{backend}.png", eng, static, sweep)
    return 0


def plot(path: Path, eng: dict, static: dict, sweep: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.bar(["static batch", "engine"], [static["tokens_per_s"], eng["tokens_per_s"]])
    a.set_ylabel("generated tokens / s")
    a.set_title("offline workload")
    steps = sorted(sweep)
    b.plot(steps, [sweep[s]["tokens_per_s"] for s in steps], "o-", label="tokens / s")
    b.set_xlabel("decode steps per device call")
    b.set_ylabel("tokens / s")
    c = b.twinx()
    c.plot(steps, [sweep[s]["late_ttft_s"] for s in steps], "s--", color="C1",
           label="TTFT of a late request (s)")
    c.set_ylabel("TTFT (s)")
    b.set_title("steps per call")
    fig.legend(loc="lower center", ncol=2)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
