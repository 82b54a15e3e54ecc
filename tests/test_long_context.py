"""Long-context checks left out of the default suite (`make test-slow`)."""

import pytest

from lserve_jax import LLM, SamplingParams
from test_smollm2 import passkey_prompt

pytestmark = pytest.mark.slow


def test_smollm2_passkey_at_6k_tokens():
    """Dense retrieval near SmolLM2's context limit, prompt bucketed to 6,144 tokens."""
    llm = LLM()
    prompts = [passkey_prompt(250, 51973, 0.25), passkey_prompt(250, 80214, 0.75)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0))
    assert all(5500 < len(o.prompt_token_ids) <= 6144 for o in outs)
    assert "51973" in outs[0].text and "80214" in outs[1].text
