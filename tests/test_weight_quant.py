"""8-bit weight-only quantization (weight_dtype "int8", models/weight_quant.py): the arithmetic
against NumPy, `linear` against the dequantized matmul, the model's logits and the engine's
tokens within stated tolerances of the float weights (dense and LServe, with a float or an int8
KV cache), the KV scales and the KV budget computed in the right order, the knob's errors and
the CLI. Tiny random Llamas, f32, CPU; and the embedded SmolLM2."""

import gc
import json
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (convert_tiny_llama, convert_word_llama, greedy_closeness,
                      tiny_engine_knobs)
from lserve_jax import (LLM, Engine, SamplingParams, calibrate, checkpoint, generate, kv_quant,
                        serve)
from lserve_jax.engine import device
from models import LlamaConfig, init_params, llama, weight_quant
from models.weight_quant import Int8Weight

CONFIG = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2,
                     num_heads=6, num_kv_heads=2, head_dim=8, rope_theta=500.0)


def reference_quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NumPy: per output column, scale = max|w| / 127 (1 for a zero column), q = clip(round
    half to even of w times 1 / scale, computed in f32), -127, 127)."""
    absmax = np.abs(w.astype(np.float32)).max(axis=0)
    scale = np.where(absmax > 0, absmax / np.float32(127), np.float32(1)).astype(np.float32)
    q = np.clip(np.round(w.astype(np.float32) * (np.float32(1) / scale)), -127, 127)
    return q.astype(np.int8), scale


def test_round_trip_matches_the_numpy_reference():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((40, 7)) * rng.uniform(0.01, 3.0, 7)).astype(np.float32)
    w[:, 1] = 0.0  # a zero column: scale 1, q 0
    w[:5, 2] = [0.5, 1.5, 2.5, -2.5, -0.5]  # scale exactly 1 (the column's max is 127):
    w[5:, 2] = 0.0                          # halves round to even
    w[6, 2] = 127.0
    w[:, 3] = -np.abs(w[:, 3])  # the extreme is negative: -127, never -128
    got = weight_quant.quantize_weight(jnp.asarray(w))
    assert isinstance(got, Int8Weight) and got.shape == (40, 7)
    assert got.q.dtype == jnp.int8 and got.q.shape == (40, 7)
    assert got.scale.dtype == jnp.float32 and got.scale.shape == (7,)
    q, scale = reference_quantize(w)
    np.testing.assert_array_equal(np.asarray(got.q), q)
    np.testing.assert_array_equal(np.asarray(got.scale), scale)
    assert scale[1] == 1.0 and not q[:, 1].any()
    assert scale[2] == 1.0 and list(q[:5, 2]) == [0, 2, 2, -2, 0]
    assert q[:, 3].min() == -127 and q.min() >= -127 and q.max() <= 127
    assert (np.abs(q).max(axis=0)[[0, 2, 3, 4, 5, 6]] == 127).all()  # each column's extreme
    deq = np.asarray(weight_quant.dequantize(got))
    assert (np.abs(w - deq) <= scale / 2 * (1 + 1e-6)).all()
    # A bf16 weight quantizes its own values (f32 arithmetic), to the same layout.
    half = weight_quant.quantize_weight(jnp.asarray(w, jnp.bfloat16))
    q16, s16 = reference_quantize(np.asarray(jnp.asarray(w, jnp.bfloat16), np.float32))
    np.testing.assert_array_equal(np.asarray(half.q), q16)
    np.testing.assert_array_equal(np.asarray(half.scale), s16)


def test_linear_equals_the_dequantized_matmul():
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((48, 80)) * 0.1, jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, 3, 48)), jnp.float32)
    qw = weight_quant.quantize_weight(w)
    np.testing.assert_array_equal(np.asarray(weight_quant.linear(x, w)), np.asarray(x @ w))
    got = jax.jit(weight_quant.linear)(x, qw)
    assert got.shape == (2, 3, 80) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(x @ weight_quant.dequantize(qw)),
                               rtol=1e-5, atol=1e-5)
    # A bf16 activation: bf16 out, one rounding of the f32-accumulated, scaled dot.
    x16 = x.astype(jnp.bfloat16)
    got16 = weight_quant.linear(x16, qw)
    assert got16.dtype == jnp.bfloat16
    want = np.asarray(x16, np.float32) @ np.asarray(weight_quant.dequantize(qw))
    np.testing.assert_allclose(np.asarray(got16, np.float32), want, rtol=1e-2, atol=1e-2)


def test_quantize_params_quantizes_the_layers_only():
    params = init_params(CONFIG, jax.random.key(0), scale=0.1)
    assert weight_quant.quantize_params(params, "auto") is params
    q = weight_quant.quantize_params(params, "int8")
    assert weight_quant.is_quantized(q) and not weight_quant.is_quantized(params)
    for layer, fl in zip(q["layers"], params["layers"]):
        for name, w in layer.items():
            if name in weight_quant.QUANTIZED_KEYS:
                assert isinstance(w, Int8Weight) and w.shape == fl[name].shape
            else:
                assert w is fl[name]  # norms shared, not copied
    for name in ("embed", "final_norm", "lm_head"):
        assert q[name] is params[name]
    assert weight_quant.quantize_params(q, "int8")["layers"][0]["wq"] is q["layers"][0]["wq"]
    # Bytes: each quantized [in, out] f32 matrix becomes in * out + 4 * out.
    shapes = [params["layers"][0][name].shape for name in weight_quant.QUANTIZED_KEYS]
    assert shapes == [(48, 48), (48, 16), (48, 16), (48, 48), (48, 80), (48, 80), (80, 48)]
    saved = CONFIG.num_layers * sum(4 * i * o - (i * o + 4 * o) for i, o in shapes)
    assert weight_quant.weight_bytes(params) - weight_quant.weight_bytes(q) == saved
    with pytest.raises(ValueError, match="weight_dtype.*auto.*int8"):
        weight_quant.quantize_params(params, "int4")


def test_forward_logits_stay_close_to_the_float_weights():
    """llama.forward with int8 layer weights: the same function of the dequantized weights (to
    f32 rounding), and within a stated distance of the float model's logits."""
    params = init_params(CONFIG, jax.random.key(0), scale=0.1)
    q = weight_quant.quantize_params(params, "int8")
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 97, (2, 24)), jnp.int32)
    want = np.asarray(llama.forward(params, tokens, config=CONFIG))
    got = np.asarray(llama.forward(q, tokens, config=CONFIG))
    deq = {**params, "layers": [{k: weight_quant.dequantize(w) if isinstance(w, Int8Weight)
                                 else w for k, w in layer.items()} for layer in q["layers"]]}
    np.testing.assert_allclose(got, np.asarray(llama.forward(deq, tokens, config=CONFIG)),
                               rtol=1e-4, atol=1e-4)
    # Measured: max |logit difference| 0.066 against a logit std of 0.72 (seed 0).
    assert np.abs(got - want).max() < 0.2
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9  # measured 47 of 48


