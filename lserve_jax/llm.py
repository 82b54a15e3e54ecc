"""`LLM`: the offline Python API (in the spirit of vLLM's `LLM.generate`), a thin loop over the
serving engine (lserve_jax/engine/engine.py): every prompt becomes a request, the engine steps
until all are done. One generation path serves this API, the CLI and (later) the server.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Sequence

from lserve_jax import inputs
from lserve_jax.engine.engine import (ATTENTION_CHOICES, DTYPES, RequestOutput,
                                      default_impl)
from lserve_jax.engine.data_parallel import create_engine
from lserve_jax.sampling import SamplingParams

log = logging.getLogger("lserve_jax")

__all__ = ["ATTENTION_CHOICES", "DTYPES", "GenerationStats", "LLM", "RequestOutput",
           "default_impl"]


@dataclasses.dataclass
class GenerationStats:
    """Timings of the last `generate` call, compile time kept apart from run time: steps that
    ran prefill rows count as prefill, the others as decode."""

    compile_s: float = 0.0
    prefill_ms: float = 0.0
    decode_s: float = 0.0
    decode_tokens: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


class LLM:
    """A loaded model ready to generate.

    ckpt: a converted checkpoint directory, a HF checkpoint directory, a `.gguf` file (both
    converted on first use into a cache), or None for the embedded SmolLM2-135M-Instruct.
    attention: "dense" or "lserve". dtype: "auto" (float32 on the CPU, the checkpoint's
    16-bit dtype on a GPU), "float32", "bfloat16" or "float16".
    impl: "triton", "xla" or "mosaic" (pallas_kernels/impls.py; default: triton on a GPU, xla
    elsewhere; "pallas" means "triton"). verify: check every file's checksum
    before loading (sizes are always checked; checksums on the first load after a conversion;
    README "Checkpoint integrity"). The engine's capacity arguments (`max_num_seqs`,
    `max_num_batched_tokens`, `max_model_len`, `kv_cache_memory_gb` or `num_pages`,
    `enable_prefix_caching`) and the quantization knobs (`kv_cache_dtype`, `weight_dtype`:
    "auto" or "int8", models/weight_quant.py) and `tensor_parallel_size` are `Engine`'s;
    `data_parallel_size` M > 1 runs M engine replicas (`DataParallelEngine`, each on
    `tensor_parallel_size` devices of a (dp, tp) mesh); the remaining keyword arguments
    are LServe's sparsity knobs (see `SparsityConfig`). With attention="lserve" and no
    `head_pattern`, the embedded model uses its shipped calibrated pattern
    (lserve_jax/attn_patterns/); other checkpoints then treat every head as dense.
    """

    def __init__(self, ckpt: str | None = None, **kwargs):
        self.engine = create_engine(ckpt, **kwargs)
        self.stats = GenerationStats()
        self._calls = itertools.count()

    # The loaded model, as the engine holds it.
    config = property(lambda self: self.engine.config)
    params = property(lambda self: self.engine.params,
                      lambda self, value: setattr(self.engine, "params", value))
    tokenizer = property(lambda self: self.engine.tokenizer)
    attention = property(lambda self: self.engine.attention)
    attention_mode = property(lambda self: self.engine.attention_mode)
    sparsity = property(lambda self: self.engine.sparsity)
    impl = property(lambda self: self.engine.impl)
    weight_dtype = property(lambda self: self.engine.weight_dtype)
    head_pattern = property(lambda self: self.engine.head_pattern)
    checkpoint_path = property(lambda self: self.engine.checkpoint_path)
    compilation_cache = property(lambda self: self.engine.compilation_cache)

    # ---- public API --------------------------------------------------------------------------

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 on_tokens: Callable[[int, list[int]], None] | None = None,
                 stream_interval: int = 8) -> list[RequestOutput]:
        """Generate a continuation for each prompt.

        prompts: a string, a list of token ids (one prompt), or a list of strings (needs a
        tokenizer) and/or token-id lists. sampling_params: one for all prompts or one per prompt.
        `on_tokens(row, new_ids)` is called after every `stream_interval` (>= 1) engine steps
        with the ids each row's first completion gained (for streaming). A row whose logits turn non-finite ends
        with finish_reason "error" and `error` naming the token; the other rows are unaffected.
        Every prompt is checked before any runs: a bad one raises and nothing is generated.
        """
        prompts = inputs.normalize_prompts(prompts)
        stream_interval = inputs.check_stream_interval(stream_interval)
        if on_tokens is not None and not callable(on_tokens):
            raise TypeError(f"on_tokens={on_tokens!r} must be callable")
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        sampling_params = list(sampling_params)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts")
        engine = self.engine
        call = next(self._calls)
        ids = [(call, i) for i in range(len(prompts))]
        try:
            for i, (rid, prompt, sp) in enumerate(zip(ids, prompts, sampling_params)):
                engine._add_request(rid, prompt, sp, f"prompt {i}")
        except Exception:
            for rid in ids:
                if rid in engine._parents:
                    engine.abort_request(rid)
            raise
        stats = GenerationStats()
        compile_before = engine.compile_s
        final: dict = {}
        pending: dict[int, list[int]] = {}
        steps = 0
        while len(final) < len(ids):
            prefill_calls = engine.counters["prefill_calls"]
            compiled = engine.compile_s
            t0 = time.perf_counter()
            outs = engine.step()
            seconds = time.perf_counter() - t0 - (engine.compile_s - compiled)
            new = 0
            for out in outs:
                if out.request_id[0] != call:
                    continue
                row = out.request_id[1]
                new += sum(len(c.new_token_ids) for c in out.outputs)
                if out.new_token_ids:
                    pending.setdefault(row, []).extend(out.new_token_ids)
                if out.finished:
                    final[out.request_id] = out
            if engine.counters["prefill_calls"] != prefill_calls:
                stats.prefill_ms += 1e3 * seconds
            else:
                stats.decode_s += seconds
                stats.decode_tokens += new
            steps += 1
            if on_tokens is not None and (steps % stream_interval == 0
                                          or len(final) == len(ids)):
                for row in sorted(pending):
                    on_tokens(row, pending[row])
                pending.clear()
        stats.compile_s = engine.compile_s - compile_before
        self.stats = stats
        outputs = [final[rid] for rid in ids]
        for out in outputs:
            out.request_id = str(out.request_id[1])  # the row; call numbers are internal
        return outputs

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams] | None
             = None, **kwargs) -> list[RequestOutput]:
        """Generate the assistant's reply to a conversation, or to each of a list of them.

        messages: [{"role": "system" | "user" | "assistant", "content": str}, ...] (multi-turn),
        or a list of such lists. Each conversation is rendered with the model's chat template
        (with the generation prompt) and generated as `generate` does (same keywords)."""
        conversations = inputs.normalize_conversations(messages)
        prompts = [self.engine.render_chat(c) for c in conversations]
        return self.generate(prompts, sampling_params, **kwargs)

    def chat_prompt(self, message: str) -> str:
        """Render one user message with the tokenizer's chat template."""
        return self.engine.chat_prompt(message)
