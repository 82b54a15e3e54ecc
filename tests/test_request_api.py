"""The request API shared by the offline `LLM` and the server: penalties, min-p, min_tokens and
logprobs on device (against NumPy references and the model's own logits), `n` completions,
stop strings cut on the detokenized text across token boundaries, vLLM's output shape and
`LLM.chat`. A tiny random Llama (f32, CPU) with a word-level tokenizer over its 128 ids, so
text is predictable ("w5 w17 ...")."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import WORDS, convert_word_llama
from lserve_jax import LLM, Engine, SamplingParams
from lserve_jax.engine.engine import _find_stop, completion_seed
from lserve_jax.sampling import (SamplingArrays, process_logits, sample, token_counts,
                                 token_logprobs)
from models import llama


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return convert_word_llama(tmp_path_factory)


@pytest.fixture(scope="module")
def engine(ckpt):
    return Engine(ckpt, page_size=8, logical_page_size=4, max_num_seqs=8)


def run(engine, prompt, sp):
    """Final output of one request, and the concatenated text deltas of its first completion."""
    rid = engine.add_request(None, prompt, sp)
    deltas, final = [], None
    while final is None:
        for out in engine.step():
            if out.request_id == rid:
                deltas.append(out.outputs[0].new_text)
                if out.finished:
                    final = out
    return final, "".join(deltas)


PROMPT = [5, 9, 17, 33, 8, 70, 12, 44, 3, 21, 60, 7]


# ---- on-device logit processing against NumPy ----------------------------------------------

def np_penalize(logits, prompt, output, presence, frequency, repetition):
    out = logits.astype(np.float64).copy()
    for b in range(out.shape[0]):
        counts = np.bincount([t for t in output[b] if t >= 0], minlength=out.shape[1])
        seen = (counts > 0) | np.isin(np.arange(out.shape[1]), [t for t in prompt[b] if t >= 0])
        row = out[b]
        row[seen] = np.where(row[seen] > 0, row[seen] / repetition[b], row[seen] * repetition[b])
        row -= frequency[b] * counts + presence[b] * (counts > 0)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_penalties_match_numpy(seed):
    rng = np.random.default_rng(seed)
    b, v = 4, 50
    logits = rng.normal(size=(b, v)).astype(np.float32) * 3
    prompt = np.where(rng.random((b, 16)) < 0.7, rng.integers(0, v, (b, 16)), -1)
    output = np.where(rng.random((b, 8)) < 0.7, rng.integers(0, v, (b, 8)), -1)
    presence = rng.uniform(-2, 2, b).astype(np.float32)
    frequency = rng.uniform(-2, 2, b).astype(np.float32)
    repetition = rng.uniform(0.5, 2, b).astype(np.float32)
    s = SamplingArrays(temperature=jnp.zeros(b), top_k=jnp.zeros(b, jnp.int32),
                       top_p=jnp.ones(b), keys=jnp.zeros((b, 2), jnp.uint32),
                       presence=jnp.asarray(presence), frequency=jnp.asarray(frequency),
                       repetition=jnp.asarray(repetition))
    counts = token_counts(jnp.asarray(prompt, jnp.int32), jnp.asarray(output, jnp.int32), v)
    got = process_logits(jnp.asarray(logits), s, 0, counts=counts)
    want = np_penalize(logits, prompt, output, presence, frequency, repetition)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(want, logits)  # the penalties did something
    tokens = sample(jnp.asarray(logits), s, 0, counts=counts)  # greedy: argmax after them
    assert np.asarray(tokens).tolist() == np.argmax(want, axis=-1).tolist()


def test_min_tokens_masks_stop_ids_below_it():
    logits = jnp.zeros((3, 10)).at[:, 4].set(5.0)  # token 4 is everyone's argmax
    stop_ids = jnp.array([[4, -1], [4, 7], [4, -1]], jnp.int32)
    s = SamplingArrays(temperature=jnp.zeros(3), top_k=jnp.zeros(3, jnp.int32),
                       top_p=jnp.ones(3), keys=jnp.zeros((3, 2), jnp.uint32),
                       min_tokens=jnp.array([0, 3, 3], jnp.int32))
    index = jnp.array([0, 2, 3], jnp.int32)  # row 1 is below its minimum, row 2 reached it
    out = np.asarray(process_logits(logits, s, index, stop_ids))
    assert out[0, 4] == 5 and out[2, 4] == 5
    assert out[1, 4] == -np.inf and out[1, 7] == -np.inf and out[1, 0] == 0
    assert np.asarray(sample(logits, s, index, stop_ids)).tolist() == [4, 0, 4]


def test_min_p_keeps_tokens_at_least_min_p_times_the_best():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2))
    s = SamplingArrays(temperature=jnp.ones(2), top_k=jnp.zeros(2, jnp.int32),
                       top_p=jnp.ones(2), keys=jnp.stack([jax.random.PRNGKey(1)] * 2),
                       min_p=jnp.array([0.0, 0.35]))
    draw = jax.jit(sample)
    draws = np.stack([np.asarray(draw(logits, s, jnp.int32(i))) for i in range(300)])
    assert set(draws[:, 0]) == {0, 1, 2, 3}
    assert set(draws[:, 1]) == {0, 1}  # 0.15 < 0.35 * 0.5


def test_token_logprobs_match_log_softmax():
    logits = jax.random.normal(jax.random.PRNGKey(3), (3, 40)) * 4
    tokens = jnp.array([0, 7, 39], jnp.int32)
    chosen, rank, ids, vals = token_logprobs(logits, tokens, 5)
    ref = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float64)
                                        if jax.config.x64_enabled else logits, axis=-1))
    order = np.argsort(-ref, axis=-1)
    np.testing.assert_allclose(np.asarray(chosen), ref[np.arange(3), tokens], atol=1e-5)
    assert np.asarray(rank).tolist() == [int(np.where(order[i] == t)[0][0]) + 1
                                         for i, t in enumerate(np.asarray(tokens))]
    assert np.asarray(ids).tolist() == order[:, :5].tolist()
    np.testing.assert_allclose(np.asarray(vals), np.take_along_axis(ref, order[:, :5], -1),
                               atol=1e-5)


# ---- host pieces -----------------------------------------------------------------------------

def test_sampling_params_check_the_new_fields():
    assert SamplingParams(stop="ab").stop == ("ab",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    for bad, error in [(dict(n=0), ValueError), (dict(stop=[""]), ValueError),
                       (dict(stop=[3]), TypeError), (dict(min_tokens=17), ValueError),
                       (dict(min_p=1.5), ValueError), (dict(presence_penalty=2.5), ValueError),
                       (dict(frequency_penalty=-3), ValueError),
                       (dict(repetition_penalty=0), ValueError), (dict(logprobs=21), ValueError),
                       (dict(logprobs=-1), ValueError), (dict(max_tokens=0), ValueError),
                       (dict(skip_special_tokens=1), TypeError)]:
        with pytest.raises(error):
            SamplingParams(**bad)
    assert SamplingParams(max_tokens=None, min_tokens=40).max_tokens is None


def test_find_stop_takes_the_earliest_string_ending_in_the_new_text():
    assert _find_stop("hello world", ["o"], 6) == (7, "o")  # the "o" at 4 ended before
    assert _find_stop("hello world", ["o", "wor"], 6) == (6, "wor")  # the earliest start
    assert _find_stop("hello world", ["lo w"], 6) == (3, "lo w")   # spans the boundary
    assert _find_stop("hello world", ["xyz"], 0) is None
    assert _find_stop("hello", ["hel"], 3) is None                 # ended before the growth


def test_completion_seeds_are_reproducible_and_distinct():
    assert completion_seed(7, 0) == 7
    seeds = [completion_seed(7, i) for i in range(50)]
    assert seeds == [completion_seed(7, i) for i in range(50)]
    assert len(set(seeds)) == 50 and all(0 <= s < 2**63 for s in seeds)


# ---- the engine ---------------------------------------------------------------------------

def test_logprobs_match_log_softmax_of_the_models_logits(engine):
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=5)
    out, _ = run(engine, PROMPT, sp)
    c = out.outputs[0]
    assert len(c.logprobs) == len(c.token_ids) == 10
    seq = PROMPT + c.token_ids
    logits = llama.forward(engine.params, jnp.asarray([seq]), config=engine.config)[0]
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))[len(PROMPT) - 1:-1]
    for j, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
        order = np.argsort(-logp[j])
        assert list(entry)[0] == token and token == order[0]  # greedy: the most likely
        assert set(entry) == {token} | set(order[:5].tolist())
        for t, lp in entry.items():
            assert abs(lp.logprob - logp[j, t]) < 1e-4
            assert lp.rank == int(np.where(order == t)[0][0]) + 1
            assert lp.decoded_token == WORDS[t]
    assert abs(c.cumulative_logprob - sum(logp[j, t] for j, t in enumerate(c.token_ids))) < 1e-3


@pytest.mark.parametrize("knobs", [dict(repetition_penalty=1.8),
                                   dict(presence_penalty=1.5, frequency_penalty=0.7)])
def test_penalized_greedy_equals_numpy_on_the_models_logits(engine, knobs):
    n = 16
    plain, _ = run(engine, PROMPT, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    out, _ = run(engine, PROMPT, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True,
                                                **knobs))
    tokens = out.token_ids
    assert tokens != plain.token_ids  # the penalties change this greedy run
    seq = PROMPT + tokens
    logits = np.asarray(llama.forward(engine.params, jnp.asarray([seq]),
                                      config=engine.config)[0])[len(PROMPT) - 1:-1]
    for j, token in enumerate(tokens):
        want = np_penalize(logits[j:j + 1], [PROMPT], [tokens[:j]],
                           [knobs.get("presence_penalty", 0)],
                           [knobs.get("frequency_penalty", 0)],
                           [knobs.get("repetition_penalty", 1)])[0]
        assert want[token] >= want.max() - 1e-4, j


def test_n_completions_with_a_seed_are_reproducible(engine):
    sp = SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=11, ignore_eos=True)
    first, _ = run(engine, PROMPT, sp)
    again, _ = run(engine, PROMPT, sp)
    assert [c.index for c in first.outputs] == [0, 1, 2]
    samples = [tuple(c.token_ids) for c in first.outputs]
    assert samples == [tuple(c.token_ids) for c in again.outputs]
    assert len(set(samples)) == 3
    single, _ = run(engine, PROMPT, SamplingParams(max_tokens=12, temperature=1.0, seed=11,
                                                   ignore_eos=True))
    assert tuple(single.token_ids) == samples[0]
    assert first.metrics.num_generated_tokens == 36
    assert all(c.finish_reason == "length" for c in first.outputs) and first.finished


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_cut_the_text_exactly(ckpt, include):
    # Several decode steps per call: the device runs past the stop, the host cuts it.
    engine = Engine(ckpt, page_size=8, logical_page_size=4, max_num_seqs=4,
                    num_scheduler_steps=8)
    base = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    full, _ = run(engine, PROMPT, base)
    text, ids = full.text, full.token_ids
    words = text.split(" ")
    assert len(words) == 20
    # A stop string across a token boundary: the end of word 6 and the start of word 7.
    stop = words[6][1:] + " " + words[7][:2]
    at = text.find(stop)
    # The token that completes it: the first k whose decoded text reaches its end.
    k = next(k for k in range(1, 21) if len(" ".join(words[:k])) >= at + len(stop))
    out, streamed = run(engine, PROMPT, SamplingParams(
        max_tokens=20, temperature=0, ignore_eos=True, stop=["zzz", stop],
        include_stop_str_in_output=include))
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == (text[:at + len(stop)] if include else text[:at])
    assert c.token_ids == ids[:k]
    assert streamed == c.text  # the deltas add up, none ran ahead into the stop string


def test_min_tokens_holds_back_stop_tokens(engine):
    greedy, _ = run(engine, PROMPT, SamplingParams(max_tokens=8, temperature=0,
                                                   ignore_eos=True))
    stop = greedy.token_ids[1]
    early, _ = run(engine, PROMPT, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                  stop_token_ids=[stop]))
    assert early.token_ids == greedy.token_ids[:2] and early.outputs[0].stop_reason == stop
    held, _ = run(engine, PROMPT, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                 stop_token_ids=[stop], min_tokens=4))
    assert len(held.token_ids) >= 4
    assert stop not in held.token_ids[:4]
    assert held.token_ids[0] == greedy.token_ids[0]


def test_request_output_has_vllms_shape_and_abort_frees_every_completion(engine):
    rid = engine.add_request("x", PROMPT, SamplingParams(n=2, max_tokens=50, ignore_eos=True))
    out = engine.step()[0]
    assert out.request_id == rid and not out.finished
    assert out.prompt_token_ids == PROMPT and len(out.outputs) == 2
    aborted = engine.abort_request(rid)
    assert aborted.finished and all(c.finish_reason == "abort" for c in aborted.outputs)
    assert not engine.has_unfinished_requests()
    assert engine.pool.num_free == engine.pool.num_usable_pages
    with pytest.raises(KeyError):
        engine.abort_request(rid)


def test_llm_chat_renders_conversations_with_the_template(ckpt):
    llm = LLM(ckpt, page_size=8, logical_page_size=4, max_num_seqs=4)
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    conversation = [{"role": "system", "content": "w10 w11"}, {"role": "user", "content": "w12"},
                    {"role": "assistant", "content": "w13"}, {"role": "user", "content": "w14"}]
    [one] = llm.chat(conversation, sp)
    rendered = llm.tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
    assert rendered.startswith("w3 system w10 w11 w4 w3 user w12 w4")
    [want] = llm.generate(rendered, sp)
    assert one.token_ids == want.token_ids and one.prompt == rendered
    both = llm.chat([conversation, conversation[:2]], sp)
    assert len(both) == 2 and both[0].token_ids == want.token_ids


def test_auto_dtype_is_float32_on_the_cpu_and_the_checkpoints_16_bit_dtype_elsewhere(tmp_path):
    import json as _json

    from lserve_jax.checkpoint import auto_dtype

    hf = tmp_path / "hf"
    hf.mkdir()
    for stored, want in (("bfloat16", "bfloat16"), ("float16", "float16"),
                         ("float32", "bfloat16")):
        (hf / "config.json").write_text(_json.dumps({"torch_dtype": stored}))
        assert auto_dtype(hf, "gpu") == want
        assert auto_dtype(hf, "cpu") == "float32"
    (hf / "config.json").write_text(_json.dumps({"dtype": "float16"}))  # transformers 5 spelling
    assert auto_dtype(hf, "gpu") == "float16"
    assert Engine.__init__.__kwdefaults__["dtype"] == "auto"
