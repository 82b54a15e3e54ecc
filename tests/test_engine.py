"""The serving engine end to end on a tiny random Llama (f32, CPU): the engine equals the static
batch path, requests arriving at random steps and preempted ones produce the tokens each
produces alone, aborts free their pages, freed pages poisoned with NaN change nothing, prefix
caching saves prefill tokens without changing outputs, and bad requests are refused at
`add_request` while the others go on."""

import random

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import convert_tiny_llama, generate_greedy
from lserve_jax import Engine, SamplingParams
from lserve_jax.engine import device

VOCAB = 128
# A tiny LServe configuration whose windows and budget are much shorter than the prompts, so
# streaming heads, page selection and its reuse all matter.
TINY_LSERVE = dict(page_size=8, logical_page_size=4, ctx_sink_tokens=8, ctx_local_tokens=32,
                   dec_sink_tokens=8, dec_local_tokens=16, token_budget=24, selector_interval=2,
                   static_sparsity=0.5)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return convert_tiny_llama(tmp_path_factory, vocab_size=VOCAB, max_position_embeddings=256)


@pytest.fixture(scope="module")
def pattern(tmp_path_factory):
    """One streaming KV head per layer (static_sparsity 0.5 streams the lower gate score)."""
    path = tmp_path_factory.mktemp("pattern") / "heads.tsv"
    path.write_text("0.9\t0.1\n0.2\t0.8\n")
    return str(path)


MODES = {
    "dense": lambda pattern: dict(attention="dense", page_size=8, logical_page_size=4),
    "lserve": lambda pattern: dict(attention="lserve", head_pattern=pattern, **TINY_LSERVE),
    "lserve-dense-heads": lambda pattern: dict(
        attention="lserve", **{k: v for k, v in TINY_LSERVE.items() if k != "static_sparsity"}),
}


def make_engine(ckpt, pattern, mode, **kwargs):
    return Engine(ckpt, **MODES[mode](pattern), **kwargs)


def random_prompt(rng, n):
    return [int(t) for t in rng.integers(3, VOCAB, n)]  # ids 0-2 are special (eos is 2)


def alone(engine, prompt, sp):
    """The tokens `prompt` produces as the engine's only request."""
    rid = engine.add_request(None, prompt, sp)
    return engine.run_until_done([rid])[rid].token_ids


def check_pool_empty(engine):
    """Every page is free again (cached pages may stay cached, held by nobody)."""
    pool = engine.pool
    assert pool.num_free == pool.num_usable_pages
    assert all(pool.refcount(p) == 0 for p in range(1, pool.num_pages))
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("mode", ["dense", "lserve"])
def test_engine_equals_the_static_batch_path(ckpt, pattern, mode):
    engine = make_engine(ckpt, pattern, mode)
    rng = np.random.default_rng(0)
    prompts = [random_prompt(rng, n) for n in (5, 40, 77)]
    n = 20
    sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    ids = [engine.add_request(None, p, sp) for p in prompts]
    final = engine.run_until_done(ids)
    ref, _ = generate_greedy(engine.params, engine.config, engine.attention, prompts, n, t=80)
    for rid, expected in zip(ids, ref):
        assert final[rid].token_ids == expected.tolist()
        assert final[rid].finish_reason == "length" and final[rid].finished
    check_pool_empty(engine)


@pytest.mark.parametrize("mode", [
    "dense", pytest.param("lserve-dense-heads", marks=pytest.mark.slow), "lserve"])
def test_chunk_size_does_not_change_tokens(ckpt, pattern, mode):
    """Chunks of 12 tokens split pages, logical pages and (LServe) the streaming heads'
    prefill window of 8 sink + 32 local tokens; tokens equal a prefill in one piece."""
    rng = np.random.default_rng(1)
    prompts = [random_prompt(rng, n) for n in (90, 33)]
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = {}
    for chunk in (12, 256):
        engine = make_engine(ckpt, pattern, mode, max_num_seqs=2, max_num_batched_tokens=chunk)
        ids = [engine.add_request(None, p, sp) for p in prompts]
        final = engine.run_until_done(ids)
        outs[chunk] = [final[i].token_ids for i in ids]
        if chunk < 90:
            assert engine.counters["prefill_calls"] > len(prompts)  # really chunked
    assert outs[12] == outs[256]


