"""The OpenAI request bodies the server accepts (pydantic), and their translation to the
engine's `SamplingParams`.

Unknown fields are ignored, as OpenAI's API does. A field of the wrong type is a validation
error (HTTP 400 naming the field); a value out of range is refused by `SamplingParams` itself,
so the server and the offline API check sampling settings with the same code.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from lserve_jax.sampling import MAX_LOGPROBS, SamplingParams

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for the legacy completions `logprobs`


class ApiError(Exception):
    """An error the API answers with `status` and an OpenAI error body."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.type, self.code = (
            message, status, param, type_, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    """The sampling fields common to both endpoints (OpenAI's and vLLM's extra ones)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: StrictInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: StrictInt | None = None
    min_p: float | None = None
    n: StrictInt = 1
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[StrictInt] | None = None
    seed: StrictInt | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = 0
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def sampling(self, *, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """The request's SamplingParams (OpenAI's defaults: temperature 1, top_p 1). Raises
        ApiError naming the field when a value is out of range."""
        if self.stream_options is not None and not self.stream:
            raise ApiError("stream_options is only allowed with stream=true",
                           param="stream_options")
        values = dict(
            n=self.n, max_tokens=max_tokens, min_tokens=self.min_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=(1.0 if self.repetition_penalty is None
                                else self.repetition_penalty),
            seed=self.seed, stop=self.stop, stop_token_ids=tuple(self.stop_token_ids or ()),
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens)
        try:
            return SamplingParams(**values)
        except (ValueError, TypeError) as e:
            raise ApiError(str(e), param=_param_of(str(e), values)) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _param_of(message: str, values: dict) -> str | None:
    """The field an error message from SamplingParams is about (its messages start with it)."""
    head = message.split("=", 1)[0].split("[", 1)[0].split(" ", 1)[0]
    return head if head in values else None


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: Union[str, list[str], list[StrictInt], list[list[StrictInt]]]
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    suffix: str | None = None
    best_of: StrictInt | None = None

    def prompts(self) -> list:
        """The request's prompts: strings and/or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ApiError("prompt is empty", param="prompt")
        if all(isinstance(t, int) for t in p):
            return [p]
        return list(p)

    def to_sampling(self) -> SamplingParams:
        if self.suffix is not None:
            raise ApiError("suffix is not supported", param="suffix")
        if self.best_of not in (None, self.n):
            raise ApiError("best_of other than n is not supported", param="best_of")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise ApiError(f"logprobs={self.logprobs} must be in [0, "
                           f"{MAX_COMPLETION_LOGPROBS}]", param="logprobs")
        if self.echo and self.logprobs is not None:
            raise ApiError("echo with logprobs is not supported (prompt log-probabilities are "
                           "not computed)", param="echo")
        return self.sampling(max_tokens=self.max_tokens, logprobs=self.logprobs)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None

    def conversation(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def to_sampling(self) -> SamplingParams:
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise ApiError("top_logprobs needs logprobs=true", param="top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise ApiError(f"top_logprobs={self.top_logprobs} must be in [0, "
                               f"{MAX_LOGPROBS}]", param="top_logprobs")
        limit = (self.max_completion_tokens if self.max_completion_tokens is not None
                 else self.max_tokens)
        return self.sampling(max_tokens=limit,
                             logprobs=(self.top_logprobs or 0) if self.logprobs else None)
