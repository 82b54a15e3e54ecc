"""LServe decode: the two page pools, the page selector with reuse, and the paged decode kernel in
the model, checked against brute force and against dense attention."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import generate_greedy
from models import AttentionConfig, LlamaConfig, SparsityConfig, init_params, kv_cache, llama
from models.attention import decode_attention, select_pages_for_step
from models.page_selector import reference_select_pages

CONFIG = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2,
                     num_heads=6, num_kv_heads=2, head_dim=8, rope_theta=500.0)
MIXED = ((True, False), (False, True))
# The generation tests' pages: 4 tokens, statistics per 2.
PAGES = dict(page_size=4, logical_page_size=2)


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(0), scale=0.3)


def _generate(params, attention, prompts, n, t=32, **kw):
    return generate_greedy(params, CONFIG, attention, prompts, n, t=t, **kw)


def _prompts(seed, lengths):
    rng = np.random.RandomState(seed)
    return [rng.randint(0, CONFIG.vocab_size, n).tolist() for n in lengths]


# ---- one decode step against brute force ---------------------------------------------------

def _brute_force_step(q, keys, values, n, flags, *, page_size, lps, budget_pages, sink, local,
                      per_query_head, keep_first_pages=0):
    """NumPy decode attention of one sequence: keys/values [Hkv, n, D] in sequence order."""
    hq, d = q.shape
    hkv = keys.shape[0]
    g = hq // hkv
    out = np.zeros((hq, d))
    num_pages = -(-n // page_size)
    for kv in range(hkv):
        heads = range(kv * g, (kv + 1) * g)
        if flags[kv]:
            seen = {h: [j for j in range(n) if j < sink or j > n - 1 - local] for h in heads}
        else:
            # Quest bound per logical page from the true keys, max over a page's logical pages.
            scores = np.full((g, num_pages), -np.inf)
            for j in range(-(-n // lps)):
                chunk = keys[kv, j * lps:min((j + 1) * lps, n)]
                kmax, kmin = chunk.max(0), chunk.min(0)
                for i, h in enumerate(heads):
                    s = np.maximum(q[h] * kmax, q[h] * kmin).sum()
                    p = j * lps // page_size
                    scores[i, p] = max(scores[i, p], s)
            if not per_query_head:
                scores = scores.max(0, keepdims=True)
            chosen, valid = reference_select_pages(scores[None].astype(np.float32),
                                                   np.array([num_pages]), budget_pages,
                                                   keep_first_pages)
            lists = [chosen[0, i][valid[0, i]] for i in range(len(scores))]
            seen = {h: [j for p in lists[i if per_query_head else 0]
                        for j in range(p * page_size, min((p + 1) * page_size, n))]
                    for i, h in enumerate(heads)}
        for h in heads:
            idx = seen[h]
            logits = keys[kv, idx] @ q[h] / math.sqrt(d)
            w = np.exp(logits - logits.max())
            out[h] = (w / w.sum()) @ values[kv, idx]
    return out


@pytest.mark.parametrize("per_query_head, keep_first", [(False, 0), (True, 0), (False, 1)])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_decode_step_matches_brute_force(per_query_head, keep_first, impl):
    """Random keys written by prefill + appends into both pools (pages handed out interleaved
    between slots); one step's selection and attention equal a NumPy brute force."""
    # The Pallas kernel needs pages of >= 16 tokens: scale every size with the page.
    scale = 1 if impl == "xla" else 4
    page_size, lps, sink, local, budget = (x * scale for x in (4, 2, 4, 8, 12))
    flags = (True, False, False)  # KV heads 0: streaming; 1, 2: dense
    hkv, g, d = 3, 2, 16
    sparsity = SparsityConfig(page_size=page_size, logical_page_size=lps, dec_sink_tokens=sink,
                              dec_local_tokens=local, token_budget=budget,
                              page_selection="query_head" if per_query_head else "kv_head",
                              keep_first_pages=keep_first)
    attention = AttentionConfig(mode="lserve", impl=impl, interpret=True,
                                streaming_heads=(flags,), sparsity=sparsity)
    config = LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=8, num_layers=1,
                         num_heads=hkv * g, num_kv_heads=hkv, head_dim=d)
    spec = llama.cache_spec(config, attention, num_pages=40, page_size=page_size, max_seqs=3,
                            max_pages_per_seq=12, logical_page_size=lps)
    cache = kv_cache.init_cache(spec)
    lengths = [37 * scale, 9 * scale, 23 * scale]  # long history, short (all pages), ring wrapped
    for grow in range(page_size, 40 * scale + 1, page_size):  # interleave the slots' pages
        for slot, n in enumerate(lengths):
            cache, ok = kv_cache.reserve(cache, slot, min(n, grow))
            assert bool(ok)
    rng = np.random.RandomState(0)
    keys = [rng.randn(hkv, n, d).astype(np.float32) for n in lengths]
    values = [rng.randn(hkv, n, d).astype(np.float32) for n in lengths]
    slots = jnp.arange(3, dtype=jnp.int32)
    # With impl="pallas", the one-token appends go through the append kernel (interpret mode).
    write = jax.jit(functools.partial(kv_cache.write_tokens, impl=impl, interpret=True),
                    static_argnames=("layer", "streaming_heads", "layout"))
    layout = sparsity.streaming_layout

    def put(cache, start, stop):
        t = stop - start
        positions = jnp.asarray(np.broadcast_to(np.arange(start, stop), (3, t)))
        valid = positions < jnp.asarray(lengths)[:, None]
        k = np.zeros((3, t, hkv, d), np.float32)
        v = np.zeros((3, t, hkv, d), np.float32)
        for b, n in enumerate(lengths):
            m = max(0, min(stop, n) - start)
            k[b, :m] = keys[b][:, start:start + m].transpose(1, 0, 2)
            v[b, :m] = values[b][:, start:start + m].transpose(1, 0, 2)
        return write(cache, layer=0, slots=slots, positions=positions, valid=valid,
                     lengths=jnp.minimum(jnp.asarray(lengths), stop), k=jnp.asarray(k),
                     v=jnp.asarray(v), streaming_heads=flags, layout=layout)

    prefill_len = 7 * scale
    cache = put(cache, 0, prefill_len)           # a prefill ...
    for i in range(prefill_len, max(lengths)):   # ... then one token at a time
        cache = put(cache, i, i + 1)
    q = rng.randn(3, hkv * g, d).astype(np.float32)
    n = jnp.asarray(lengths)

    @jax.jit
    def step(cache, q):
        selected = select_pages_for_step(q, cache, slots, n, jnp.ones(3, bool), layer=0,
                                         config=attention)
        return decode_attention(q, cache, slots, n, selected, layer=0, config=attention)

    got = np.asarray(step(cache, jnp.asarray(q)))
    assert np.isfinite(got).all()
    for b in range(3):
        want = _brute_force_step(q[b], keys[b], values[b], lengths[b], flags,
                                 page_size=page_size, lps=lps, budget_pages=budget // page_size,
                                 sink=sink, local=local, per_query_head=per_query_head,
                                 keep_first_pages=keep_first)
        np.testing.assert_allclose(got[b], want, rtol=2e-5, atol=2e-5, err_msg=f"row {b}")


