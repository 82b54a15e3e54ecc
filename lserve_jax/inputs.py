"""Checks of everything a user hands to generation, in one place.

`LLM`, `SamplingParams` and the command line call these functions (and every new entry point
must), so a bad prompt, seed or stop id fails the same way, with the same message, wherever it
comes from. Knobs are checked by `SparsityConfig`, head-pattern files by `head_pattern`. They raise ValueError
(TypeError for a value of the wrong kind) naming the offending value; none of them touches a
device array.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral

import numpy as np

SEED_LIMIT = 2**63  # seeds are in [0, 2**63): a non-negative int64, as numpy and torch take them
STOP_ID_WIDTHS = (8, 16, 32, 64, 128, 256)  # padded stop-id columns: few compiled shapes
MAX_N = 128  # completions per request (OpenAI's limit for `n`)


def is_int(value) -> bool:
    """A Python or NumPy integer that is not a bool."""
    return isinstance(value, Integral) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value, *, minimum: int | None = None,
              maximum: int | None = None) -> int:
    """`value` as a plain int, if it is an integer in [minimum, maximum]."""
    if not is_int(value):
        raise TypeError(f"{name}={value!r} must be an int")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}={value} must be <= {maximum}")
    return value


def check_float(name: str, value, *, minimum: float | None = None, above: float | None = None,
                maximum: float | None = None) -> float:
    """`value` as a finite float (ints accepted) in the given range."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise TypeError(f"{name}={value!r} must be a number")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be finite")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value!r} must be >= {minimum}")
    if above is not None and value <= above:
        raise ValueError(f"{name}={value!r} must be > {above}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}={value!r} must be <= {maximum}")
    return value


def check_seed(seed) -> int:
    """A seed in [0, 2**63), as an int."""
    return check_int("seed", seed, minimum=0, maximum=SEED_LIMIT - 1)


def seed_key(seed: int) -> np.ndarray:
    """The raw PRNG key (uint32 [2], JAX's threefry layout) of a seed in [0, 2**63).

    Built from all 64 bits, high word first: the same key `jax.random.PRNGKey(seed)` gives for
    seeds below 2**31, and distinct keys above, where `PRNGKey` (without 64-bit mode) would
    truncate the seed to 32 bits and so give seed 2**32 the key of seed 0.
    """
    seed = check_seed(seed)
    return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


def check_stop_strings(stop) -> tuple[str, ...]:
    """Stop strings as a tuple: None, one string or a sequence of non-empty strings."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if isinstance(stop, (bytes, dict)) or not isinstance(stop, (Sequence, np.ndarray)):
        raise TypeError(f"stop={stop!r} must be a string or a list of strings")
    out = []
    for i, text in enumerate(stop):
        if not isinstance(text, str):
            raise TypeError(f"stop[{i}]={text!r} is not a string")
        if not text:
            raise ValueError(f"stop[{i}] is an empty string")
        out.append(text)
    return tuple(out)


CHAT_ROLES = ("system", "user", "assistant", "developer", "tool")


def check_messages(messages, name: str = "messages") -> list[dict]:
    """A conversation: a non-empty list of {"role": one of CHAT_ROLES, "content": str} dicts
    (other keys are kept for the template)."""
    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, Sequence):
        raise TypeError(f"{name} must be a list of {{'role', 'content'}} dicts")
    if not messages:
        raise ValueError(f"{name} is empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TypeError(f"{name}[{i}] must be a dict with 'role' and 'content'")
        if m.get("role") not in CHAT_ROLES:
            raise ValueError(f"{name}[{i}].role={m.get('role')!r} must be one of {CHAT_ROLES}")
        if not isinstance(m.get("content"), str):
            raise TypeError(f"{name}[{i}].content must be a string")
        out.append(dict(m))
    return out


def normalize_conversations(messages) -> list[list[dict]]:
    """One conversation (a list of message dicts) or a list of them, as a list of them."""
    if isinstance(messages, Sequence) and messages and all(
            isinstance(m, Sequence) and not isinstance(m, (str, bytes, dict)) for m in messages):
        return [check_messages(c, f"conversation {i}") for i, c in enumerate(messages)]
    return [check_messages(messages)]


def check_stream_interval(value) -> int:
    """Decode steps between streaming callbacks: an int >= 1."""
    return check_int("stream_interval", value, minimum=1)


def check_token_ids(name: str, ids, vocab_size: int | None = None) -> list[int]:
    """A sequence of token ids as plain ints, each an int (not a float, string or bool) in
    [0, vocab_size) when vocab_size is given."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, np.ndarray)):
        raise TypeError(f"{name} must be a list of token ids, got {type(ids).__name__}")
    out = []
    for i, t in enumerate(ids):
        if not is_int(t):
            raise TypeError(f"{name}[{i}]={t!r} is not an int token id")
        out.append(int(t))
    if vocab_size is not None:
        bad = [t for t in out if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{name}: token ids {bad[:5]} are outside the vocabulary "
                             f"[0, {vocab_size})")
    return out


def is_token_ids(prompt) -> bool:
    """A flat sequence of integers (one prompt given as ids)."""
    if isinstance(prompt, np.ndarray):
        return prompt.ndim == 1 and np.issubdtype(prompt.dtype, np.integer)
    return (isinstance(prompt, Sequence) and not isinstance(prompt, (str, bytes))
            and len(prompt) > 0 and all(is_int(t) for t in prompt))


def normalize_prompts(prompts) -> list:
    """Prompts as a list of strings and/or token-id lists.

    A single string, or a single flat list of ids (as vLLM takes `generate([1, 2, 3])`), is one
    prompt; anything else must be a non-empty sequence of such prompts.
    """
    if isinstance(prompts, str) or is_token_ids(prompts):
        return [prompts]
    if isinstance(prompts, (bytes, dict)) or not isinstance(prompts, (Sequence, np.ndarray)):
        raise TypeError(f"prompts must be a string, a list of token ids or a list of those, "
                        f"got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty")
    return prompts


def check_prompt_ids(ids: list[int], *, vocab_size: int, context: int, index: int = 0,
                     name: str | None = None) -> list[int]:
    """One prompt's ids: non-empty, in the vocabulary, leaving room for one new token. Errors
    name it `name` (default "prompt {index}")."""
    name = f"prompt {index}" if name is None else name
    ids = check_token_ids(name, ids, vocab_size)
    if not ids:
        raise ValueError(f"{name} is empty")
    if len(ids) >= context:
        raise ValueError(f"{name} has {len(ids)} tokens; the model's context is {context} "
                         "(needs room for >= 1 new token)")
    return ids


def stop_id_width(num_ids: int) -> int:
    """Columns of the padded stop-id array for a request with `num_ids` stop ids: the smallest
    of `STOP_ID_WIDTHS` that holds them, so adding a stop id rarely changes a compiled shape."""
    for width in STOP_ID_WIDTHS:
        if num_ids <= width:
            return width
    raise ValueError(f"{num_ids} stop token ids; at most {STOP_ID_WIDTHS[-1]} are supported")
