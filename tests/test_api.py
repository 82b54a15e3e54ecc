"""Python API and CLI: behaviour on a tiny converted checkpoint, and every error path."""

import pytest

from conftest import convert_tiny_llama
from lserve_jax import LLM, SamplingParams
from lserve_jax.generate import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random Llama converted from an HF directory without tokenizer files."""
    return convert_tiny_llama(tmp_path_factory)


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(str(ckpt))


def test_generate_token_ids_per_prompt_params(llm):
    greedy = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    short = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    a, b = llm.generate([[5, 6, 7], [9, 10]], [greedy, short])
    assert len(a.token_ids) == 5 and len(b.token_ids) == 2
    assert a.prompt_token_ids == [5, 6, 7] and a.text is None
    assert a.finish_reason == b.finish_reason == "length"
    again, _ = llm.generate([[5, 6, 7], [11, 12, 13, 14]], [greedy, short])
    assert again.token_ids == a.token_ids
    assert llm.stats.compile_s == 0.0  # same batch and shape buckets: no new compile


def test_generation_stops_when_context_is_full(llm):
    [out] = llm.generate([list(range(3, 93))], SamplingParams(max_tokens=50, temperature=0.0,
                                                               ignore_eos=True))
    assert len(out.token_ids) == 96 - 90 and out.finish_reason == "length"


@pytest.mark.parametrize("prompts, sampling, error, match", [
    ([[1] * 96], None, ValueError, "context"),
    ([[]], None, ValueError, "empty"),
    ([[5, 500]], None, ValueError, "vocabulary"),
    (["text"], None, ValueError, "tokenizer"),
    ([], None, ValueError, "empty"),
    ([[5], [6]], [SamplingParams()], ValueError, "sampling_params"),
])
def test_generate_errors(llm, prompts, sampling, error, match):
    with pytest.raises(error, match=match):
        llm.generate(prompts, sampling)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(attention="sparse"), ValueError, "attention"),
    (dict(dtype="int8"), ValueError, "dtype"),
    (dict(token_budget=100), ValueError, "token_budget"),
    (dict(page_size=48), ValueError, "page_size"),
    (dict(logical_page_size=5), ValueError, "logical_page_size"),
    (dict(static_sparsity=1.5), ValueError, "static_sparsity"),
    (dict(dec_local_tokens=100), ValueError, "dec_local_tokens"),
    (dict(selector_interval=0), ValueError, "selector_interval"),
    (dict(head_pattern="/nonexistent.tsv"), FileNotFoundError, "head_pattern"),
    (dict(tokens_budget=64), TypeError, "unknown"),
])
def test_llm_argument_errors(ckpt, kwargs, error, match):
    with pytest.raises(error, match=match):
        LLM(str(ckpt), **kwargs)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(str(tmp_path / "nope"))


@pytest.mark.parametrize("argv, match", [
    (["--ckpt", "/nonexistent/ckpt", "--prompt", "hi"], "does not exist"),
    (["--prompt", "hi", "--temperature", "-1"], "temperature"),
    (["--prompt", "hi", "--top-p", "0"], "top_p"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "max_tokens"),
    (["--prompt", "hi", "--token-budget", "100"], "token_budget"),
])
def test_cli_errors(argv, match, capsys):
    assert main(argv) == 2
    assert match in capsys.readouterr().err


def test_cli_needs_a_prompt_and_valid_choices(capsys):
    for argv in ([], ["--prompt", "x", "--attention", "quest"], ["--prompt", "x", "--chat", "y"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2


def test_cli_without_tokenizer_is_a_clear_error(ckpt, capsys):
    assert main(["--ckpt", str(ckpt), "--prompt", "hello"]) == 2
    assert "tokenizer" in capsys.readouterr().err


def test_lserve_without_pattern_on_other_checkpoints_keeps_every_head_dense(ckpt):
    llm = LLM(str(ckpt), attention="lserve", token_budget=192)
    assert llm.head_pattern is None and not llm.attention.has_streaming


COMPILE_CHILD = r"""
import json, sys
import jax
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
from lserve_jax import LLM, SamplingParams
llm = LLM(sys.argv[1])
[out] = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
print(json.dumps({"cache": str(llm.compilation_cache), "ids": out.token_ids,
                  "dir": jax.config.jax_compilation_cache_dir}))
"""


def _child(ckpt, env_value, tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, LSERVE_JAX_COMPILATION_CACHE=env_value, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", COMPILE_CHILD, str(ckpt)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_persistent_compilation_cache(ckpt, tmp_path):
    """Compiled programs are written to the compilation cache, and a second process that loads
    them generates the same tokens; "0" turns the cache off."""
    cache = tmp_path / "xla"
    first = _child(ckpt, str(cache), tmp_path)
    assert first["cache"] == first["dir"] == str(cache)
    entries = sorted(p.name for p in cache.iterdir())
    assert entries, "nothing was written to the compilation cache"
    second = _child(ckpt, str(cache), tmp_path)
    assert second["ids"] == first["ids"]
    off = _child(ckpt, "0", tmp_path)
    assert off["cache"] == "None" and off["dir"] is None and off["ids"] == first["ids"]
