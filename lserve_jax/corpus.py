"""Offline text for calibration and evaluation: public-domain book excerpts and passkey prompts.

`lserve_jax/data/` holds ~140K-character excerpts of four Project Gutenberg novels (see its
README). Calibration and head profiling read `CALIBRATION_BOOKS`, evaluation reads `EVAL_BOOKS`,
so the gates are never fitted on the text they are judged on.

Prompts are built as token ids (pieces tokenized separately, then joined), so a prompt has
exactly the requested length whatever the tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).parent / "data"
CALIBRATION_BOOKS = ("frankenstein", "moby_dick")
EVAL_BOOKS = ("pride_and_prejudice", "room_with_a_view")
HAYSTACKS = ("filler", "book")

# The classic passkey filler (Mohtashami & Jaggi 2023): repetitive, so retrieval is the only
# information in the prompt. SmolLM2 retrieves reliably from it in plain-completion form.
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_INTRO = ("There is important info hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. ")


def book_names() -> tuple[str, ...]:
    return tuple(sorted(p.name.removesuffix(".txt.gz") for p in DATA_DIR.glob("*.txt.gz")))


@functools.cache
def load_book(name: str) -> str:
    """The excerpt of one book: paragraphs separated by blank lines."""
    path = DATA_DIR / f"{name}.txt.gz"
    if not path.is_file():
        raise ValueError(f"unknown book {name!r}; available: {book_names()}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read()


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a piece of a prompt (no BOS)."""
    return tokenizer.encode(text, add_special_tokens=False)


@functools.lru_cache(maxsize=16)
def book_ids(tokenizer, name: str) -> np.ndarray:
    """The whole excerpt as token ids, int32 (about 32K tokens with SmolLM2's tokenizer).

    Tokenized once per (tokenizer, book): calibration samples and every evaluation window slice
    the same read-only array.
    """
    ids = np.asarray(text_ids(tokenizer, load_book(name)), np.int32)
    ids.flags.writeable = False
    return ids


def _haystack(tokenizer, haystack: str, num_tokens: int, offset: int = 0) -> list[int]:
    """`num_tokens` ids of filler text: the repeated FILLER sentences, or a book's text starting
    `offset` tokens into `EVAL_BOOKS[0]`."""
    if num_tokens <= 0:
        return []
    if haystack == "filler":
        unit = text_ids(tokenizer, FILLER)
        reps = -(-num_tokens // len(unit))
        return (unit * reps)[:num_tokens]
    if haystack == "book":
        ids = book_ids(tokenizer, EVAL_BOOKS[0])
        if offset + num_tokens > len(ids):
            raise ValueError(f"book haystack has {len(ids)} tokens; {offset + num_tokens} needed")
        return ids[offset:offset + num_tokens].tolist()
    raise ValueError(f"haystack={haystack!r} must be one of {HAYSTACKS}")


def bos(tokenizer) -> list[int]:
    """[BOS] if the tokenizer adds one to a prompt, else []."""
    ids = tokenizer.encode("a")
    return ids[:1] if ids and ids[0] == tokenizer.bos_token_id else []


@dataclasses.dataclass(frozen=True)
class PasskeyPrompt:
    ids: list[int]
    passkey: str
    depth: float
    needle_position: int  # token index where the needle starts


def passkey_prompt(tokenizer, *, length: int, depth: float, passkey: str,
                   haystack: str = "filler") -> PasskeyPrompt:
    """A plain-completion passkey prompt of exactly `length` tokens, needle at `depth` in [0, 1]
    of the haystack, ending in "... The pass key is" so the next tokens are the key."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    head = bos(tokenizer) + text_ids(tokenizer, PASSKEY_INTRO)
    needle = text_ids(tokenizer, f" The pass key is {passkey}. Remember it. "
                                 f"{passkey} is the pass key. ")
    question = text_ids(tokenizer, " What is the pass key? The pass key is")
    fill = length - len(head) - len(needle) - len(question)
    if fill < 0:
        raise ValueError(f"length={length} is too short for a passkey prompt "
                         f"(needs > {length - fill} tokens)")
    hay = _haystack(tokenizer, haystack, fill)
    before = int(round(fill * depth))
    ids = head + hay[:before] + needle + hay[before:] + question
    return PasskeyPrompt(ids=ids, passkey=passkey, depth=depth,
                         needle_position=len(head) + before)


def passkey_found(text: str, passkey: str) -> bool:
    """A hit: the generated text's first run of digits is the passkey."""
    digits = ""
    for ch in text:
        if ch.isdigit():
            digits += ch
        elif digits:
            break
    return digits == passkey


@dataclasses.dataclass(frozen=True)
class CalibrationSample:
    ids: np.ndarray  # [T] int32: prompt followed by its answer
    answer_mask: np.ndarray  # [T] bool: the answer span (where the distillation loss applies)


def multi_passkey_sample(tokenizer, rng: np.random.Generator, *, length: int, num_passkeys: int,
                         books: tuple[str, ...] = CALIBRATION_BOOKS) -> CalibrationSample:
    """DuoAttention's synthetic retrieval sample (arXiv 2410.10819) built from offline text.

    A window of a calibration book with `num_passkeys` needles ("The pass key number 3 is
    48213.") at random depths, then a question and the answer listing every key in order. The
    whole sample is `length` tokens; `answer_mask` marks the answer tokens.
    """
    if num_passkeys < 1:
        raise ValueError(f"num_passkeys={num_passkeys} must be >= 1")
    keys = [str(k) for k in rng.integers(10_000, 100_000, size=num_passkeys)]
    needles = [text_ids(tokenizer, f" The pass key number {i + 1} is {key}. Remember it. ")
               for i, key in enumerate(keys)]
    head = bos(tokenizer) + text_ids(tokenizer, PASSKEY_INTRO)
    question = text_ids(tokenizer, " List all the pass keys in order. The pass keys are")
    answer = text_ids(tokenizer, " " + ", ".join(keys) + ".")
    fill = length - len(head) - sum(map(len, needles)) - len(question) - len(answer)
    if fill < num_passkeys:
        raise ValueError(f"length={length} is too short for {num_passkeys} passkeys")
    book = book_ids(tokenizer, books[int(rng.integers(len(books)))])
    start = int(rng.integers(0, len(book) - fill))
    hay = book[start:start + fill].tolist()
    cuts = np.sort(rng.choice(np.arange(1, fill), size=num_passkeys, replace=False))
    ids, prev = list(head), 0
    for cut, needle in zip(cuts, needles):
        ids += hay[prev:cut] + needle
        prev = int(cut)
    ids += hay[prev:] + question
    mask = np.zeros(length, bool)
    mask[len(ids):] = True
    ids += answer
    assert len(ids) == length
    return CalibrationSample(ids=np.asarray(ids, np.int32), answer_mask=mask)