@pytest.mark.parametrize("mode", ["lserve"])  # dense: the static batch test (8 steps per call)
def test_several_decode_steps_per_call_give_the_tokens_of_one(ckpt, pattern, mode):
    """num_scheduler_steps=5 (rows stop inside a call: at max_tokens, at a stop token) gives the
    tokens of one step per call, greedy and sampled, in fewer device calls."""
    import dataclasses
    rng = np.random.default_rng(11)
    prompts = [random_prompt(rng, n) for n in (9, 50, 23)]
    sps = [SamplingParams(max_tokens=14, temperature=0, ignore_eos=True),
           SamplingParams(max_tokens=11, temperature=0.8, top_k=20, seed=4, ignore_eos=True),
           SamplingParams(max_tokens=13, temperature=0, ignore_eos=True)]

    def run(steps, sps):
        engine = make_engine(ckpt, pattern, mode, num_scheduler_steps=steps)
        ids = [engine.add_request(None, p, sp) for p, sp in zip(prompts, sps)]
        final = engine.run_until_done(ids)
        return [final[i] for i in ids], engine

    ref, one = run(1, sps)
    tokens = [o.token_ids for o in ref]
    stop = tokens[2][7]  # stops request 2 at the first place this token appears
    sps[2] = dataclasses.replace(sps[2], stop_token_ids=(stop,))
    tokens[2] = tokens[2][:tokens[2].index(stop) + 1]
    got, five = run(5, sps)
    assert [o.token_ids for o in got] == tokens
    assert got[2].finish_reason == "stop" and got[0].finish_reason == "length"
    assert sum(o.metrics.num_generated_tokens for o in got) == sum(map(len, tokens))
    assert five.counters["decode_calls"] < one.counters["decode_calls"] / 2
    check_pool_empty(five)


def _workload(seed, n):
    rng = np.random.default_rng(seed)
    reqs = []
    for i in range(n):
        sp = SamplingParams(max_tokens=int(rng.integers(1, 16)),
                            temperature=0.0 if i % 2 else 0.8, top_k=20, seed=int(i),
                            ignore_eos=True)
        reqs.append((random_prompt(rng, int(rng.integers(1, 60))), sp))
    return reqs


# With 12 pages some requests are preempted and others not; the roomy pool (no preemption at
# all) is the easier case, in the slow suite.
@pytest.mark.parametrize("mode,num_pages", [
    pytest.param("dense", None, marks=pytest.mark.slow),
    pytest.param("lserve", None, marks=pytest.mark.slow), ("dense", 12), ("lserve", 12)])
def test_random_arrivals_and_preemption_give_the_tokens_of_each_request_alone(
        ckpt, pattern, mode, num_pages):
    """Requests join at random steps; with 12 pages (11 usable of 8 tokens) they do not all
    fit, so some are preempted and recomputed. Sampled requests draw the same tokens too."""
    reqs = _workload(7, 8)
    reference = make_engine(ckpt, pattern, mode)
    expected = [alone(reference, p, sp) for p, sp in reqs]
    engine = make_engine(ckpt, pattern, mode, max_num_seqs=4, max_num_batched_tokens=48,
                         num_pages=num_pages)
    rng = random.Random(3)
    pending = list(enumerate(reqs))
    final = {}
    while pending or engine.has_unfinished_requests():
        while pending and (not engine.has_unfinished_requests() or rng.random() < 0.5):
            i, (p, sp) = pending.pop(0)
            engine.add_request(i, p, sp)
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    assert [final[i].token_ids for i in range(len(reqs))] == expected
    if num_pages is not None:
        assert engine.stats()["preemptions"] > 0
        assert sum(final[i].metrics.num_preemptions for i in final) > 0
    check_pool_empty(engine)


def test_abort_frees_pages_and_others_go_on(ckpt, pattern):
    engine = make_engine(ckpt, pattern, "dense", max_num_seqs=4, num_scheduler_steps=1)
    rng = np.random.default_rng(2)
    keep, drop = random_prompt(rng, 30), random_prompt(rng, 50)
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    expected = alone(engine, keep, sp)
    engine.add_request("keep", keep, sp)
    engine.add_request("drop", drop, sp)
    engine.add_request("waiting", drop, sp)
    for _ in range(3):
        engine.step()
    held = engine.pool.num_usable_pages - engine.pool.num_free
    out = engine.abort_request("drop")
    assert out.finished and out.finish_reason == "abort" and 0 < len(out.token_ids) < 10
    assert engine.pool.num_usable_pages - engine.pool.num_free < held
    engine.abort_request("waiting")
    with pytest.raises(KeyError):
        engine.abort_request("drop")
    assert engine.run_until_done(["keep"])["keep"].token_ids == expected
    check_pool_empty(engine)


