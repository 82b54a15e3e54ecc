"""Bad input and bad numbers at generation time: every value checked in one place
(lserve_jax/inputs.py), non-finite logits caught per row, stop ids that do not recompile."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from conftest import convert_tiny_llama
from lserve_jax import LLM, SamplingParams, SparsityConfig, generate, head_pattern, inputs

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(str(convert_tiny_llama(tmp_path_factory)))


@pytest.fixture
def clean_params(llm):
    """Give each test the model's own parameters back, whatever it poisoned."""
    params = llm.params
    yield params
    llm.params = params


def poison(params, path, index, value=math.nan):
    """A copy of `params` with one element (or row) of the parameter at `path` set to `value`."""
    *parents, leaf = path
    node = params = jax.tree.map(lambda x: x, params)
    for key in parents:
        node = node[key]
    node[leaf] = node[leaf].at[index].set(value)
    return params


# ---- prompts ------------------------------------------------------------------------------------

def test_flat_id_list_is_one_prompt(llm):
    [flat] = llm.generate([5, 6, 7], GREEDY)
    [nested] = llm.generate([[5, 6, 7]], GREEDY)
    [array] = llm.generate(np.array([5, 6, 7], np.int64), GREEDY)
    assert flat.prompt_token_ids == [5, 6, 7] and flat.token_ids == nested.token_ids
    assert array.token_ids == nested.token_ids


@pytest.mark.parametrize("prompts, error, match", [
    ([[5.0, 6.0]], TypeError, r"prompt 0\[0\]=5.0 is not an int"),
    ([[5, 6.7]], TypeError, r"prompt 0\[1\]=6.7"),
    ([["5", "6"]], TypeError, r"prompt 0\[0\]='5'"),
    ([[True, 5]], TypeError, r"prompt 0\[0\]=True"),
    ([[5], [6, -1]], ValueError, r"prompt 1: token ids \[-1\] are outside the vocabulary"),
    ([[5], 7.5], TypeError, "prompt 1 is a float"),
    (42, TypeError, "prompts must be"),
    ({"a": 1}, TypeError, "prompts must be"),
])
def test_bad_prompt_ids_are_refused(llm, prompts, error, match):
    with pytest.raises(error, match=match):
        llm.generate(prompts, GREEDY)


# ---- sampling values ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(seed=2**63), ValueError, r"seed=9223372036854775808 must be <= 2\*\*63|seed=.* must be <="),
    (dict(seed=-1), ValueError, "seed=-1 must be >= 0"),
    (dict(seed=1.5), TypeError, "seed=1.5 must be an int"),
    (dict(stop_token_ids=[2**31]), ValueError, r"stop_token_ids \[2147483648\]"),
    (dict(stop_token_ids=[-3]), ValueError, r"stop_token_ids \[-3\]"),
    (dict(stop_token_ids=["2"]), TypeError, r"stop_token_ids\[0\]='2'"),
    (dict(stop_token_ids=[2.0]), TypeError, r"stop_token_ids\[0\]=2.0"),
    (dict(max_tokens=True), TypeError, "max_tokens=True"),
    (dict(temperature=math.nan), ValueError, "temperature=nan must be finite"),
    (dict(temperature=math.inf), ValueError, "temperature=inf must be finite"),
    (dict(temperature="1"), TypeError, "temperature='1' must be a number"),
    (dict(top_p=math.nan), ValueError, "top_p=nan"),
    (dict(top_k=2.0), TypeError, "top_k=2.0"),
    (dict(ignore_eos="no"), TypeError, "ignore_eos='no'"),
])
def test_sampling_params_refuse_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        SamplingParams(**kwargs)


def test_stop_ids_outside_the_vocabulary_are_refused(llm):
    with pytest.raises(ValueError, match=r"stop_token_ids: token ids \[128\] are outside"):
        llm.generate([[5, 6]], SamplingParams(stop_token_ids=[128]))


@pytest.mark.parametrize("interval", [0, -1, 2.5, None])
def test_stream_interval_below_one_is_refused(llm, interval):
    # Before the check, stream_interval <= 0 compiled a zero-step loop the host called forever.
    error = TypeError if not isinstance(interval, int) else ValueError
    with pytest.raises(error, match="stream_interval"):
        llm.generate([[5, 6]], GREEDY, on_tokens=lambda row, ids: None, stream_interval=interval)


