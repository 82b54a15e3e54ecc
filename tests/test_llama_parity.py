"""Logits and greedy continuations equal HF transformers (torch, f32) on tiny random Llamas."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import convert
from lserve_jax import LLM, SamplingParams
from lserve_jax.checkpoint import load_checkpoint
from models import llama

CASES = {
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa-tied-llama3": dict(
        num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=64)),
    "gqa-linear-headdim": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=24,
                               tie_word_embeddings=False,
                               rope_scaling=dict(rope_type="linear", factor=2.0)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def model(request, tmp_path_factory):
    hf_config = transformers.LlamaConfig(
        vocab_size=311, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
        bos_token_id=1, eos_token_id=2, **CASES[request.param])
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so logits are not near-uniform
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    src = tmp_path_factory.mktemp("hf") / request.param
    hf.save_pretrained(src, safe_serialization=True)
    out = convert.convert(src, tmp_path_factory.mktemp("conv") / request.param, progress=False)
    return hf, out


def test_logits_match_hf(model):
    hf, ckpt = model
    config, params, tokenizer = load_checkpoint(ckpt)
    assert tokenizer is None
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (2, 300))
    with torch.no_grad():
        expected = hf(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(llama.forward(params, jnp.asarray(tokens), config=config))
    rel = np.abs(got - expected).max() / np.abs(expected).max()
    assert rel <= 1e-4, rel


def test_greedy_continuation_matches_hf(model):
    hf, ckpt = model
    llm = LLM(str(ckpt))
    rng = np.random.RandomState(1)
    prompts = [rng.randint(3, 311, n).tolist() for n in (257, 120)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                              min_new_tokens=10, pad_token_id=0)
        assert out.token_ids == ref[0, len(prompt):].tolist()
        assert out.text is None and out.finish_reason == "length"
