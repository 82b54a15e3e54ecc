"""Chunked prefill (`llama.prefill_chunk`) equals one-shot prefill: the last token's logits to
tolerance, the greedy continuation exactly, for chunks that split pages and logical pages, in
ragged batches, dense and LServe (page selection over dense heads; and streaming heads whose
prefill window, 3 sink + 7 local tokens, chunks split and prompts outrun)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import (AttentionConfig, LlamaConfig, SparsityConfig, init_params, kv_cache,
                    llama)

CONFIG = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2,
                     num_heads=6, num_kv_heads=2, head_dim=8, rope_theta=500.0)
PAGES = dict(page_size=4, logical_page_size=2)
DENSE = AttentionConfig(sparsity=SparsityConfig(**PAGES))
# Every head dense, 3-page budget: the selector scores pages whose statistics the chunks built.
LSERVE = AttentionConfig(mode="lserve", sparsity=SparsityConfig(
    **PAGES, token_budget=12, dec_sink_tokens=4, dec_local_tokens=4, keep_first_pages=0,
    selector_interval=2))
# A streaming head in each layer; a sink that is not a whole page.
STREAMING = AttentionConfig(mode="lserve", streaming_heads=((True, False), (False, True)),
                            sparsity=SparsityConfig(
                                **PAGES, token_budget=12, dec_sink_tokens=4, dec_local_tokens=4,
                                ctx_sink_tokens=3, ctx_local_tokens=7, keep_first_pages=0,
                                selector_interval=2))
MAX_PAGES, NEW = 12, 8

prefill = jax.jit(llama.prefill, static_argnames=("config", "attention"))
chunk = jax.jit(llama.prefill_chunk, static_argnames=("config", "attention", "fresh"))
decode = jax.jit(llama.decode, static_argnames=("config", "attention"))


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(3), scale=0.3)


def _cache(attention, lengths):
    """Pages reserved for each prompt and NEW tokens; with streaming heads, a prefill window
    page for every column of every slot (the engine's scheduler maps only the window)."""
    b = len(lengths)
    spec = llama.cache_spec(CONFIG, attention, num_pages=b * MAX_PAGES + 1, max_seqs=b,
                            max_pages_per_seq=MAX_PAGES)
    if attention.has_streaming:
        spec = dataclasses.replace(spec, num_window_pages=b * MAX_PAGES)
    cache = kv_cache.init_cache(spec)
    for slot, n in enumerate(lengths):
        cache, ok = kv_cache.reserve(cache, slot, n + NEW)
        assert bool(ok)
    if attention.has_streaming:
        table = cache.first_window_page + jnp.arange(b * MAX_PAGES, dtype=jnp.int32)
        cache = cache.replace(window_table=table.reshape(b, MAX_PAGES))
    return cache


def _continue(params, cache, logits, attention):
    """Greedy NEW tokens from the prefill's logits."""
    b = logits.shape[0]
    slots, active = jnp.arange(b, dtype=jnp.int32), jnp.ones((b,), bool)
    tokens = [jnp.argmax(logits, -1).astype(jnp.int32)]
    for _ in range(NEW - 1):
        cache, logits = decode(params, cache, tokens[-1], slots, active, config=CONFIG,
                               attention=attention)
        tokens.append(jnp.argmax(logits, -1).astype(jnp.int32))
    return np.stack([np.asarray(t) for t in tokens], 1)


def _one_shot(params, prompts, attention):
    lengths = [len(p) for p in prompts]
    tokens = np.zeros((len(prompts), 32), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    cache, logits = prefill(params, _cache(attention, lengths), jnp.asarray(tokens),
                            jnp.asarray(lengths, jnp.int32), jnp.arange(len(prompts)),
                            config=CONFIG, attention=attention)
    return logits, _continue(params, cache, logits, attention)


def _chunked(params, prompts, attention, size, fresh_first=False, greedy=True):
    """Every row prefilled `size` tokens per call (rows that are done get 0-token chunks); with
    `fresh_first` the first call is a `fresh` chunk (attention within the chunk). Returns the
    last tokens' logits and (with `greedy`) the greedy continuation."""
    lengths = np.array([len(p) for p in prompts])
    cache, done = _cache(attention, lengths), np.zeros(len(prompts), np.int32)
    last = None
    while (done < lengths).any():
        n = np.minimum(size, lengths - done)
        tokens = np.zeros((len(prompts), size), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :n[i]] = p[done[i]:done[i] + n[i]]
        cache, logits = chunk(params, cache, jnp.asarray(tokens), jnp.asarray(done, jnp.int32),
                              jnp.asarray(n, jnp.int32), jnp.arange(len(prompts)),
                              config=CONFIG, attention=attention,
                              fresh=fresh_first and not done.any())
        # a row's logits are those of the call that held its last token
        last = logits if last is None else jnp.where((n > 0)[:, None], logits, last)
        done = done + n
    assert np.array_equal(np.asarray(cache.seq_lens), lengths)
    return last, _continue(params, cache, last, attention) if greedy else None


@pytest.mark.parametrize("attention", [DENSE, LSERVE, STREAMING],
                         ids=["dense", "lserve", "lserve-streaming"])
@pytest.mark.parametrize("size,fresh_first", [(3, False), (5, False), (32, False), (6, True)])
def test_chunked_prefill_equals_one_shot(params, attention, size, fresh_first):
    rng = np.random.default_rng(size)
    prompts = [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in (23, 9, 30)]
    logits, tokens = _one_shot(params, prompts, attention)
    chunk_logits, chunk_tokens = _chunked(params, prompts, attention, size, fresh_first)
    np.testing.assert_allclose(np.asarray(chunk_logits), np.asarray(logits), atol=2e-4,
                               rtol=2e-4)
    np.testing.assert_array_equal(chunk_tokens, tokens)


def test_chunks_through_the_paged_prefill_kernel_equal_the_reference(params):
    """impl="triton" (interpret mode): every later chunk runs the paged prefill kernel over
    both pools (dense pages, streaming heads' window pages), equal to the jnp path."""
    attention = dataclasses.replace(STREAMING, sparsity=dataclasses.replace(
        STREAMING.sparsity, page_size=16, logical_page_size=8, token_budget=48,
        dec_sink_tokens=16, dec_local_tokens=16))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in (23, 9, 30)]
    reference, _ = _chunked(params, prompts, attention, 6, greedy=False)
    kernel = dataclasses.replace(attention, impl="triton", interpret=True)
    got, _ = _chunked(params, prompts, kernel, 6, greedy=False)
    np.testing.assert_allclose(np.asarray(got), np.asarray(reference), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("attention", [DENSE, STREAMING], ids=["dense", "lserve-streaming"])
@pytest.mark.parametrize("shared_pages", [2, 4])
def test_a_chunk_after_shared_prefix_pages_equals_one_shot(params, attention, shared_pages):
    """A prefix-cache hit at the device: slot 1 reads slot 0's first pages (and, with streaming
    heads, their prefill window pages) instead of computing them, and prefills only the rest.
    Its logits and greedy continuation equal a one-shot prefill: the chunk rebuilt slot 1's
    decode sink and ring (4 + 8 tokens) from the shared window pages."""
    rng = np.random.default_rng(shared_pages)
    p0 = rng.integers(0, CONFIG.vocab_size, 23).tolist()
    m = shared_pages * PAGES["page_size"]
    p1 = p0[:m] + rng.integers(0, CONFIG.vocab_size, 9).tolist()
    logits, tokens = _one_shot(params, [p0, p1], attention)
    cache = _cache(attention, [len(p0), len(p1)])
    batch = np.zeros((2, 32), np.int32)
    batch[0, :len(p0)] = p0
    cache, first = chunk(params, cache, jnp.asarray(batch), jnp.zeros(2, jnp.int32),
                         jnp.array([len(p0), 0], jnp.int32), jnp.arange(2), config=CONFIG,
                         attention=attention, fresh=True)
    shared = dict(page_table=cache.page_table.at[1, :shared_pages].set(
        cache.page_table[0, :shared_pages]))
    if attention.has_streaming:
        shared["window_table"] = cache.window_table.at[1, :shared_pages].set(
            cache.window_table[0, :shared_pages])
    cache = cache.replace(**shared)
    batch = np.zeros((2, 32), np.int32)
    batch[1, :len(p1) - m] = p1[m:]
    cache, second = chunk(params, cache, jnp.asarray(batch), jnp.array([len(p0), m], jnp.int32),
                          jnp.array([0, len(p1) - m], jnp.int32), jnp.arange(2), config=CONFIG,
                          attention=attention)
    last = jnp.stack([first[0], second[1]])
    np.testing.assert_allclose(np.asarray(last), np.asarray(logits), atol=2e-4, rtol=2e-4)
    np.testing.assert_array_equal(_continue(params, cache, last, attention), tokens)


def test_a_zero_token_chunk_leaves_its_row_alone(params):
    cache = _cache(DENSE, [6, 6])
    tokens = jnp.asarray(np.arange(12, dtype=np.int32).reshape(2, 6))
    cache, _ = chunk(params, cache, tokens, jnp.zeros(2, jnp.int32), jnp.array([6, 0]),
                     jnp.arange(2), config=CONFIG, attention=DENSE)
    assert np.asarray(cache.seq_lens).tolist() == [6, 0]
    row1 = np.asarray(cache.k[0][:, np.asarray(cache.page_table[1])])
    assert not row1.any()  # nothing was written for the empty chunk


def test_streaming_chunks_need_window_pages(params):
    cache = kv_cache.init_cache(llama.cache_spec(CONFIG, STREAMING, num_pages=13, max_seqs=1,
                                                 max_pages_per_seq=MAX_PAGES))
    with pytest.raises(ValueError, match="prefill window"):
        llama.prefill_chunk(params, cache, jnp.zeros((1, 6), jnp.int32), jnp.zeros(1, jnp.int32),
                            jnp.array([6]), jnp.arange(1), config=CONFIG, attention=STREAMING)


def test_windowless_keys_are_not_seen(params):
    """A window table that drops the keys outside the Λ window changes nothing; one that drops a
    key inside it changes the logits (so the window is what streaming heads read)."""
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, CONFIG.vocab_size, 24).tolist()
    (logits,), _ = _one_shot(params, [prompt], STREAMING)

    def run(drop_columns):
        """The window loses `drop_columns` after the first chunk (which reads its own keys
        from every column it writes), as the scheduler gives back columns no later chunk
        reads."""
        cache = _cache(STREAMING, [24])
        for start in (0, 20):
            n = 20 if start == 0 else 4
            if start:
                table = np.asarray(cache.window_table).copy()
                table[0, drop_columns] = kv_cache.NULL_PAGE
                cache = cache.replace(window_table=jnp.asarray(table))
            tokens = np.zeros((1, 20), np.int32)
            tokens[0, :n] = prompt[start:start + n]
            cache, out = chunk(params, cache, jnp.asarray(tokens), jnp.array([start]),
                               jnp.array([n]), jnp.arange(1), config=CONFIG, attention=STREAMING)
        return np.asarray(out[0])

    # The last chunk [20, 24) sees keys < 3 and > 20 - 7 = 13: columns 1-2 (keys 4..11) unseen.
    np.testing.assert_allclose(run([1, 2]), np.asarray(logits), atol=2e-4, rtol=2e-4)
    assert not np.allclose(run([3]), np.asarray(logits), atol=1e-3)
