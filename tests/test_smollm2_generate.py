"""The embedded SmolLM2-135M-Instruct: our greedy tokens equal HF transformers' on the same GGUF."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from lserve_jax import LLM, SamplingParams
from lserve_jax.checkpoint import default_gguf

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


@pytest.fixture(scope="module")
def hf_model():
    gguf = default_gguf()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tok


def test_greedy_tokens_equal_hf(llm, hf_model):
    model, tok = hf_model
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0,
                                                ignore_eos=True))
    assert len(outs[2].prompt_token_ids) > 2000
    for prompt, out in zip(PROMPTS, outs):
        ids = tok(prompt, return_tensors="pt").input_ids
        assert out.prompt_token_ids == ids[0].tolist()
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=tok.eos_token_id)
        assert out.token_ids == ref[0, ids.shape[1]:].tolist(), prompt[:40]
    assert "68142" in outs[2].text


def test_chat_answers_paris(llm):
    prompt = llm.chat_prompt("What is the capital of France?")
    [out] = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0))
    assert "Paris" in out.text
    assert out.finish_reason == "stop" and out.token_ids[-1] in llm.config.eos_token_ids


def test_sampling_with_seed_is_reproducible(llm):
    sp = SamplingParams(max_tokens=8, temperature=0.8, top_k=40, top_p=0.9, seed=123)
    a, b = llm.generate(["Once upon a time", "Once upon a time"], [sp, sp])
    assert a.token_ids == b.token_ids
    [c] = llm.generate(["Once upon a time"], SamplingParams(max_tokens=8, temperature=0.8,
                                                             top_k=40, top_p=0.9, seed=124))
    assert len(c.token_ids) == 8


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
