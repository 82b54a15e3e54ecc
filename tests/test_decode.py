"""Paged decode == full forward; ragged batches == each prompt alone; sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import gather_pages, generate_greedy, greedy_sampling
from lserve_jax import decode_loop
from lserve_jax.sampling import SamplingArrays, SamplingParams, sample
from models import (AttentionConfig, KVCacheSpec, LlamaConfig, SparsityConfig, init_params,
                    kv_cache, llama)

CONFIG = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2,
                     num_heads=6, num_kv_heads=2, head_dim=8, rope_theta=500.0)
# Dense attention on small pages (4 tokens), so short prompts span several.
ATTN = AttentionConfig(sparsity=SparsityConfig(page_size=4, logical_page_size=2))


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(0), scale=0.3)


def _generate(params, prompts, n, logical_page_size=None, **kw):
    """Dense decoding; `logical_page_size` keeps key statistics even so."""
    return generate_greedy(params, CONFIG, ATTN, prompts, n,
                           spec_overrides=dict(logical_page_size=logical_page_size), **kw)


def test_decode_logits_match_full_forward(params):
    """Feed a sequence token by token through the paged cache; logits equal one full forward."""
    rng = np.random.RandomState(1)
    seq = rng.randint(0, CONFIG.vocab_size, 23).astype(np.int32)
    full = np.asarray(llama.forward(params, jnp.asarray(seq[None]), config=CONFIG))[0]
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, num_pages=9, page_size=4,
                       max_seqs=2, max_pages_per_seq=8)
    cache = kv_cache.init_cache(spec)
    cache, _ = kv_cache.reserve(cache, 1, 23)
    cache, logits = jax.jit(llama.prefill, static_argnames=("config", "attention"))(
        params, cache, jnp.asarray(seq[None, :5]), jnp.array([5]), jnp.array([1]),
        config=CONFIG, attention=ATTN)
    np.testing.assert_allclose(np.asarray(logits[0]), full[4], rtol=1e-4, atol=1e-4)
    step = jax.jit(llama.decode, static_argnames=("config", "attention"))
    for i in range(5, 23):
        cache, logits = step(params, cache, jnp.asarray(seq[i:i + 1]), jnp.array([1]),
                             jnp.array([True]), config=CONFIG, attention=ATTN)
        err = np.abs(np.asarray(logits[0]) - full[i]).max() / np.abs(full[i]).max()
        assert err <= 1e-4, (i, err)
    assert int(cache.seq_lens[1]) == 23 and int(cache.seq_lens[0]) == 0


def test_ragged_batch_equals_each_prompt_alone(params):
    rng = np.random.RandomState(2)
    prompts = [rng.randint(0, 97, n).tolist() for n in (13, 3, 9)]
    batched, _ = _generate(params, prompts, 12, slots=[2, 0, 1])
    for i, p in enumerate(prompts):
        alone, _ = _generate(params, [p], 12)
        np.testing.assert_array_equal(batched[i], alone[0])
    # The first token of the shortest prompt is the argmax of a full forward.
    full = llama.forward(params, jnp.asarray([prompts[1]]), config=CONFIG)
    assert batched[1, 0] == int(jnp.argmax(full[0, -1]))


def test_stop_tokens_and_max_tokens(params):
    prompt = np.random.RandomState(3).randint(0, 97, 7).tolist()
    free_run, _ = _generate(params, [prompt], 10)
    stop = int(free_run[0, 4])
    first = free_run[0].tolist().index(stop)
    b = 1
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, num_pages=6, page_size=4,
                       max_seqs=1, max_pages_per_seq=5)
    cache, _ = kv_cache.reserve(kv_cache.init_cache(spec), 0, 17)
    state = decode_loop.start(params, cache, jnp.asarray([prompt], jnp.int32), jnp.array([7]),
                              jnp.array([0]), greedy_sampling(b), jnp.array([10]), jnp.array([[stop]]),
                              config=CONFIG, attention=ATTN, capacity=16)
    state = decode_loop.run(params, state, config=CONFIG, attention=ATTN, num_steps=16)
    n = int(state.num_generated[0])
    assert n == first + 1 and bool(state.done[0])
    assert np.asarray(state.out_tokens[0, :n]).tolist() == free_run[0, :n].tolist()
    assert (np.asarray(state.out_tokens[0, n:]) == -1).all()


def test_sampling_greedy_topk_topp():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4))
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(4))
    draws = []
    for step in range(300):
        s = SamplingArrays(temperature=jnp.array([0.0, 1.0, 1.0, 1.0]),
                           top_k=jnp.array([0, 1, 2, 0], jnp.int32),
                           top_p=jnp.array([1.0, 1.0, 1.0, 0.6]), keys=keys)
        draws.append(np.asarray(jax.jit(sample)(logits, s, jnp.int32(step))))
    draws = np.stack(draws)
    assert (draws[:, 0] == 0).all()                 # greedy
    assert (draws[:, 1] == 0).all()                 # top_k=1 is greedy
    assert set(draws[:, 2]) == {0, 1}               # top_k=2: only the two best
    assert set(draws[:, 3]) == {0, 1}               # top_p=0.6: 0.5 then 0.3 reaches it
    frac = (draws[:, 2] == 0).mean()                # 0.5/(0.5+0.3) = 0.625
    assert 0.5 < frac < 0.75


def test_sampling_is_reproducible_per_seed():
    logits = jax.random.normal(jax.random.key(5), (2, 50))
    s = SamplingArrays(temperature=jnp.ones(2), top_k=jnp.zeros(2, jnp.int32),
                       top_p=jnp.ones(2), keys=jnp.stack([jax.random.PRNGKey(7)] * 2))
    draw = jax.jit(sample)
    a = [np.asarray(draw(logits[:1].repeat(2, 0), s, jnp.int32(i))) for i in range(20)]
    assert all(x[0] == x[1] for x in a)              # same seed, same logits -> same draws
    assert len({int(x[0]) for x in a}) > 1


@pytest.mark.parametrize("kwargs", [dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0),
                                    dict(top_p=1.5), dict(top_k=-2)])
def test_sampling_params_validation(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_key_statistics_track_the_stored_keys(params):
    """With statistics kept, prefill + decode leave every logical page's max/min equal to those
    of the keys stored in it (the pool holds post-RoPE keys), and generation is unchanged."""
    rng = np.random.RandomState(4)
    prompts = [rng.randint(0, 97, n).tolist() for n in (11, 6)]
    plain, _ = _generate(params, prompts, 9, slots=[1, 0])
    tokens, state = _generate(params, prompts, 9, slots=[1, 0], logical_page_size=2)
    np.testing.assert_array_equal(tokens, plain)
    cache = state.cache
    assert cache.logical_page_size == 2
    for slot in (0, 1):
        n = int(cache.seq_lens[slot])
        assert n == len(prompts[1 - slot]) + 9 - 1
        row = np.asarray(cache.page_table[slot])
        for layer in range(CONFIG.num_layers):
            keys = np.asarray(gather_pages(cache.k[layer], cache.page_table[slot:slot + 1]))[0]
            for j in range(-(-n // 2)):
                chunk = keys[:, 2 * j:min(2 * j + 2, n)]  # [Hkv, <=2, D]
                page, logical = row[2 * j // 4], (2 * j % 4) // 2
                np.testing.assert_array_equal(np.asarray(cache.kmax[layer][:, page, logical]),
                                              chunk.max(1))
                np.testing.assert_array_equal(np.asarray(cache.kmin[layer][:, page, logical]),
                                              chunk.min(1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ragged_page_entries_equal_attention_over_whole_page_tables(seed):
    """The CPU path's ragged decode attention (`entries`: each row's own pages) equals attention
    over every row's whole page-table row, with rows of different lengths, padding entries,
    a row with no pages and NaN in pages no row reads."""
    from models.attention import decode_attention

    rng = np.random.default_rng(seed)
    b, w, s, h, g, d, pages = 5, 6, 4, 2, 3, 8, 40
    spec = KVCacheSpec(num_layers=1, num_kv_heads=h, head_dim=d, num_pages=pages, page_size=s,
                       max_seqs=b, max_pages_per_seq=w)
    cache = kv_cache.init_cache(spec)
    k = rng.normal(size=cache.k[0].shape).astype(np.float32)
    v = rng.normal(size=cache.v[0].shape).astype(np.float32)
    lengths = np.array([1, 7, 24, 13, 0])
    table = np.zeros((b, w), np.int32)
    owned = rng.permutation(np.arange(1, pages))
    used = 0
    for i, n in enumerate(lengths):
        c = -(-n // s)
        table[i, :c] = owned[used:used + c]
        used += c
    unread = np.setdiff1d(np.arange(pages), table[table > 0])
    k[:, unread], v[:, unread] = np.nan, np.nan
    cache = cache.replace(k=(jnp.asarray(k),), v=(jnp.asarray(v),), page_table=jnp.asarray(table))
    q = jnp.asarray(rng.normal(size=(b, h * g, d)).astype(np.float32))
    pairs = [(i, c) for i in range(b) for c in range(-(-lengths[i] // s))]
    entries = np.array(pairs + [(b, 0)] * 5, np.int32)
    args = (q, cache, jnp.arange(b), jnp.asarray(lengths, jnp.int32), None)
    whole = decode_attention(*args, layer=0, config=ATTN)
    ragged = decode_attention(*args, layer=0, config=ATTN, entries=jnp.asarray(entries))
    assert np.isfinite(np.asarray(ragged)).all()
    np.testing.assert_allclose(np.asarray(ragged), np.asarray(whole), atol=1e-5, rtol=1e-5)
    assert not np.asarray(ragged)[4].any()  # the row with no pages