# ---- the model end to end --------------------------------------------------------------------

@pytest.mark.parametrize("page_selection, streaming_heads", [
    ("kv_head", MIXED), ("query_head", MIXED),
    ("kv_head", ((True, True), (False, False))),  # a layer with no dense head, one with no streaming
])
def test_covering_budget_and_windows_equal_dense(params, page_selection, streaming_heads):
    """LServe with a token budget and decode windows covering the whole sequence generates the
    dense tokens, token for token (greedy, f32), on a ragged batch with mixed head kinds."""
    prompts = _prompts(0, (30, 17, 5))
    dense, _ = _generate(params, AttentionConfig(sparsity=SparsityConfig(**PAGES)), prompts, 20)
    sparsity = SparsityConfig(**PAGES, ctx_local_tokens=64, dec_sink_tokens=4,
                              dec_local_tokens=64, token_budget=64, selector_interval=3,
                              page_selection=page_selection)
    attention = AttentionConfig(mode="lserve", streaming_heads=streaming_heads,
                                sparsity=sparsity)
    lserve, state = _generate(params, attention, prompts, 20)
    np.testing.assert_array_equal(lserve, dense)
    # Each pool holds its kind of head only.
    for layer, flags in enumerate(streaming_heads):
        assert state.cache.sk[layer].shape[0] == sum(flags)
        assert state.cache.k[layer].shape[0] == len(flags) - sum(flags)


