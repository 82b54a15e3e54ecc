"""Shared test settings: one tolerance table keyed by dtype, the `gpu` marker, CPU defaults."""

import os

# Tests run on the CPU unless a GPU is present; keep XLA from grabbing all host threads' memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# No persistent compilation cache unless a test asks for one (tests/test_api.py): each test
# compiles what it runs, sharing no entries with the other test worker or an earlier checkout.
os.environ.setdefault("LSERVE_JAX_COMPILATION_CACHE", "0")

# tests/multi_device/ needs several devices, which XLA_FLAGS gives only before JAX starts: it
# runs in a subprocess of its own (tests/test_parallel.py), not in this process.
collect_ignore = [] if os.environ.get("LSERVE_MULTI_DEVICE") else ["multi_device"]

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

# Absolute/relative tolerances for comparing a kernel against its plain-jnp reference.
# bf16 has 8 mantissa bits; f16 has 11; f32 kernels on GPU may use TF32 dots unless told otherwise.
TOLERANCES = {
    jnp.dtype(jnp.float32): dict(atol=2e-5, rtol=2e-5),
    jnp.dtype(jnp.bfloat16): dict(atol=2e-2, rtol=2e-2),
    jnp.dtype(jnp.float16): dict(atol=2e-3, rtol=2e-3),
}


def tolerance(dtype) -> dict:
    """Return `dict(atol=..., rtol=...)` for outputs of `dtype`."""
    return TOLERANCES[jnp.dtype(dtype)]


def assert_close(actual, expected, dtype=None):
    """Compare in f32 with the tolerance of `dtype` (default: `actual`'s dtype)."""
    dtype = actual.dtype if dtype is None else dtype
    np.testing.assert_allclose(
        np.asarray(actual, np.float32), np.asarray(expected, np.float32), **tolerance(dtype)
    )


def has_gpu() -> bool:
    try:
        return len(jax.devices("gpu")) > 0
    except RuntimeError:
        return False