def test_calibration_refuses_quantized_weights():
    q = weight_quant.quantize_params(init_params(CONFIG, jax.random.key(0)), "int8")
    with pytest.raises(ValueError, match="float weights"):
        calibrate.profile_gates(q, CONFIG, np.zeros((1, 40), np.int32), sink=4, recent=8)
    with pytest.raises(ValueError, match="float weights"):
        calibrate.optimize_gates(q, CONFIG, [object()], steps=1, progress=False)


# ---- the engine on a tiny converted model ------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return convert_tiny_llama(tmp_path_factory, vocab_size=128, max_position_embeddings=256)


RUNS = {}  # (mode, weight dtype, kv cache dtype) -> (engine, results)
PROMPT_LENGTHS = (41, 45, 50)


def engine_run(ckpt, tmp_path, mode, weight_dtype, kv_cache_dtype="auto"):
    key = (mode, weight_dtype, kv_cache_dtype)
    if key not in RUNS:
        kwargs = tiny_engine_knobs(mode, tmp_path)
        rng = np.random.default_rng(0)
        # One prefill call, then decode calls: few compiles. The prompts pass the Λ window
        # (8 + 32 tokens) in prefill, and the 3 pages of budget and the ring in decode.
        prompts = [[int(t) for t in rng.integers(3, 128, n)] for n in PROMPT_LENGTHS]
        engine = Engine(ckpt, weight_dtype=weight_dtype, kv_cache_dtype=kv_cache_dtype,
                        max_num_seqs=4, max_num_batched_tokens=256,
                        long_prefill_token_threshold=0, **kwargs)
        RUNS[key] = engine, run(engine, prompts)
    return RUNS[key]


def run(engine, prompts, logprobs=5):
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=logprobs)
    ids = [engine.add_request(None, p, sp) for p in prompts]
    final = engine.run_until_done(ids)
    return [final[rid] for rid in ids]


# Largest log-probability gap of the same token between the runs, and of the two runs' choices
# under the float run where they first differ (a near tie may flip). Measured with a float /
# an int8 KV cache: dense 0.00024 / 0.00035; LServe 0.0102 / 0.0098, from its discrete choices
# (with a budget holding every page, or without streaming heads, it is 0.0005 and 0.0002).
GAP = {"dense": 0.002, "lserve": 0.04}


@pytest.mark.parametrize("mode,kv_cache_dtype", [("dense", "auto"), ("lserve", "auto"),
                                                 ("lserve", "int8")])
