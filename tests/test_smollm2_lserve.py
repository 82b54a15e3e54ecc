"""LServe end to end on the real model (SmolLM2-135M-Instruct): consistency with dense decoding
and the CLI with every LServe knob. Apart from tests/test_smollm2.py so the two long files run on
different test workers."""

import json
import subprocess
import sys

import numpy as np
import pytest

from lserve_jax import LLM, SamplingParams
from lserve_jax.checkpoint import default_gguf
from lserve_jax.head_pattern import write_head_pattern
from test_smollm2 import PROMPTS, NEW_TOKENS, passkey_prompt

try:
    default_gguf()
except FileNotFoundError as e:
    pytest.skip(str(e), allow_module_level=True)

SHORT_PASSKEY = passkey_prompt(45, 51923, 0.3)  # about 850 tokens


@pytest.fixture(scope="module")
def llm():
    return LLM()  # the embedded SmolLM2, f32, dense


@pytest.mark.slow  # the tiny-model form runs by default (tests/test_lserve_decode.py)
def test_lserve_with_covering_budget_and_windows_equals_dense(llm, tmp_path):
    """LServe decode end to end on the real model: half the KV heads streaming (a synthetic
    pattern), prefill windows, decode windows and token budget covering every sequence -> the
    dense tokens, token for token (greedy, f32), on a ragged batch including a passkey prompt."""
    pattern = tmp_path / "full_attention_heads.tsv"
    write_head_pattern(pattern, np.random.RandomState(0).rand(30, 3))
    sp = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    prompts = [PROMPTS[0], SHORT_PASSKEY]
    dense = llm.generate(prompts, sp)
    assert "51923" in dense[1].text
    lserve = LLM(attention="lserve", head_pattern=str(pattern), ctx_local_tokens=1024,
                 dec_sink_tokens=64, dec_local_tokens=1024, token_budget=1024, max_num_seqs=4)
    assert sum(map(sum, lserve.attention.streaming_heads)) == 45
    for a, b in zip(lserve.generate(prompts, sp), dense):
        assert a.token_ids == b.token_ids


@pytest.mark.slow  # the CLI's LServe flags run by default on the tiny model (test_parallel.py)
def test_cli_lserve_small_budget_retrieves_passkey(tmp_path):
    """`--attention lserve` with every knob from the command line: a 256-token budget (4 of the
    prompt's 14 pages) and a 64 + 128 token streaming window on a passkey prompt."""
    pattern = tmp_path / "full_attention_heads.tsv"
    gates = np.ones((30, 3))
    gates[::2, 0] = 0.0  # 15 of 90 KV heads streaming
    write_head_pattern(pattern, gates)
    cmd = [sys.executable, "-m", "lserve_jax.generate", "--prompt", SHORT_PASSKEY,
           "--max-new-tokens", "8", "--json", "--attention", "lserve",
           "--head-pattern", str(pattern), "--static-sparsity", str(15 / 90),
           "--token-budget", "256", "--selector-interval", "4", "--page-selection", "kv_head",
           "--dec-sink-tokens", "64", "--dec-local-tokens", "128", "--ctx-local-tokens", "512",
           "--page-size", "64", "--logical-page-size", "16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert len(result["prompt_token_ids"]) > 800
    assert "51923" in result["text"]


def test_embedded_model_uses_the_shipped_pattern():
    """attention="lserve" without a head_pattern: the embedded model takes its calibrated pattern
    (half of its 90 KV heads streaming at the default static_sparsity 0.5)."""
    from lserve_jax.head_pattern import EMBEDDED_PATTERN, load_head_pattern

    llm = LLM(attention="lserve")
    assert llm.head_pattern == str(EMBEDDED_PATTERN)
    assert load_head_pattern(EMBEDDED_PATTERN).shape == (30, 3)
    assert sum(map(sum, llm.attention.streaming_heads)) == 45
    assert LLM(attention="lserve", static_sparsity=0.0).attention.has_streaming is False
