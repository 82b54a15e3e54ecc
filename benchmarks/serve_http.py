"""What HTTP costs: the serving benchmark's offline workload through the OpenAI server.

    python -m benchmarks.serve_http [--requests 24] [--clients 24] [--ckpt ...]

In one run, on one engine (so both paths use the same compiled steps): (a) the requests fed to
the engine directly (`benchmarks/serve_throughput.run_engine`, after a warm-up on them), and
(b) the same requests sent to the server (`lserve_jax.server`, 127.0.0.1, in this process) by
concurrent streaming clients (httpx, server-sent events, token-id prompts, greedy), after a
warm-up over HTTP. Reports throughput (generated tokens / s), time to first token and
inter-chunk latency p50/p99 as the clients see them, and the ratio HTTP / engine (the target:
HTTP costs at most 10%, ratio >= 0.9). Greedy outputs over HTTP are checked against the
engine's. Writes serve_http_<backend>.jsonl under --out (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import jax
import numpy as np
import uvicorn

from benchmarks.provenance import device_slug, git_commit
from benchmarks.serve_throughput import percentile, run_engine, workload
from lserve_jax import Engine
from lserve_jax.server.app import build_app
from lserve_jax.server.metrics import ServerMetrics
from lserve_jax.server.runner import EngineRunner


def start_server(engine: Engine):
    metrics = ServerMetrics("bench")
    runner = EngineRunner(engine, on_step=metrics.on_step)
    runner.start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(build_app(runner, model_name="bench",
                                                     metrics=metrics), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread, runner


async def _one(client, req) -> dict:
    t0 = time.perf_counter()
    stamps, ids = [], []
    body = {"prompt": list(req.prompt), "max_tokens": req.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "logprobs": None}
    text = ""
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice["text"]:
                stamps.append(time.perf_counter())
                text += choice["text"]
    return dict(ttft=stamps[0] - t0 if stamps else None,
                gaps=list(np.diff(stamps)), text=text, wall=time.perf_counter() - t0)


async def run_http(url: str, reqs, clients: int) -> dict:
    queue = asyncio.Queue()
    for i, r in enumerate(reqs):
        queue.put_nowait((i, r))
    results = {}

    async def worker(client):
        while not queue.empty():
            i, r = queue.get_nowait()
            results[i] = await _one(client, r)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    wall = time.perf_counter() - t0
    return dict(wall_s=wall, results=results)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=None)
    p.add_argument("--attention", default="dense", choices=("dense", "lserve"))
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--clients", type=int, default=24, help="concurrent streaming clients")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    backend = device_slug(jax.devices()[0].device_kind)
    out = Path(args.out or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"serve_http_{backend}.jsonl"
    path.write_text("")
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, commit=git_commit(),
                cpu_count=os.cpu_count(), attention=args.attention)

    def record(system, result):
        line = dict(scenario="offline", system=system, **result, **meta)
        with path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        print(json.dumps({k: v for k, v in line.items() if k not in meta}), flush=True)

    engine = Engine(args.ckpt, attention=args.attention, max_num_seqs=args.requests,
                    max_num_batched_tokens=args.max_num_batched_tokens)
    reqs = workload(engine.tokenizer, args.requests, args.seed, None)
    run_engine(engine, reqs, realtime=False)  # warm-up: compiles the buckets
    engine.reset_prefix_cache()
    direct = run_engine(engine, reqs, realtime=False)
    engine.reset_prefix_cache()
    record("engine", {k: v for k, v in direct.items() if k not in ("outputs", "ttft")})
    texts = {i: engine.tokenizer.decode(ids) for i, ids in direct["outputs"].items()}

    url, server, thread, runner = start_server(engine)
    try:
        asyncio.run(run_http(url, reqs, args.clients))  # warm-up over HTTP
        runner.call(lambda e: e.reset_prefix_cache())
        http = asyncio.run(run_http(url, reqs, args.clients))
    finally:
        server.should_exit = True
        thread.join(30)
        runner.stop()
    res = http["results"]
    generated = direct["generated_tokens"]  # the same tokens (checked below)
    same = sum(res[i]["text"] == texts[i] for i in range(len(reqs)))
    ttft = [r["ttft"] for r in res.values() if r["ttft"] is not None]
    gaps = [g for r in res.values() for g in r["gaps"]]
    record("http", dict(requests=len(res), clients=args.clients, generated_tokens=generated,
                        wall_s=http["wall_s"], tokens_per_s=generated / http["wall_s"],
                        ttft_p50_s=percentile(ttft, 50), ttft_p99_s=percentile(ttft, 99),
                        inter_chunk_p50_s=percentile(gaps, 50),
                        inter_chunk_p99_s=percentile(gaps, 99),
                        same_text=f"{same}/{len(reqs)}"))
    ratio = (generated / http["wall_s"]) / direct["tokens_per_s"]
    record("ratio", dict(http_over_engine=ratio, target=">= 0.9"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