def test_int8_weights_engine_stays_close_to_the_float_weights(ckpt, tmp_path, mode,
                                                              kv_cache_dtype):
    _, reference = engine_run(ckpt, tmp_path, mode, "auto")
    engine, results = engine_run(ckpt, tmp_path, mode, "int8", kv_cache_dtype)
    assert engine.weight_dtype == "int8" and engine.kv_cache_dtype == kv_cache_dtype
    assert isinstance(engine.params["layers"][0]["w_up"], Int8Weight)
    assert engine.params["embed"].dtype == jnp.float32
    agree, gap = greedy_closeness(reference, results, GAP[mode])
    assert gap < GAP[mode]
    assert agree == 36  # measured: every token of the 3 x 12


def test_compiled_steps_are_not_shared_across_weight_dtypes(ckpt, tmp_path):
    """An int8-weight engine compiles its own steps beside a float one of the same model and
    pool, and shares them with another int8-weight engine."""
    engine_run(ckpt, tmp_path, "dense", "auto")
    first, results = engine_run(ckpt, tmp_path, "dense", "int8")
    assert first.compile_s > 0
    again = Engine(ckpt, weight_dtype="int8", max_num_seqs=4, max_num_batched_tokens=256,
                   long_prefill_token_threshold=0, page_size=8, logical_page_size=4)
    outs = run(again, [r.prompt_token_ids for r in results])
    assert [o.token_ids for o in outs] == [r.token_ids for r in results]
    assert again.compile_s == 0


def test_kv_scales_are_calibrated_on_the_float_weights(ckpt):
    stored = ckpt / kv_quant.SCALES_FILE
    stored.unlink(missing_ok=True)
    quantized = Engine(ckpt, weight_dtype="int8", kv_cache_dtype="int8", page_size=8,
                       logical_page_size=4)
    _, config, params, tokenizer = checkpoint.load_model(ckpt)
    tokens = kv_quant.calibration_tokens(tokenizer, config)
    want = kv_quant.calibrate_kv_scales(params, config, tokens)
    assert quantized.kv_scales == want
    np.testing.assert_array_equal(np.asarray(json.loads(stored.read_text())["scales"]),
                                  np.asarray(want))
    # ... and not those the int8 model would give
    assert kv_quant.calibrate_kv_scales(weight_quant.quantize_params(params, "int8"), config,
                                        tokens) != want


def test_kv_budget_is_read_after_the_float_weights_are_freed(ckpt, monkeypatch):
    """On a GPU the pool gets a share of the device memory minus what is in use: with int8
    weights the float matrices must be gone by then. A fake device reports the memory and
    records which of the loaded float weights are still alive when it is asked."""
    loaded, alive = [], []
    load = checkpoint.load_model

    def load_model(*args, **kwargs):
        out = load(*args, **kwargs)
        loaded[:] = [weakref.ref(layer["w_up"]) for layer in out[2]["layers"]]
        return out

    def memory_stats():
        gc.collect()
        alive.append(sum(r() is not None for r in loaded))
        return {"bytes_limit": 2**26, "bytes_in_use": 0}

    monkeypatch.setattr(checkpoint, "load_model", load_model)
    monkeypatch.setattr(device, "memory_stats", memory_stats)
    sizes = {}
    for weight_dtype in ("auto", "int8"):
        engine = Engine(ckpt, weight_dtype=weight_dtype, page_size=8, logical_page_size=4,
                        max_num_seqs=2)
        sizes[weight_dtype] = engine.weight_bytes
        del engine
    assert alive == [2, 0]  # float: the engine's own weights; int8: none left
    assert sizes["int8"] < 0.55 * sizes["auto"]  # 53888 of 107136 bytes (float embedding, head)


@pytest.mark.parametrize("kwargs", [dict(weight_dtype="int4"), dict(weight_dtype="fp8"),
                                    dict(weight_dtype=None)])
def test_unknown_weight_dtype_is_a_clear_error(ckpt, kwargs):
    with pytest.raises(ValueError, match=r"weight_dtype=.* must be one of \('auto', 'int8'\)"):
        Engine(ckpt, **kwargs)
    with pytest.raises(ValueError, match="weight_dtype"):
        LLM(str(ckpt), **kwargs)


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    return convert_word_llama(tmp_path_factory)


def test_cli_weight_dtype(text_ckpt, capsys):
    argv = ["--ckpt", str(text_ckpt), "--prompt", "w5 w6 w7", "--max-new-tokens", "4",
            "--json", "--weight-dtype", "int8"]
    assert generate.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 4 and out["finish_reason"] == "length"
    with pytest.raises(SystemExit) as e:
        generate.main(argv[:-1] + ["int4"])
    assert e.value.code == 2
    assert "--weight-dtype" in capsys.readouterr().err
    # The server shares the engine flags.
    for parser, rest in ((generate._parser(), ["--prompt", "x"]), (serve._parser(), [])):
        args = parser.parse_args(rest + ["--weight-dtype", "int8"])
        assert generate.engine_kwargs(args)["weight_dtype"] == "int8"
