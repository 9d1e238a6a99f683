"""The HTTP wire format of `lorakit serve`: OpenAI-compatible request and response models.

Owns every JSON shape the server reads or writes: the completions and chat requests (with
their checks), the responses and streaming chunks, the model list, vLLM's adapter
load/unload bodies, and OpenAI's error body `{"error": {"message", "type", "param", "code"}}`.
Nothing here touches the model; `app.py` turns these into engine calls.

Requests forbid unknown fields, so a parameter this server does not implement (logprobs,
tools, ...) is refused with a 400 instead of being silently ignored. Booleans and integers are
strict (`"stream": "yes"` or `"max_tokens": "5"` is refused, not guessed at), every string must
be valid Unicode (no lone surrogate), and `seed` must fit in 64 bits.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

# --- errors ----------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered to the client in OpenAI's shape.

    Args:
        status: HTTP status code.
        message: What went wrong and, when possible, what to do about it.
        type: OpenAI's error type: "invalid_request_error", "not_found_error", "server_error", ...
        code: A short machine-readable code, e.g. "model_not_found".
        param: The request field at fault, if any.
        headers: Extra response headers (`Retry-After`, `WWW-Authenticate`, ...).
    """

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- requests --------------------------------------------------------------------------------------

SEED_RANGE = (-(2**63), 2**64 - 1)  # what a torch.Generator accepts; OpenAI's seed is a 64-bit integer


def _unicode_text(text: str) -> str:
    """Refuse a string holding a lone surrogate (JSON allows "\\ud800"; no tokenizer can encode it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"contains a lone surrogate ({text[err.start]!r} at character {err.start}): "
                         "not valid Unicode text") from None
    return text


Text = Annotated[str, AfterValidator(_unicode_text)]
"""A string that is valid Unicode (encodable as UTF-8)."""



class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False


class _SamplingFields(BaseModel):
    """Fields shared by completions and chat requests, with OpenAI's defaults and ranges."""

    model_config = ConfigDict(extra="forbid")

    model: Text
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = None
    seed: StrictInt | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    # Accepted only at their neutral value, so clients that always send them keep working.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported: send one request per completion")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        strings = [stop] if isinstance(stop, str) else stop or []
        if len(strings) > 4:
            raise ValueError("at most 4 stop strings")
        if any(s == "" for s in strings):
            raise ValueError("stop strings must not be empty")
        return stop

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0.0:
            raise ValueError("penalties are not supported; leave it at 0")
        return value

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    """POST /v1/completions. `prompt`: a string, a list with one string, or a list of token ids."""

    prompt: Text | list[Text] | list[StrictInt]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str] | list[int]) -> str | list[str] | list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str) and len(prompt) != 1:
            raise ValueError("one prompt per request: send a string, not a list of several")
        if len(prompt) == 0:
            raise ValueError("the prompt is empty")
        return prompt


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: Text | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions: messages rendered with the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)


class LoadAdapterRequest(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's body)."""

    model_config = ConfigDict(extra="forbid")

    lora_name: Text
    lora_path: Text


class UnloadAdapterRequest(BaseModel):
    """POST /v1/unload_lora_adapter (vLLM's body; `lora_int_id` is accepted and ignored)."""

    model_config = ConfigDict(extra="forbid")

    lora_name: Text
    lora_int_id: StrictInt | None = None


# --- responses -------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


FinishReason = Literal["stop", "length"]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(BaseModel):
    """A whole completion, or (object "text_completion" too) one streamed chunk of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """One entry of GET /v1/models; `parent` is the base model for an adapter, None for the base."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lorakit"
    root: str
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
