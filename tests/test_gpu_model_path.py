"""The whole model path natively on the GPU: `LLM(impl="pallas")` generates the same greedy
tokens as `LLM(impl="xla")`, in dense mode and in LServe mode.

The model is a tiny random Llama written as a converted checkpoint (no tokenizer), in f32: the
kernels' f32 dots are exact (IEEE, not TF32), so the two paths differ only in summation order
and greedy decoding cannot flip between them. LServe runs with a head pattern that makes one KV
head of each layer a streaming head (prefill Λ mask and decode sink + ring pages), pages of 16
tokens and a 4-page token budget, so prompts of 13 and 19 pages make the selector choose pages on
every selection step.
"""

import json

import jax
import numpy as np
import pytest

from models.config import LlamaConfig
from models.params import init_params

pytestmark = pytest.mark.gpu

CONFIG = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=2,
                     num_heads=8, num_kv_heads=2, head_dim=64, max_position_embeddings=1024,
                     rope_theta=10000.0)
# LServe knobs scaled to the tiny model; the others are SparsityConfig's defaults.
KNOBS = dict(page_size=16, logical_page_size=4, token_budget=64, dec_sink_tokens=16,
             dec_local_tokens=32, ctx_sink_tokens=16, ctx_local_tokens=64, static_sparsity=0.5)
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A converted checkpoint of random weights and a head pattern streaming head 0 of layer 0
    and head 1 of layer 1."""
    from convert.writer import CHECKPOINT_FORMAT, save_params
    from lserve_jax.head_pattern import write_head_pattern

    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    path.mkdir()
    CONFIG.save_json(path / "config.json")
    params = init_params(CONFIG, jax.random.key(0), scale=0.1)
    save_params(path / "params", jax.tree.map(np.asarray, params))
    (path / "convert_info.json").write_text(json.dumps(
        {"format": CHECKPOINT_FORMAT, "source_kind": "random", "dtype": "float32"}))
    pattern = path / "full_attention_heads.tsv"
    write_head_pattern(pattern, [[0.1, 0.9], [0.9, 0.1]])
    return path, pattern


def _greedy(ckpt, impl, attention, **knobs):
    from lserve_jax import LLM, SamplingParams

    llm = LLM(str(ckpt), impl=impl, attention=attention, **knobs)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in (300, 200)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0,
                                                ignore_eos=True))
    return llm, [o.token_ids for o in outs]


@pytest.mark.parametrize("attention", ["dense", "lserve"])
def test_pallas_greedy_tokens_equal_xla(checkpoint, attention):
    ckpt, pattern = checkpoint
    knobs = dict(KNOBS, head_pattern=str(pattern)) if attention == "lserve" else {}
    llm, expected = _greedy(ckpt, "xla", attention, **knobs)
    if attention == "lserve":  # the pattern is in use and the selector has a choice to make
        assert llm.attention.has_streaming
        assert 300 // KNOBS["page_size"] > llm.sparsity.budget_pages
    _, got = _greedy(ckpt, "pallas", attention, **knobs)
    assert all(len(ids) == NEW_TOKENS for ids in expected)
    assert got == expected


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "int4"])
def test_pallas_reads_quantized_pages(checkpoint, kv_cache_dtype):
    """LServe on an int8 / int4 KV cache: the decode kernel, dequantizing pages in registers,
    generates the XLA path's greedy tokens (which dequantizes after its gather)."""
    ckpt, pattern = checkpoint
    knobs = dict(KNOBS, head_pattern=str(pattern), kv_cache_dtype=kv_cache_dtype)
    llm, expected = _greedy(ckpt, "xla", "lserve", **knobs)
    assert llm.engine.cache.kv_cache_dtype == kv_cache_dtype
    _, got = _greedy(ckpt, "pallas", "lserve", **knobs)
    assert got == expected
