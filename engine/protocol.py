"""The OpenAI/vLLM wire shapes of ``kvmesh-serve`` as pydantic models (as vLLM's
``entrypoints/openai/protocol.py``): requests are validated strictly (``"10"`` is not a number,
``true`` is not 1) so that bad input is a 400 that names the field, never a 500.

Fields the OpenAI API has and this engine does not implement are accepted at their neutral value
and refused otherwise, with a message that says so; unknown fields are ignored (clients send
``user``, ``metadata`` and the like).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_N = 16  # choices per request: each one decodes in turn on the one model thread
MAX_LOGPROBS = 20  # vLLM's default max_logprobs
MAX_STOPS = 16
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range
MIN_SEED = -(2**63)


class _Request(BaseModel):
    """Strict types; unknown fields are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- errors ---


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(_Response):
    """Every error answer: ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's and vLLM's)."""

    error: ErrorInfo


# --- sampling fields shared by completions and chat ---


class SamplingFields(_Request):
    model: str | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=-1)
    seed: int | None = Field(default=None, ge=MIN_SEED, le=MAX_SEED)
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("top_k must be -1 (disabled) or an integer >= 1")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOPS:
            raise ValueError(f"stop takes at most {MAX_STOPS} strings, got {len(value)}")
        return value

    @model_validator(mode="after")
    def _unsupported(self) -> SamplingFields:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ValueError(f"{name} is not supported by this engine (leave it out or send 0)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this engine (leave it out or send {})")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return tuple(s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s)


class StreamOptions(_Request):
    include_usage: bool = False


# --- /v1/completions ---


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: one prompt (text, token ids, or a list holding one of those)."""

    prompt: Any = Field(default=None, validate_default=True)
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> str | list[int]:
        # A list of one prompt is one prompt; batches of prompts are not served (send one per request).
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
            value = value[0]
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return value
        if value is None:
            raise ValueError("prompt is required")
        if isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
            raise ValueError("prompt must be one prompt: batches are not served, send one request per prompt")
        raise ValueError("prompt must be a string, a list of token ids (integers), or a list of one of those")

    @model_validator(mode="after")
    def _completion_only(self) -> CompletionRequest:
        if self.best_of not in (None, self.n):
            raise ValueError(f"best_of must equal n ({self.n}) or be left out: this engine returns every choice")
        if self.echo:
            raise ValueError("echo is not supported by this engine")
        if self.suffix:
            raise ValueError("suffix is not supported by this engine")
        return self


# --- /v1/chat/completions ---


class ChatMessage(_Request):
    """One message; ``content`` is a string or a list of text parts (``{"type": "text", "text": ...}``)."""

    model_config = ConfigDict(strict=True, extra="allow")  # name, tool_call_id, ... go to the template

    role: str = Field(min_length=1)
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, value: str | list[dict[str, Any]] | None) -> str | None:
        if not isinstance(value, list):
            return value
        texts: list[str] = []
        for part in value:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content parts must be {{\"type\": \"text\", \"text\": \"...\"}} (this model reads "
                                 f"text only), got a part of type {part.get('type')!r}")
            texts.append(part["text"])
        return "\n".join(texts)

    def for_template(self) -> dict[str, Any]:
        return {**(self.model_extra or {}), "role": self.role, "content": self.content or ""}


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``: messages through the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _chat_only(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tools:
            raise ValueError("tools are not supported by this engine's chat template")
        if self.tool_choice not in (None, "none"):
            raise ValueError("tool_choice is not supported by this engine (leave it out or send \"none\")")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise ValueError("response_format must be {\"type\": \"text\"}: structured output is not supported")
        return self

    def output_limit(self) -> int | None:
        """``max_completion_tokens`` (OpenAI's current name) else ``max_tokens``; None: up to the context."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def top_logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# --- /tokenize and /detokenize (vLLM's) ---


class TokenizeRequest(_Request):
    """vLLM's ``/tokenize``: a ``prompt``, or chat ``messages`` through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either prompt (a string) or messages (a list of {role, content}), not both")
        return self


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(_Response):
    prompt: str


# --- answers ---


class PromptTokensDetails(_Response):
    cached_tokens: int


class UsageInfo(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogProbs(_Response):
    """The legacy completions shape."""

    text_offset: list[int]
    token_logprobs: list[float]
    tokens: list[str]
    top_logprobs: list[dict[str, float]]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: str | None = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogProbs(_Response):
    content: list[ChatTokenLogprob]


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: str | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str
    parent: str | None = None
    max_model_len: int


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


SamplingFields.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()
