"""What the engine hands back: `RequestOutput` with one `CompletionOutput` per completion
(vLLM's shape), per-token `Logprob`s and per-request `RequestMetrics`. Plain dataclasses, no
JAX."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable


@dataclasses.dataclass
class RequestMetrics:
    """Timings (time.perf_counter seconds) and counts of one request (all its completions)."""

    arrival_time: float
    num_prompt_tokens: int
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_generated_tokens: int = 0
    num_prefix_hit_tokens: int = 0
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        """Time to first token, from arrival."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.finished_time is None or self.first_token_time is None:
            return None
        if self.num_generated_tokens < 2:
            return None
        return (self.finished_time - self.first_token_time) / (self.num_generated_tokens - 1)

    @property
    def latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclasses.dataclass(frozen=True)
class Logprob:
    """A token's log-probability under the model's raw logits, its rank (1: the most likely)
    and its text."""

    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclasses.dataclass
class CompletionOutput:
    """One completion of a request, as of the last step.

    token_ids: every generated id so far (a stop token included); text: the text released
    so far (a completion with stop strings holds back the last few characters until they
    cannot start a stop string, and its final text is cut before the stop string);
    new_token_ids / new_text: what the last step added. finish_reason: "stop" (a stop token,
    EOS or a stop string; `stop_reason` names the stop string or the stop token id, None for
    EOS), "length" (max_tokens or the context is full), "abort", or "error" (`error` says why);
    None while it runs. logprobs (when asked for): one dict per generated token, token id ->
    Logprob, holding the generated token and the most likely ones.
    """

    index: int
    text: str | None
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    new_token_ids: list[int] = dataclasses.field(default_factory=list)
    new_text: str = ""
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    """A request's state after a step (and its result, once `finished`): its prompt, and
    `outputs`, one CompletionOutput per completion (`SamplingParams.n`), each with what the
    step added. `finished` once every completion has. The attributes token_ids, text,
    finish_reason, error, new_token_ids and new_text are those of the first completion."""

    request_id: Hashable
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None

    token_ids = property(lambda self: self.outputs[0].token_ids)
    text = property(lambda self: self.outputs[0].text)
    finish_reason = property(lambda self: self.outputs[0].finish_reason)
    error = property(lambda self: self.outputs[0].error)
    new_token_ids = property(lambda self: self.outputs[0].new_token_ids)
    new_text = property(lambda self: self.outputs[0].new_text)
