"""Head calibration (DuoAttention gates, profiling baseline) and the accuracy harness, on tiny
random models: the math against references, and both command lines end to end."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, convert_tiny_llama
from lserve_jax import calibrate, corpus, eval as harness, head_pattern
from lserve_jax.checkpoint import Tokenizer, default_gguf, load_checkpoint, resolve_checkpoint
from models import llama
from models.attention import AttentionConfig, prefill_attention
from models.sparsity import SparsityConfig
from models.config import LlamaConfig
from models.params import init_params

try:
    default_gguf()
except FileNotFoundError as e:
    pytest.skip(str(e), allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2_dir():
    return resolve_checkpoint(None)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return Tokenizer.from_dir(smollm2_dir)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, smollm2_dir):
    """A tiny random Llama with SmolLM2's vocabulary and tokenizer, converted from HF."""
    return convert_tiny_llama(tmp_path_factory, vocab_size=49152, max_position_embeddings=1024,
                              tokenizer_from=smollm2_dir)


def _tiny_model(seed=0):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256)
    return config, init_params(config, jax.random.PRNGKey(seed), scale=0.3)


# ---- calibration math --------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_gated_attention_at_gates_0_and_1_is_lserve_prefill(seed):
    """Gate 1 = full causal attention, gate 0 = the Λ mask: with gates 1 − streaming flags the
    mixed attention is exactly LServe's prefill attention with those streaming heads."""
    rng = np.random.default_rng(seed)
    b, t, hq, hkv, d = 2, 96, 6, 3, 16
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
               for h in (hq, hkv, hkv))
    flags = tuple(bool(x) for x in rng.integers(0, 2, hkv))
    sink, recent = int(rng.integers(0, 16)), int(rng.integers(1, 40))
    gates = jnp.asarray([0.0 if f else 1.0 for f in flags])
    out = calibrate.gated_attention(q, k, v, gates, sink=sink, recent=recent)
    att = AttentionConfig(mode="lserve", impl="xla", streaming_heads=(flags,),
                          sparsity=SparsityConfig(ctx_sink_tokens=sink, ctx_local_tokens=recent))
    ref = prefill_attention(q, k, v, jnp.full((b,), t, jnp.int32), layer=0, config=att)
    assert_close(out, ref)
    half = calibrate.gated_attention(q, k, v, jnp.full((hkv,), 0.25), sink=sink, recent=recent)
    full = calibrate.gated_attention(q, k, v, jnp.ones(hkv), sink=sink, recent=recent)
    stream = calibrate.gated_attention(q, k, v, jnp.zeros(hkv), sink=sink, recent=recent)
    assert_close(half, 0.25 * full + 0.75 * stream)


def test_gated_hidden_states_with_open_gates_give_the_model_logits():
    config, params = _tiny_model()
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 40), 0, config.vocab_size)
    gates = jnp.ones((config.num_layers, config.num_kv_heads))
    hidden = calibrate.gated_hidden_states(params, tokens, gates, config=config, sink=4, recent=8)
    head = params["embed"].T if config.tie_word_embeddings else params["lm_head"]
    assert_close(hidden @ head, llama.forward(params, tokens, config=config))


def test_distillation_gradient_is_l1_only_at_open_gates_and_mse_grows_when_closed():
    config, params = _tiny_model()
    tokens = jax.random.randint(jax.random.PRNGKey(2), (1, 48), 0, config.vocab_size)
    mask = jnp.arange(48)[None] >= 40
    ones = jnp.ones((config.num_layers, config.num_kv_heads))
    kw = dict(config=config, sink=2, recent=6)
    target = calibrate.gated_hidden_states(params, tokens, ones, **kw)
    (loss, mse), grad = jax.value_and_grad(calibrate.distillation_loss, has_aux=True)(
        ones, params, tokens, mask, target, l1=0.05, **kw)
    assert float(mse) == pytest.approx(0.0, abs=1e-10)
    assert float(loss) == pytest.approx(0.05)
    assert_close(grad, jnp.full_like(ones, 0.05 / ones.size))
    _, mse_closed = calibrate.distillation_loss(0 * ones, params, tokens, mask, target, l1=0.05,
                                                **kw)
    assert float(mse_closed) > 1e-6