def test_small_budget_logits_match_decode_reference(params):
    """With a budget and windows far smaller than the sequence, every decode step's logits
    equal those of the same step with the Pallas kernel in interpret mode (the two impls agree
    through selection, ring wraparound and reuse), and differ from dense."""
    prompts = _prompts(1, (70, 30))
    pages = dict(page_size=16, logical_page_size=4)  # the kernel's pages are >= 16 tokens
    # keep_first_pages=0: LServe's selection rule (the shipped 1 is covered by the brute-force
    # test above).
    sparsity = SparsityConfig(**pages, ctx_sink_tokens=16, ctx_local_tokens=32,
                              dec_sink_tokens=16, dec_local_tokens=32, token_budget=48,
                              selector_interval=2, keep_first_pages=0)
    kw = dict(mode="lserve", streaming_heads=MIXED, sparsity=sparsity)
    xla, _ = _generate(params, AttentionConfig(**kw), prompts, 24, t=96)
    pallas, _ = _generate(params, AttentionConfig(impl="pallas", interpret=True, **kw), prompts,
                          24, t=96)
    np.testing.assert_array_equal(pallas, xla)
    dense, _ = _generate(params, AttentionConfig(sparsity=SparsityConfig(**pages)), prompts, 24,
                         t=96)
    assert (xla != dense).any()  # the sparsity is real on this random model


@pytest.mark.parametrize("kv_cache_dtype", [
    "int8", "int4", pytest.param("fp8", marks=pytest.mark.slow)])  # fp8: int8's path, other dtype
def test_quantized_cache_kernel_equals_reference(params, kv_cache_dtype):
    """On an int8 / int4 cache (both pools quantized), greedy LServe decode through the Pallas
    kernel in interpret mode (pages dequantized in registers) generates the XLA path's tokens
    (pages dequantized after the gather), through selection, ring wraparound and reuse."""
    prompts = _prompts(3, (70, 30))
    sparsity = SparsityConfig(page_size=16, logical_page_size=4, ctx_sink_tokens=16,
                              ctx_local_tokens=32, dec_sink_tokens=16, dec_local_tokens=32,
                              token_budget=48, selector_interval=2)
    kw = dict(mode="lserve", streaming_heads=MIXED, sparsity=sparsity)
    quantized = dict(kv_cache_dtype=kv_cache_dtype, kv_scales=((0.05, 0.04), (0.06, 0.05)))
    xla, state = _generate(params, AttentionConfig(**kw), prompts, 12, t=96,
                           spec_overrides=quantized)
    assert state.cache.kv_cache_dtype == kv_cache_dtype
    pallas, _ = _generate(params, AttentionConfig(impl="pallas", interpret=True, **kw), prompts,
                          12, t=96, spec_overrides=quantized)
    np.testing.assert_array_equal(pallas, xla)