def test_seed_key_uses_all_64_bits():
    assert np.array_equal(inputs.seed_key(5), np.asarray(jax.random.PRNGKey(5)))  # unchanged
    assert np.array_equal(inputs.seed_key(2**31 - 1), np.asarray(jax.random.PRNGKey(2**31 - 1)))
    keys = {tuple(inputs.seed_key(s)) for s in (0, 1, 2**32, 2**32 + 1, 2**63 - 1)}
    assert len(keys) == 5
    assert tuple(inputs.seed_key(2**32)) == (1, 0)


def test_seeds_past_32_bits_do_not_wrap_around(llm):
    def sampled(seed):
        sp = SamplingParams(max_tokens=12, temperature=1.0, seed=seed, ignore_eos=True)
        return llm.generate([[5, 6, 7]], sp)[0].token_ids

    assert sampled(2**32) == sampled(2**32)  # reproducible
    assert sampled(2**32) != sampled(0)  # was equal: the seed wrapped at 2**32
    assert sampled(2**63 - 1) != sampled(2**31 - 1)


def test_adding_a_stop_id_does_not_recompile(llm):
    prompt = [[5, 6, 7]]
    llm.generate(prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    for stops in ([3], [3, 4], [3, 4, 9, 10, 11]):
        llm.generate(prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True,
                                            stop_token_ids=stops))
        assert llm.stats.compile_s == 0.0, stops
    assert inputs.stop_id_width(0) == inputs.stop_id_width(8) == 8
    assert inputs.stop_id_width(9) == 16
    with pytest.raises(ValueError, match="at most 256"):
        inputs.stop_id_width(257)


# ---- non-finite numbers at run time ------------------------------------------------------------

@pytest.mark.parametrize("path, index, value", [
    (("layers", 0, "wq"), (0, 0), math.nan),
    (("final_norm",), 3, math.nan),
    (("layers", 1, "w_down"), (2, 5), math.inf),
])
def test_non_finite_parameters_end_every_row_with_an_error(llm, clean_params, path, index, value):
    llm.params = poison(clean_params, path, index, value)
    outs = llm.generate([[5, 6, 7], [9, 10]], GREEDY)
    for out in outs:
        # Before: every id was 0 (argmax of NaN), the text empty and the reason "length".
        assert out.finish_reason == "error" and out.token_ids == []
        assert "non-finite logits" in out.error and "generated token 0" in out.error


@pytest.mark.parametrize("attention", ["dense", "lserve"])
def test_a_poisoned_row_stops_and_the_other_rows_are_unaffected(llm, attention):
    # Pages of 16 tokens: each row owns 1 of its 2 page-table entries, the other is the null
    # page, which every row's (masked) attention reads.
    llm = LLM(llm.checkpoint_path, attention=attention, page_size=16, logical_page_size=4,
              token_budget=48, dec_sink_tokens=16, dec_local_tokens=16)
    clean_params = llm.params
    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    clean = llm.generate(prompts, GREEDY)
    solo = llm.generate([prompts[1]], GREEDY)[0]
    assert clean[1].token_ids == solo.token_ids
    # Row 0 generates token t at index 2; a NaN in t's input embedding (the tiny model is not
    # tied) poisons row 0 from decode step 3 on, and only row 0.
    t = clean[0].token_ids[2]
    assert t not in prompts[0] + clean[0].token_ids[:2] + prompts[1] + clean[1].token_ids
    llm.params = poison(clean_params, ("embed",), t)
    bad, other = llm.generate(prompts, GREEDY)
    assert bad.finish_reason == "error" and "generated token 3" in bad.error
    assert bad.token_ids == clean[0].token_ids[:3]
    # The stopped row keeps running the batch's steps (its writes go to the null page); the
    # other row must not read its NaNs from there.
    assert other.finish_reason == "length" and other.error is None
    assert other.token_ids == clean[1].token_ids


def test_nan_embedding_row_of_a_tied_model_is_an_error(tmp_path_factory):
    llm = LLM(str(convert_tiny_llama(tmp_path_factory, tie_word_embeddings=True)))
    assert "lm_head" not in llm.params
    [clean] = llm.generate([[5, 6, 7]], GREEDY)
    llm.params = poison(llm.params, ("embed",), 77)  # a token the prompt does not contain
    [out] = llm.generate([[5, 6, 7]], GREEDY)
    # Before: greedy emitted token 77 (the argmax of a row holding a NaN is the NaN).
    assert clean.token_ids[0] != 77
    assert out.finish_reason == "error" and out.token_ids == []


