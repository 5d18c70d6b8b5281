"""The OpenAI request bodies the server accepts, their checks, and OpenAI's error JSON.

Every field of OpenAI's completions and chat-completions requests is accepted; one the engine
cannot honour with the value given (``n`` > 1, penalties, ``logit_bias``, tools, ...) is a 400
naming it, and so is a field OpenAI does not have. vLLM's sampling extensions that the engine
has (``top_k``, ``ignore_eos``, ``stop_token_ids``, ``skip_special_tokens``,
``include_stop_str_in_output``) are accepted too.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..runtime.sampling_params import MAX_LOGPROBS, SamplingParams


class RequestError(Exception):
    """A request the server answers with an OpenAI error instead of a result."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code

    def body(self) -> dict:
        kind = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                503: "service_unavailable"}.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


# OpenAI fields that say nothing about the text generated here: accepted and ignored
IGNORED = ("user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
           "prompt_cache_retention", "prompt_cache_options", "reasoning_effort", "verbosity")
# OpenAI fields for what this server does not do: a 400 naming them when set
UNSUPPORTED = ("functions", "function_call", "audio", "prediction", "web_search_options", "moderation")


class _Sampling(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_ignored(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in UNSUPPORTED:
                if data.get(name) not in (None, [], {}):
                    raise RequestError(f"{name} is not supported", param=name)
            if data.get("modalities") not in (None, ["text"]):
                raise RequestError("modalities: only ['text'] is supported", param="modalities")
            data = {k: v for k, v in data.items() if k not in IGNORED + UNSUPPORTED + ("modalities",)}
        return data

    model: str
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = 1
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    # vLLM's extensions the engine has
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def check_supported(self) -> None:
        if self.n != 1:
            raise RequestError(f"n={self.n}: only n=1 is supported", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise RequestError(f"{name} is not supported (only 0)", param=name)
        if self.logit_bias:
            raise RequestError("logit_bias is not supported", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed with stream=true", param="stream_options")

    def sampling_params(self, max_tokens: int, logprobs: Optional[int]) -> SamplingParams:
        kwargs: dict[str, Any] = dict(
            max_tokens=max_tokens, stop=self.stop, ignore_eos=self.ignore_eos,
            stop_token_ids=list(self.stop_token_ids or []), skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )
        for name in ("temperature", "top_p", "top_k", "seed"):  # unset: SamplingParams' default (as OpenAI's)
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        if logprobs is not None:
            if not 0 <= logprobs <= MAX_LOGPROBS:
                raise RequestError(f"logprobs must be within [0, {MAX_LOGPROBS}], got {logprobs}", param="logprobs")
            kwargs["logprobs"] = logprobs
        try:
            return SamplingParams(**kwargs)
        except ValueError as e:  # SamplingParams names the field first: "temperature must be ..."
            message = str(e)
            field = message.split()[0] if message else None
            raise RequestError(message, param=field if field in kwargs else None) from None


class CompletionRequest(_Sampling):
    # token ids first: a long id prompt validates in one pass (the smart union tries every member)
    prompt: Union[list[int], str, list[str], list[list[int]]] = Field(union_mode="left_to_right")
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise RequestError("echo is not supported", param="echo")
        if self.best_of not in (None, 1):
            raise RequestError(f"best_of={self.best_of}: only 1 is supported", param="best_of")
        if self.suffix:
            raise RequestError("suffix is not supported", param="suffix")

    def prompts(self) -> list[Union[str, list[int]]]:
        """One prompt or several (a list of strings or of token-id lists): one choice each."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise RequestError("prompt must not be empty", param="prompt")
        return list(p)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: passed to the chat template
    role: str
    content: Union[str, list[TextPart], None] = None

    def plain(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {**(self.model_extra or {}), "role": self.role, "content": content or ""}


class ResponseFormat(BaseModel):
    type: str


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = None  # None: up to max_seq_len
    max_completion_tokens: Optional[int] = None  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[dict]] = None
    tool_choice: Optional[Union[str, dict]] = None
    parallel_tool_calls: Optional[bool] = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise RequestError("tools are not supported", param="tools")
        if self.tool_choice not in (None, "none"):
            raise RequestError("tool_choice is not supported", param="tool_choice")
        if self.response_format is not None and self.response_format.type != "text":
            raise RequestError(f"response_format {self.response_format.type!r} is not supported (only 'text')",
                               param="response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs=true", param="top_logprobs")

    def requested_logprobs(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def validation_error(errors: list[dict]) -> RequestError:
    """pydantic's first error as a 400 naming the field (``messages.0.content``)."""
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    kind, msg = first.get("type"), first.get("msg", "invalid request")
    if kind == "extra_forbidden":
        return RequestError(f"Unrecognized request argument supplied: {param}", param=param)
    if kind == "missing":
        return RequestError(f"{param} is required", param=param)
    if kind == "json_invalid":
        return RequestError(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', msg)}")
    return RequestError(f"{param}: {msg}" if param else msg, param=param)