def test_selection_is_reused_between_intervals(params):
    """The stored selection changes only on a row's reselection steps: its clock hits a multiple
    of `selector_interval`, or it started a new page."""
    prompts = _prompts(2, (31,))
    history = {}
    for interval in (1, 3):
        # keep_first_pages=0: LServe's rule, so every page's score counts.
        sparsity = SparsityConfig(**PAGES, token_budget=12, selector_interval=interval,
                                  page_selection="query_head", keep_first_pages=0)
        attention = AttentionConfig(mode="lserve", sparsity=sparsity)
        spec = llama.cache_spec(CONFIG, attention, num_pages=20, max_seqs=1,
                                max_pages_per_seq=16)
        cache, _ = kv_cache.reserve(kv_cache.init_cache(spec), 0, 60)
        prefill = jax.jit(llama.prefill, static_argnames=("config", "attention"))
        decode = jax.jit(llama.decode, static_argnames=("config", "attention"))
        cache, logits = prefill(params, cache, jnp.asarray([prompts[0]]), jnp.array([31]),
                                jnp.array([0]), config=CONFIG, attention=attention)
        token = jnp.argmax(logits, -1).astype(jnp.int32)
        seen = []
        for step in range(20):
            before = np.asarray(cache.selected[1][0])
            pages_before = int(cache.selected_num_pages[0])
            cache, logits = decode(params, cache, token, jnp.array([0]), jnp.array([True]),
                                   config=CONFIG, attention=attention)
            token = jnp.argmax(logits, -1).astype(jnp.int32)
            num_pages = -(-(31 + step + 1) // 4)
            reselect = step % interval == 0 or num_pages != pages_before
            after = np.asarray(cache.selected[1][0])
            if not reselect:
                np.testing.assert_array_equal(after, before, err_msg=f"step {step}")
            assert int(cache.selected_num_pages[0]) == num_pages
            seen.append(after)
        assert int(cache.decode_steps[0]) == 20
        history[interval] = seen
    # Reselecting every step does change the choice at some step with an unchanged page count.
    changed = [s for s in range(1, 20) if -(-(32 + s) // 4) == -(-(31 + s) // 4)
               and (history[1][s] != history[1][s - 1]).any()]
    assert changed, "the selection never moved: the reuse check above would prove nothing"


def test_ragged_batch_equals_each_prompt_alone(params):
    sparsity = SparsityConfig(**PAGES, ctx_sink_tokens=4, ctx_local_tokens=8, dec_sink_tokens=4,
                              dec_local_tokens=8, token_budget=12, selector_interval=2,
                              keep_first_pages=0)  # LServe's rule
    attention = AttentionConfig(mode="lserve", streaming_heads=MIXED, sparsity=sparsity)
    prompts = _prompts(3, (27, 6, 14))
    batched, _ = _generate(params, attention, prompts, 14, slots=[2, 0, 1])
    for i, p in enumerate(prompts):
        alone, _ = _generate(params, attention, [p], 14)
        np.testing.assert_array_equal(batched[i], alone[0])


def test_cache_spec_and_config_validation(params):
    with pytest.raises(ValueError, match="multiple"):
        SparsityConfig(**PAGES, token_budget=10)
    with pytest.raises(ValueError, match="page_selection"):
        SparsityConfig(page_selection="per_page")
    with pytest.raises(ValueError, match="selector_interval"):
        SparsityConfig(selector_interval=0)
    with pytest.raises(ValueError, match="keep_first_pages"):
        SparsityConfig(token_budget=256, keep_first_pages=4)
    assert SparsityConfig(token_budget=256, keep_first_pages=3).keep_first_pages == 3
    with pytest.raises(TypeError, match="SparsityConfig"):
        AttentionConfig(mode="lserve", sparsity=dict(token_budget=256))
    attention = AttentionConfig(mode="lserve", streaming_heads=MIXED,
                                sparsity=SparsityConfig(page_selection="query_head"))
    spec = llama.cache_spec(CONFIG, attention, num_pages=9, page_size=64, max_seqs=2,
                            max_pages_per_seq=4)
    cache = jax.eval_shape(lambda: kv_cache.init_cache(spec))
    assert cache.k[0].shape == (1, 9, 64, 8) and cache.sk[1].shape == (1, 1 + 2 * 7, 64, 8)
    assert cache.selected[0].shape == (2, 3, 64) and cache.kmax[0].shape == (1, 9, 4, 8)
    assert cache.stream_table.shape == (2, 7)
    # The page sizes have one source: a cache with others is refused where it is built ...
    with pytest.raises(ValueError, match="page_size=16 != .*sparsity.page_size=64"):
        llama.cache_spec(CONFIG, attention, num_pages=9, page_size=16, max_seqs=2,
                         max_pages_per_seq=4)
    with pytest.raises(ValueError, match="logical_page_size=8 != .*logical_page_size=16"):
        llama.cache_spec(CONFIG, attention, num_pages=9, logical_page_size=8, max_seqs=2,
                         max_pages_per_seq=4)
    # ... and where LServe attention reads it.
    other = dataclasses.replace(spec, page_size=32, streaming_layout=dataclasses.replace(
        spec.streaming_layout, page_size=32))
    cache = kv_cache.init_cache(other)
    ids = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="page_size=32 != .*sparsity.page_size=64"):
        llama.decode(params, cache, ids, ids, jnp.ones((2,), bool), config=CONFIG,
                     attention=attention)
    coarse = kv_cache.init_cache(dataclasses.replace(spec, logical_page_size=32))
    with pytest.raises(ValueError, match="logical_page_size=32 != .*logical_page_size=16"):
        llama.decode(params, coarse, ids, ids, jnp.ones((2,), bool), config=CONFIG,
                     attention=attention)