def _poison_free_pages(engine):
    """NaN into every free, uncached page of every pool array (keys, values, statistics)."""
    pool = engine.pool
    free = [p for p in range(1, pool.num_pages)
            if pool.refcount(p) == 0 and pool.page_hash(p) is None]
    if not free:
        return
    idx = jnp.asarray(free)
    cache = engine.cache
    poison = lambda arrays: tuple(a.at[:, idx].set(jnp.nan) for a in arrays)  # noqa: E731
    engine.cache = cache.replace(k=poison(cache.k), v=poison(cache.v), kmax=poison(cache.kmax),
                                 kmin=poison(cache.kmin))


@pytest.mark.parametrize("mode", ["dense", "lserve"])
def test_freed_pages_poisoned_with_nan_change_nothing(ckpt, pattern, mode):
    reqs = _workload(11, 6)
    reference = make_engine(ckpt, pattern, mode)
    expected = [alone(reference, p, sp) for p, sp in reqs]
    engine = make_engine(ckpt, pattern, mode, max_num_seqs=3, max_num_batched_tokens=40,
                         num_pages=30)
    for i, (p, sp) in enumerate(reqs):
        engine.add_request(i, p, sp)
    final = {}
    _poison_free_pages(engine)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        _poison_free_pages(engine)
    assert [final[i].token_ids for i in range(len(reqs))] == expected
    assert all(final[i].finish_reason == "length" for i in final)


@pytest.mark.parametrize("mode", ["dense", "lserve-dense-heads", "lserve"])
def test_prefix_caching_reuses_pages_and_keeps_tokens(ckpt, pattern, mode):
    """A second request on a cached 40-token prefix prefills only its own tokens and produces
    the tokens it produces without the cache. With streaming heads (Λ window of 32 tokens,
    decode sink 8 and ring 24) the hit shares their window pages too, and the chunk after it
    rebuilds the decode sink and ring from them."""
    rng = np.random.default_rng(5)
    shared = random_prompt(rng, 40)  # 5 full pages of 8
    a, b = shared + random_prompt(rng, 7), shared + random_prompt(rng, 12)
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    cold = make_engine(ckpt, pattern, mode, enable_prefix_caching=False)
    expected = alone(cold, b, sp)
    engine = make_engine(ckpt, pattern, mode)
    alone(engine, a, sp)
    alone(engine, random_prompt(rng, 47), sp)  # slot 0's own pages now hold other tokens
    before = engine.counters["prefill_tokens"]
    rid = engine.add_request(None, b, sp)
    out = engine.run_until_done([rid])[rid]
    assert out.token_ids == expected
    assert out.metrics.num_prefix_hit_tokens == 40
    assert engine.counters["prefill_tokens"] - before == len(b) - 40
    assert engine.stats()["prefix_hit_tokens"] >= 40
    if engine.streaming:  # b ran in slot 0 of both engines: its decode sink and ring agree
        for hot, ref in zip(engine.cache.sk, cold.cache.sk):
            pages = np.asarray(engine.cache.stream_table[0])
            np.testing.assert_allclose(np.asarray(hot[:, pages]), np.asarray(ref[:, pages]),
                                       atol=1e-5)


def test_bad_requests_are_refused_and_running_ones_go_on(ckpt, pattern):
    engine = make_engine(ckpt, pattern, "dense", num_pages=20, num_scheduler_steps=1)
    rng = np.random.default_rng(9)
    prompt = random_prompt(rng, 20)
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    expected = alone(engine, prompt, sp)
    engine.add_request("ok", prompt, sp)
    engine.step()
    bad = [
        ([], sp, ValueError, "empty"),
        ([5, VOCAB], sp, ValueError, "vocabulary|out of range|>= 128"),
        ([-1, 4], sp, ValueError, "-1"),
        (random_prompt(rng, 256), sp, ValueError, "context"),
        (random_prompt(rng, 200), SamplingParams(max_tokens=40), ValueError, "pool"),
        ("text", sp, ValueError, "tokenizer"),
        (3.5, sp, TypeError, "prompt"),
        ([4, 5], dict(max_tokens=3), TypeError, "SamplingParams"),
    ]
    for prompt_, sp_, error, match in bad:
        with pytest.raises(error, match=match):
            engine.add_request(None, prompt_, sp_)
        engine.step()
    with pytest.raises(ValueError, match="already"):
        engine.add_request("ok", prompt, sp)
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1.0)
    out = engine.run_until_done(["ok"])["ok"]
    assert out.token_ids == expected
    check_pool_empty(engine)