def test_outside_mass_matches_brute_force():
    rng = np.random.default_rng(3)
    b, t, hq, hkv, d, sink, recent = 2, 40, 4, 2, 8, 3, 7
    q = jnp.asarray(rng.standard_normal((b, t, hq, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, t, hkv, d)), jnp.float32)
    got = calibrate.outside_mass(q, k, sink=sink, recent=recent)
    qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
    want = np.zeros(hkv)
    for head in range(hkv):
        vals = []
        for bi in range(b):
            for g in range(hq // hkv):
                for i in range(sink + recent, t):
                    s = kn[bi, :i + 1, head] @ qn[bi, i, head * (hq // hkv) + g] / np.sqrt(d)
                    p = np.exp(s - s.max())
                    p /= p.sum()
                    inside = [j for j in range(i + 1) if j < sink or i - j < recent]
                    vals.append(1.0 - p[inside].sum())
        want[head] = np.mean(vals)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_calibration_samples_and_passkey_prompts(tokenizer):
    rng = np.random.default_rng(0)
    s = corpus.multi_passkey_sample(tokenizer, rng, length=600, num_passkeys=3)
    assert s.ids.shape == s.answer_mask.shape == (600,)
    answer = tokenizer.decode(s.ids[s.answer_mask].tolist())
    text = tokenizer.decode(s.ids[~s.answer_mask].tolist())
    keys = [k.strip(" .") for k in answer.split(",")]
    assert len(keys) == 3 and all(f"number {i + 1} is {key}." in text for i, key in enumerate(keys))
    span = np.flatnonzero(s.answer_mask)
    np.testing.assert_array_equal(span, np.arange(span[0], 600))  # one span, at the end
    for depth in (0.0, 0.5, 1.0):
        p = corpus.passkey_prompt(tokenizer, length=300, depth=depth, passkey="12345")
        assert len(p.ids) == 300
        assert tokenizer.decode(p.ids).endswith("The pass key is")
        assert "The pass key is 12345" in tokenizer.decode(p.ids[p.needle_position:])
    with pytest.raises(ValueError, match="too short"):
        corpus.passkey_prompt(tokenizer, length=20, depth=0.5, passkey="12345")


# ---- command lines -----------------------------------------------------------------------------

def test_calibrate_cli_writes_a_valid_pattern(tiny_ckpt, tmp_path):
    out = tmp_path / "pattern" / "full_attention_heads.tsv"
    rc = calibrate.main(["--ckpt", str(tiny_ckpt), "--out", str(out), "--lengths", "200",
                         "--steps", "3", "--num-samples", "2", "--sink", "16", "--recent", "32",
                         "--num-passkeys", "2", "--no-progress"])
    assert rc == 0
    gates = head_pattern.load_head_pattern(out)
    assert gates.shape == (2, 2)
    assert ((gates >= 0) & (gates <= 1)).all()
    assert gates.max() < 1.0  # the L1 term moves every gate down from 1
    settings = json.loads((out.parent / "settings.json").read_text())
    assert settings["method"] == "duo" and len(settings["history"]) == 3
    assert (out.parent / "loss.png").stat().st_size > 0
    assert head_pattern.streaming_heads_for_model(out, 0.5, 2, 2)

    prof = tmp_path / "profile" / "full_attention_heads.tsv"
    assert calibrate.main(["--ckpt", str(tiny_ckpt), "--out", str(prof), "--method", "profile",
                           "--lengths", "200", "--sink", "16", "--recent", "32",
                           "--profile-rows", "2"]) == 0
    gates = head_pattern.load_head_pattern(prof)
    assert gates.shape == (2, 2) and ((gates > 0) & (gates < 1)).all()


def test_calibrate_cli_rejects_bad_lengths(tiny_ckpt, tmp_path, capsys):
    rc = calibrate.main(["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "x.tsv"),
                         "--lengths", "100", "--sink", "64", "--recent", "64"])
    assert rc == 2 and "exceed sink + recent" in capsys.readouterr().err


# ---- evaluation --------------------------------------------------------------------------------

def test_metrics_on_a_hand_made_case():
    assert harness.top1_agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert harness.perplexity([np.log(2.0), np.log(8.0)]) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        harness.top1_agreement([1, 2], [1, 2, 3])
    assert harness.confident_agreement([1, 2, 3, 4], [1, 0, 0, 4],
                                       np.log([0.9, 0.4, 0.6, 0.5])) == (2 / 3, 3)
    assert harness.confident_agreement([1], [2], np.log([0.1])) == (None, 0)
    assert corpus.passkey_found(" 12345. Remember it.", "12345")
    assert corpus.passkey_found("is 12345", "12345")
    assert not corpus.passkey_found(" 123456.", "12345")
    assert not corpus.passkey_found(" 1234 5", "12345")
    assert not corpus.passkey_found(" no number", "12345")
    passkey = [dict(setting=s, length=n, depth=d, hit=h) for s, n, d, h in [
        ("dense", 1, 0, True), ("dense", 1, 1, False), ("x", 1, 0, False), ("x", 1, 1, True)]]
    forced = [dict(setting=s, length=8, tokens=t, agreement=a, perplexity=p,
                   confident_agreement=c, confident_tokens=n)
              for s, t, a, p, c, n in [
                  ("dense", 10, 1.0, 2.0, 1.0, 4), ("dense", 30, 1.0, 4.0, 1.0, 6),
                  ("x", 10, 0.5, 2.0, 0.75, 4), ("x", 30, 0.9, 4.0, 1.0, 6)]]
    rows = {r["setting"]: r for r in harness.summarize(passkey, forced)}
    assert rows["x"]["passkey_hits"] == 1 and rows["x"]["cells_ge_dense"] == 1
    assert rows["dense"]["cells_ge_dense"] == 2
    assert rows["x"]["agreement@8"] == pytest.approx((0.5 * 10 + 0.9 * 30) / 40)
    assert rows["x"]["ppl@8"] == pytest.approx(np.exp((10 * np.log(2) + 30 * np.log(4)) / 40))
    assert rows["x"]["confident_agreement@8"] == pytest.approx((0.75 * 4 + 6) / 10)
    assert rows["x"]["confident_tokens@8"] == 10


def test_cache_from_dense_equals_lserve_prefill():
    """Rebuilding an LServe cache from a dense prefill gives the same next-token logits as an
    LServe prefill, as long as the prefill window covers the prompt; otherwise it refuses."""
    config, params = _tiny_model(4)
    streaming = ((True, False), (False, True))
    pages = dict(page_size=16, logical_page_size=16)  # one logical page per page
    knobs = SparsityConfig(**pages, ctx_sink_tokens=4, ctx_local_tokens=200, dec_sink_tokens=16,
                           dec_local_tokens=32, token_budget=48, selector_interval=2,
                           keep_first_pages=0)  # LServe's rule
    att = AttentionConfig(mode="lserve", impl="xla", streaming_heads=streaming, sparsity=knobs)
    runner = harness.Runner(config, params, max_tokens=160)
    ids = np.random.default_rng(5).integers(0, 64, 120).tolist()
    dense_cache, _ = runner.prefill(AttentionConfig(sparsity=SparsityConfig(**pages)), ids, 130)
    rebuilt = harness.cache_from_dense(dense_cache, runner.empty_cache(att, 130), len(ids),
                                       config=config, attention=att)
    direct, _ = runner.prefill(att, ids, 130)
    for name in ("k", "v", "kmax", "kmin", "sk", "sv"):  # page 0, the null page, takes junk
        for a, b in zip(getattr(rebuilt, name), getattr(direct, name), strict=True):
            assert_close(a[:, 1:], b[:, 1:])
    for name in ("page_table", "seq_lens", "selected_num_pages", "decode_steps"):
        np.testing.assert_array_equal(getattr(rebuilt, name), getattr(direct, name))
    steps = list(range(10))
    _, top_a, lp_a, _ = runner.decode(att, rebuilt, steps, steps[1:] + [0], [True] * 10)
    _, top_b, lp_b, _ = runner.decode(att, direct, steps, steps[1:] + [0], [True] * 10)
    np.testing.assert_array_equal(top_a, top_b)
    assert_close(lp_a, lp_b)
    narrow = dataclasses.replace(att, sparsity=dataclasses.replace(knobs, ctx_local_tokens=64))
    with pytest.raises(ValueError, match="prefill it instead"):
        harness.cache_from_dense(dense_cache, runner.empty_cache(narrow, 130), len(ids),
                                 config=config, attention=narrow)


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "int4"])
def test_cache_from_dense_into_a_quantized_cache(kv_cache_dtype):
    """A one-shot prefill attends over its fresh keys and values, so the quantized cache it
    leaves equals the dense float prefill's keys and values stored quantized."""
    config, params = _tiny_model(6)
    scales = ((0.05, 0.04), (0.06, 0.05))
    runner = harness.Runner(config, params, max_tokens=160, kv_scales=scales)
    att = AttentionConfig(mode="lserve", impl="xla", streaming_heads=((True, False),
                                                                       (False, True)),
                          sparsity=SparsityConfig(page_size=16, logical_page_size=16,
                                                  ctx_local_tokens=200, token_budget=48))
    ids = np.random.default_rng(7).integers(0, 64, 100).tolist()
    dense_cache, _ = runner.prefill(AttentionConfig(sparsity=att.sparsity), ids, 110)
    rebuilt = harness.cache_from_dense(dense_cache,
                                       runner.empty_cache(att, 110, kv_cache_dtype), len(ids),
                                       config=config, attention=att)
    direct, _ = runner.prefill(att, ids, 110, kv_cache_dtype=kv_cache_dtype)
    assert rebuilt.kv_cache_dtype == direct.kv_cache_dtype == kv_cache_dtype
    for name in ("k", "v", "sk", "sv", "kmax", "kmin") + (
            ("k_scale", "v_scale", "sk_scale", "sv_scale") if kv_cache_dtype == "int4" else ()):
        for a, b in zip(getattr(rebuilt, name), getattr(direct, name), strict=True):
            np.testing.assert_array_equal(np.asarray(a[:, 1:]), np.asarray(b[:, 1:]), name)


def test_eval_quantization_settings(tiny_ckpt, tmp_path):
    """--quant runs every setting per (KV cache dtype, weight dtype) pair against the float
    dense reference."""
    pattern = tmp_path / "a.tsv"
    head_pattern.write_head_pattern(pattern, np.random.default_rng(1).random((2, 2)))
    out = tmp_path / "results"
    rc = harness.main(["--ckpt", str(tiny_ckpt), "--out", str(out), "--pattern", str(pattern),
                       "--lengths", "160", "--depths", "0", "--budgets", "64",
                       "--sparsities", "0.5", "--windows", "", "--main-budget", "64",
                       "--ppl-lengths", "200", "--ppl-tokens", "16", "--page-size", "16",
                       "--new-tokens", "4", "--quant", "int4:int8,auto:auto,int8"])
    assert rc == 0
    summary = {r["setting"]: r for r in json.loads((out / "summary.json").read_text())["summary"]}
    lserve = "calibrated s=0.5 budget=64"
    assert list(summary) == ["dense", lserve, "dense kv=int4 w=int8", f"{lserve} kv=int4 w=int8",
                             "dense kv=int8", f"{lserve} kv=int8"]
    records = json.loads((out / "agreement.json").read_text())["records"]
    assert {(r["kv_cache_dtype"], r["weight_dtype"]) for r in records} == {
        ("auto", "auto"), ("int4", "int8"), ("int8", "auto")}
    assert summary["dense"]["agreement@200"] == 1.0
    # Quantized caches and weights move the logits a little (this random model's perplexity,
    # about 48,856, moved by about 1e-5 relative), never to another model.
    for name in ("dense kv=int8", "dense kv=int4 w=int8"):
        ppl, dense = summary[name]["ppl@200"], summary["dense"]["ppl@200"]
        assert ppl != dense and ppl == pytest.approx(dense, rel=1e-3)
    assert (out / "kv_scales.json").exists() is False  # stored beside the checkpoint
    assert (tiny_ckpt / "kv_scales.json").exists()
    with pytest.raises(SystemExit):
        harness.main(["--out", str(out), "--quant", "int3:auto"])


def test_eval_cli_end_to_end(tiny_ckpt, tmp_path):
    config, _, _ = load_checkpoint(tiny_ckpt)
    pattern, baseline = tmp_path / "a.tsv", tmp_path / "b.tsv"
    rng = np.random.default_rng(0)
    head_pattern.write_head_pattern(pattern, rng.random((2, 2)))
    head_pattern.write_head_pattern(baseline, rng.random((2, 2)))
    out = tmp_path / "results"
    rc = harness.main(["--ckpt", str(tiny_ckpt), "--out", str(out), "--pattern", str(pattern),
                       "--baseline", str(baseline), "--lengths", "160,300", "--depths", "0,1",
                       "--budgets", "64", "--sparsities", "0,0.5", "--windows", "128",
                       "--main-budget", "512", "--ppl-lengths", "300", "--ppl-tokens", "16",
                       "--page-size", "16", "--new-tokens", "4"])
    assert rc == 0
    summary = {r["setting"]: r for r in json.loads((out / "summary.json").read_text())["summary"]}
    assert list(summary) == ["dense", "calibrated s=0.5 budget=64", "calibrated s=0 budget=512",
                             "calibrated s=0.5 budget=512", "baseline s=0.5 budget=512",
                             "calibrated s=0.5 budget=512 window=128"]
    passkey = json.loads((out / "passkey.json").read_text())["records"]
    assert len(passkey) == 6 * 2 * 2
    assert all(isinstance(r["hit"], bool) and len(r["answer"]) > 0 for r in passkey)
    assert summary["dense"]["agreement@300"] == 1.0
    # no streaming heads and a budget covering the context: exactly dense decoding
    assert summary["calibrated s=0 budget=512"]["agreement@300"] == 1.0
    assert summary["calibrated s=0 budget=512"]["ppl@300"] == pytest.approx(
        summary["dense"]["ppl@300"], rel=1e-4)
    assert all(0.0 <= r["agreement@300"] <= 1.0 and r["ppl@300"] > 1.0 for r in summary.values())
    for name in ("passkey.png", "agreement.png"):
        assert (out / name).stat().st_size > 0
    rc = harness.main(["--ckpt", str(tiny_ckpt), "--out", str(out), "--pattern", str(pattern),
                       "--lengths", "160", "--depths", "0", "--budgets", "64",
                       "--sparsities", "0.5", "--windows", "", "--page-size", "16",
                       "--new-tokens", "4", "--skip-forced"])
    assert rc == 0
    again = json.loads((out / "summary.json").read_text())["summary"]
    assert [r["setting"] for r in again] == ["dense", "calibrated s=0.5 budget=64",
                                             "calibrated s=0.5 budget=1024",
                                             "calibrated s=0 budget=512",
                                             "calibrated s=0.5 budget=512",
                                             "baseline s=0.5 budget=512",
                                             "calibrated s=0.5 budget=512 window=128"]
    assert len(json.loads((out / "passkey.json").read_text())["records"]) == 3


@pytest.mark.parametrize("args, message", [
    (["--depths", "0,1.5"], "must be in"),
    (["--lengths", "20"], "too short"),
    (["--budgets", "100"], "multiple of"),
    (["--sparsities", "2"], "must be in"),
    (["--ppl-lengths", "64", "--ppl-tokens", "64"], "below every"),
])
def test_eval_cli_rejects_bad_arguments(tiny_ckpt, tmp_path, capsys, args, message):
    pattern = tmp_path / "a.tsv"
    head_pattern.write_head_pattern(pattern, np.full((2, 2), 0.5))
    rc = harness.main(["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "r"), "--pattern",
                       str(pattern), "--page-size", "16", *args])
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