def lower_for_cuda(traced) -> str:
    """StableHLO text of a traced op lowered for CUDA, for the CPU-side Triton lowering tests.
    From JAX 0.11 the Triton lowering needs a GPU to be present; without one that is a skip,
    not a failure."""
    try:
        return traced.lower(lowering_platforms=("cuda",)).as_text()
    except Exception as e:  # noqa: BLE001 - only the missing-GPU error is a skip
        if "No supported GPU devices found" in str(e):
            pytest.skip("this JAX lowers Triton kernels only with a GPU present")
        raise


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Free each test module's compiled programs when it ends. A test worker runs hundreds of
    compiles, and XLA:CPU maps every compiled kernel separately: kept for the whole session
    they pass the kernel's limit on memory mappings (vm.max_map_count), where the next
    compile dies with a segmentation fault."""
    yield
    from lserve_jax.engine import engine

    engine.release_compiled_steps()


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def gather_pages(pool, page_table):
    """Contiguous view of each sequence's pages, for checking what a pool holds.

    pool [Hkv, P, S, D]; page_table [B, max_pages] -> [B, Hkv, max_pages * S, D].
    """
    g = pool[:, page_table]  # [Hkv, B, max_pages, S, D]
    hkv, b, n, s, d = g.shape
    return jnp.moveaxis(g, 1, 0).reshape(b, hkv, n * s, d)


def greedy_sampling(b):
    from lserve_jax.sampling import SamplingArrays

    return SamplingArrays(temperature=jnp.zeros(b), top_k=jnp.zeros(b, jnp.int32),
                          top_p=jnp.ones(b), keys=jnp.zeros((b, 2), jnp.uint32))


def generate_greedy(params, config, attention, prompts, n, *, t=16, slots=None, max_seqs=None,
                    spec_overrides=None):
    """Greedy n tokens per prompt (padded to t tokens, so equal batch sizes share a compile)
    through the jitted start + run loop on a fresh cache with `attention.sparsity`'s page sizes;
    returns ids [B, n] and the state."""
    import dataclasses

    from lserve_jax import decode_loop
    from models import kv_cache, llama

    b = len(prompts)
    slots = list(range(b)) if slots is None else slots
    pages = -(-(t + n) // attention.sparsity.page_size)
    spec = llama.cache_spec(config, attention, num_pages=(max_seqs or b) * pages + 1,
                            max_seqs=max_seqs or b, max_pages_per_seq=pages)
    cache = kv_cache.init_cache(dataclasses.replace(spec, **(spec_overrides or {})))
    for s, p in zip(slots, prompts):
        cache, ok = kv_cache.reserve(cache, s, len(p) + n)
        assert bool(ok)
    tokens = np.zeros((b, t), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    state = decode_loop.start(params, cache, jnp.asarray(tokens),
                              jnp.asarray([len(p) for p in prompts], jnp.int32),
                              jnp.asarray(slots, jnp.int32), greedy_sampling(b),
                              jnp.full((b,), n, jnp.int32), jnp.full((b, 1), -1, jnp.int32),
                              config=config, attention=attention, capacity=n)
    state = decode_loop.run(params, state, config=config, attention=attention, num_steps=n)
    return np.asarray(state.out_tokens), state


# Engine knobs for the tiny converted model (`convert_tiny_llama`, max_position_embeddings
# 256): pages of 8 tokens, and for LServe windows, budget and interval scaled to it, with a
# head pattern that streams KV head 1 of layer 0 and KV head 0 of layer 1.
TINY_HEAD_PATTERN = "0.9\t0.1\n0.2\t0.8\n"
TINY_LSERVE = dict(attention="lserve", page_size=8, logical_page_size=4, ctx_sink_tokens=8,
                   ctx_local_tokens=32, dec_sink_tokens=8, dec_local_tokens=16, token_budget=24,
                   selector_interval=2, static_sparsity=0.5)


def tiny_engine_knobs(mode: str, tmp_path) -> dict:
    """`Engine` keyword arguments for "dense" or "lserve" on the tiny converted model (the
    LServe head pattern is written into tmp_path)."""
    if mode == "dense":
        return dict(page_size=8, logical_page_size=4)
    (tmp_path / "heads.tsv").write_text(TINY_HEAD_PATTERN)
    return dict(TINY_LSERVE, head_pattern=str(tmp_path / "heads.tsv"))


def greedy_closeness(reference, results, gap: float) -> tuple[int, float]:
    """Compare two greedy runs' RequestOutputs (with logprobs) token by token: while the runs
    agree, the largest difference of the chosen token's log-probability; where they first
    differ, the second run's choice must be within `gap` of the reference's best (a near tie
    may flip). Returns (tokens agreed before the first difference, summed over the requests,
    that largest difference)."""
    agree, largest = 0, 0.0
    for a, b in zip(reference, results, strict=True):
        for j, (ta, tb) in enumerate(zip(a.token_ids, b.token_ids)):
            la, lb = a.outputs[0].logprobs[j], b.outputs[0].logprobs[j]
            if ta != tb:
                assert tb in la and la[ta].logprob - la[tb].logprob < gap, (j, ta, tb)
                break
            agree += 1
            largest = max(largest, abs(la[ta].logprob - lb[tb].logprob))
    return agree, largest


def convert_tiny_llama(tmp_path_factory, *, vocab_size=128, max_position_embeddings=96,
                       tokenizer_from=None, tie_word_embeddings=False, num_heads=4,
                       num_kv_heads=2, hidden_size=32, intermediate_size=64):
    """A tiny random HF Llama (2 layers, 4 query / 2 KV heads, hidden 32 by default) saved and
    converted; with `tokenizer_from`, that directory's tokenizer files are copied in first."""
    import shutil

    import torch
    import transformers

    import convert

    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=2, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=tie_word_embeddings)
    torch.manual_seed(0)
    src = tmp_path_factory.mktemp("hf") / "tiny"
    transformers.LlamaForCausalLM(config).save_pretrained(src, safe_serialization=True)
    if tokenizer_from is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_from / name, src / name)
    return convert.convert(src, tmp_path_factory.mktemp("conv") / "tiny", progress=False)


WORDS = [f"w{i}" for i in range(125)] + ["system", "assistant", "user"]  # id -> text
WORD_CHAT_TEMPLATE = ("{% for m in messages %}w3 {{ m['role'] }} {{ m['content'] }} w4 "
                      "{% endfor %}{% if add_generation_prompt %}w3 assistant {% endif %}")


def convert_word_llama(tmp_path_factory, *, max_position_embeddings=256):
    """The tiny random Llama (128 ids) with a word-level tokenizer over `WORDS` (text is the
    ids' words joined by spaces: "w5 w17 ..."), EOS "w2" and a small chat template."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    src = tmp_path_factory.mktemp("tok")
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "w2", "chat_template": WORD_CHAT_TEMPLATE}))
    return convert_tiny_llama(tmp_path_factory, vocab_size=len(WORDS),
                              max_position_embeddings=max_position_embeddings,
                              tokenizer_from=src)