def test_outputs_stream_text_and_metrics(ckpt, pattern):
    engine = make_engine(ckpt, pattern, "dense")
    rid = engine.add_request(None, [5, 6, 7, 8], SamplingParams(max_tokens=5, temperature=0,
                                                                ignore_eos=True))
    seen = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == rid
            seen += out.new_token_ids
            last = out
    assert seen == last.token_ids and len(seen) == 5 and last.finished
    m = last.metrics
    assert m.num_prompt_tokens == 4 and m.num_generated_tokens == 5
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
    assert m.ttft > 0 and m.tpot > 0 and m.latency >= m.ttft


def test_generation_stops_at_the_model_length(ckpt, pattern):
    engine = make_engine(ckpt, pattern, "dense", max_model_len=40)
    rid = engine.add_request(None, list(range(3, 33)), SamplingParams(max_tokens=100,
                                                                      temperature=0,
                                                                      ignore_eos=True))
    out = engine.run_until_done([rid])[rid]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"


def test_pool_is_sized_from_memory(ckpt, pattern):
    engine = make_engine(ckpt, pattern, "dense", kv_cache_memory_gb=0.001)
    per_page, fixed = device.pool_bytes(engine.spec)
    assert engine.spec.num_pages == (2**30 // 1000 - fixed) // per_page
    lserve = make_engine(ckpt, pattern, "lserve", kv_cache_memory_gb=0.001)
    assert "dense in the same memory" in lserve.capacity_summary
    with pytest.raises(ValueError, match="pages"):
        make_engine(ckpt, pattern, "dense", kv_cache_memory_gb=1e-7)
    with pytest.raises(ValueError, match="not both"):
        make_engine(ckpt, pattern, "dense", kv_cache_memory_gb=1, num_pages=10)


def test_prefill_rows_are_grouped_to_waste_few_padded_slots():
    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = [int(x) for x in rng.integers(1, 600, rng.integers(1, 12))]
        groups = device.group_prefill_rows(lengths, 16)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))

        def cost(gs):
            return sum(device.CALL_OVERHEAD_TOKENS + device.bucket(len(g), 16)
                       * device.token_bucket(max(lengths[i] for i in g)) for g in gs)

        assert cost(groups) <= cost([list(range(len(lengths)))])
    # one long chunk beside short ones: two calls, not 8 rows padded to the long one
    assert device.group_prefill_rows([300] + [30] * 7, 16) == [[0], list(range(1, 8))]
    assert [device.token_bucket(n) for n in (5, 100, 150, 300, 1000, 1100)] == \
        [16, 128, 192, 384, 1024, 1536]


def test_compiled_steps_are_freed_when_memory_maps_run_short(ckpt, pattern, monkeypatch,
                                                              caplog):
    """Past half the kernel's limit on memory mappings (each compiled XLA:CPU kernel maps its
    code separately), older compiled steps and JAX's caches are freed after a compile; the
    engine goes on with the same tokens, compiling again what it needs again."""
    import logging

    from lserve_jax.engine import engine as engine_module

    engine_module.release_compiled_steps()  # earlier tests' steps would count below
    counts = engine_module.memory_map_count()
    if counts is not None:  # Linux
        assert 0 < counts[0] < counts[1]
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompt = random_prompt(np.random.default_rng(5), 30)
    expected = alone(make_engine(ckpt, pattern, "dense"), prompt, sp)
    monkeypatch.setattr(engine_module, "memory_map_count", lambda: (1000, 1000))
    engine = make_engine(ckpt, pattern, "dense", max_num_seqs=2,
                         max_num_batched_tokens=16)  # new shapes
    with caplog.at_level(logging.WARNING, logger="lserve_jax"):
        assert alone(engine, prompt, sp) == expected
        assert alone(engine, prompt, sp) == expected  # freed steps compile again
    assert "memory mappings" in caplog.text
    assert len(engine_module._SHARED_EXECUTABLES) <= 2