# ---- command line ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    """The tiny model with a word-level tokenizer over its 128 ids."""
    vocab = {f"w{i}": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    src = tmp_path_factory.mktemp("tok")
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w2"}))
    return convert_tiny_llama(tmp_path_factory, tokenizer_from=src)


def test_cli_seed_out_of_range_is_an_error_not_a_traceback(text_ckpt, capsys):
    code = generate.main(["--ckpt", str(text_ckpt), "--prompt", "w5 w6", "--seed", str(2**63)])
    assert code == 2 and "seed=" in capsys.readouterr().err


def test_cli_exits_non_zero_on_non_finite_logits(text_ckpt, capsys, monkeypatch):
    class PoisonedLLM(LLM):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.params = poison(self.params, ("final_norm",), 0)

    monkeypatch.setattr(generate, "LLM", PoisonedLLM)
    code = generate.main(["--ckpt", str(text_ckpt), "--prompt", "w5 w6", "--max-new-tokens", "3"])
    err = capsys.readouterr().err
    assert code == 1 and "error: prompt 0: non-finite logits" in err
    code = generate.main(["--ckpt", str(text_ckpt), "--prompt", "w5 w6", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1 and out["finish_reason"] == "error" and "non-finite" in out["error"]


# ---- knobs and head-pattern files ----------------------------------------------------------------

def test_head_pattern_file_errors_name_the_file(tmp_path):
    binary = tmp_path / "binary.tsv"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ValueError, match=r"binary.tsv is not a text file"):
        head_pattern.load_head_pattern(binary)
    with pytest.raises(ValueError, match="cannot read head pattern"):
        head_pattern.load_head_pattern(tmp_path)  # a directory


def test_head_pattern_with_byte_order_mark_loads(tmp_path):
    plain, bom = tmp_path / "plain.tsv", tmp_path / "bom.tsv"
    plain.write_text("0.5\t1.0\n0.0\t0.25\n", encoding="utf-8")
    bom.write_text("0.5\t1.0\n0.0\t0.25\n", encoding="utf-8-sig")
    assert bom.read_bytes().startswith(b"\xef\xbb\xbf")
    np.testing.assert_array_equal(head_pattern.load_head_pattern(bom),
                                  head_pattern.load_head_pattern(plain))


def test_malformed_head_pattern_is_an_error_with_dense_attention(llm, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("0.5\t1.0\t0.3\n")  # 1 layer x 3 heads; the model has 2 x 2
    with pytest.raises(ValueError, match="bad.tsv has 1 layers x 3 KV heads"):
        LLM(llm.checkpoint_path, attention="dense", head_pattern=str(bad))


@pytest.mark.parametrize("kwargs, match", [
    (dict(token_budget=64), "minimum budget of 3 pages"),
    (dict(token_budget=128, page_size=64), "minimum budget of 3 pages"),
    (dict(static_sparsity="0.5"), "static_sparsity"),
    (dict(static_sparsity=True), "static_sparsity"),
    (dict(selector_interval=1.0), "selector_interval"),
])
def test_sparsity_knobs_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparsityConfig(**kwargs)


def test_valid_ids_and_keys_are_plain_arrays():
    assert inputs.check_token_ids("ids", np.arange(3)) == [0, 1, 2]
    assert all(type(t) is int for t in inputs.check_token_ids("ids", np.arange(3)))
    assert jnp.asarray(inputs.seed_key(7)).dtype == jnp.uint32


def test_sampling_is_keyed_by_each_rows_output_index():
    """A row's draw depends on its key and its own output index, not on the batch around it
    (what lets a request be batched differently, or recomputed, and draw the same tokens)."""
    from lserve_jax.sampling import SamplingArrays, sample

    logits = jax.random.normal(jax.random.PRNGKey(0), (3, 50))
    keys = jnp.asarray(np.stack([inputs.seed_key(s) for s in (11, 12, 13)]))
    arrays = SamplingArrays(temperature=jnp.ones(3), top_k=jnp.zeros(3, jnp.int32),
                            top_p=jnp.ones(3), keys=keys)
    index = jnp.array([0, 5, 9], jnp.int32)
    batch = np.asarray(sample(logits, arrays, index))
    for row in range(3):
        alone = SamplingArrays(*(x[row:row + 1] for x in (arrays.temperature, arrays.top_k,
                                                          arrays.top_p, arrays.keys)))
        assert sample(logits[row:row + 1], alone, index[row:row + 1])[0] == batch[row]
    draws = {int(sample(logits[:1], SamplingArrays(*(x[:1] for x in (
        arrays.temperature, arrays.top_k, arrays.top_p, arrays.keys))), jnp.array([i]))[0])
        for i in range(20)}
    assert len(draws) > 1  # the index really moves the stream
