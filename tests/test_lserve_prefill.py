"""The model's LServe prefill path: head patterns reach the unified kernel; consistency with dense."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax import LLM, SamplingParams
from lserve_jax.head_pattern import write_head_pattern
from models import AttentionConfig, LlamaConfig, SparsityConfig, init_params, llama

CONFIG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8)
T = 40
ALL_STREAMING = ((True, True), (True, True))
MIXED = ((True, False), (False, True))


@pytest.fixture(scope="module")
def setup():
    params = init_params(CONFIG, jax.random.key(0), scale=0.3)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, T)))
    dense = np.asarray(llama.forward(params, tokens, config=CONFIG))
    return params, tokens, dense


def _logits(params, tokens, *, streaming_heads, impl="xla", interpret=False, **knobs):
    attention = AttentionConfig(mode="lserve", impl=impl, interpret=interpret,
                                streaming_heads=streaming_heads, sparsity=SparsityConfig(**knobs))
    return np.asarray(llama.forward(params, tokens, config=CONFIG, attention=attention))


def test_windows_covering_the_prompt_equal_dense(setup):
    params, tokens, dense = setup
    for sink, local in [(0, T), (16, T - 16), (T, 1)]:
        got = _logits(params, tokens, ctx_sink_tokens=sink, ctx_local_tokens=local,
                      streaming_heads=ALL_STREAMING)
        np.testing.assert_allclose(got, dense, rtol=1e-4, atol=1e-4)


def test_no_pattern_or_all_dense_equals_dense(setup):
    params, tokens, dense = setup
    for streaming in (None, ((False, False), (False, False))):
        got = _logits(params, tokens, ctx_sink_tokens=2, ctx_local_tokens=4,
                      streaming_heads=streaming)
        np.testing.assert_allclose(got, dense, rtol=1e-4, atol=1e-4)


def test_streaming_heads_change_logits_and_kernel_matches_reference(setup):
    params, tokens, dense = setup
    kw = dict(ctx_sink_tokens=4, ctx_local_tokens=8, streaming_heads=MIXED)
    xla = _logits(params, tokens, impl="xla", **kw)
    # Early positions see every key through the window; later ones do not.
    np.testing.assert_allclose(xla[:, :8], dense[:, :8], rtol=1e-4, atol=1e-4)
    assert np.abs(xla[:, 20:] - dense[:, 20:]).max() > 1e-2
    pallas = _logits(params, tokens, impl="pallas", interpret=True, **kw)
    np.testing.assert_allclose(pallas, xla, rtol=1e-4, atol=1e-4)


def test_pattern_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="KV heads"):
        AttentionConfig(mode="lserve", streaming_heads=((True,),)).layer_streaming(0, 2)


def test_llm_lserve_with_pattern(tmp_path):
    """LLM(attention="lserve") reads the pattern; windows covering the prompt give dense tokens."""
    import torch
    import transformers

    import convert

    hf_config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(hf_config).save_pretrained(tmp_path / "hf")
    ckpt = str(convert.convert(tmp_path / "hf", tmp_path / "conv", progress=False))
    pattern = tmp_path / "full_attention_heads.tsv"
    write_head_pattern(pattern, np.array([[0.9, 0.1], [0.2, 0.8], [0.05, 0.7]]))
    prompt = np.random.RandomState(1).randint(0, 96, 70).tolist()
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    [dense] = LLM(ckpt).generate([prompt], sp)
    wide = LLM(ckpt, attention="lserve", head_pattern=str(pattern), ctx_sink_tokens=0,
               ctx_local_tokens=128)
    assert wide.attention.streaming_heads == ((False, True), (True, False), (True, False))
    assert wide.generate([prompt], sp)[0].token_ids == dense.token_ids
    narrow = LLM(ckpt, attention="lserve", head_pattern=str(pattern), ctx_sink_tokens=4,
                 ctx_local_tokens=8)
    [out] = narrow.generate([prompt], sp)
    assert len(out.token_ids) == 6
    shape_error = tmp_path / "bad.tsv"
    write_head_pattern(shape_error, np.ones((2, 2)))
    with pytest.raises(ValueError, match="layers"):
        LLM(ckpt, attention="lserve", head_pattern=str(shape_error))
