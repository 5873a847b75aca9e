"""Request bodies of the OpenAI-compatible routes.

OpenAI fields this server does not implement are accepted only at their default value
(``n: 1``, ``presence_penalty: 0``...), and any other value is an error naming the
field, so a client never gets a silently different behaviour. ``user`` is accepted and
ignored, as it only labels the end user. ``rank`` is this server's extension (also
expressible as ``model: "name@rank"``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from server.schemas import SamplingFields, check_prompt_text

OPENAI_COMPLETIONS_DEFAULT_MAX_TOKENS = 16

# Fields of OpenAI's API that take no effect here, with the values that mean "off".
_UNSUPPORTED_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "best_of": (None, 1),
    "echo": (False,),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "metadata": (None, {}),
    "modalities": (None, ["text"]),
    "reasoning_effort": (None,),
    "prediction": (None,),
    "audio": (None,),
    "web_search_options": (None,),
}
_IGNORED = frozenset({"user"})


class OpenAIRequest(SamplingFields):
    model_config = ConfigDict(strict=True, extra="allow")

    model: str = Field(description="an adapter name, or NAME@RANK (RANK an integer or 'auto')")
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)
    stream_options: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_unsupported(self) -> OpenAIRequest:
        for name, value in (self.model_extra or {}).items():
            if name in _IGNORED:
                continue
            if name not in _UNSUPPORTED_DEFAULTS:
                raise PydanticCustomError("unknown_field", "unknown field {field}; check its spelling", {"field": name})
            if value not in _UNSUPPORTED_DEFAULTS[name]:
                allowed = " or ".join(repr(v) for v in _UNSUPPORTED_DEFAULTS[name])
                raise PydanticCustomError(
                    "unsupported_field",
                    "{field} is not supported by this server; send it as {allowed} or leave it out",
                    {"field": name, "allowed": allowed, "value": value},
                )
        return self

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(OpenAIRequest):
    """Body of ``POST /v1/completions``."""

    prompt: str | list[str]
    max_tokens: int | None = Field(OPENAI_COMPLETIONS_DEFAULT_MAX_TOKENS, ge=1)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        if isinstance(value, list):
            if len(value) != 1:
                raise PydanticCustomError(
                    "prompt_count",
                    "prompt lists must hold exactly one prompt",
                    {"allowed": "a string or a list of one"},
                )
            value = value[0]
        return check_prompt_text(value)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(OpenAIRequest):
    """Body of ``POST /v1/chat/completions``. The tokenizer's chat template builds the prompt."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_token_limit(self) -> ChatCompletionRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            if self.max_tokens != self.max_completion_tokens:
                raise PydanticCustomError(
                    "conflicting_limits",
                    "max_tokens ({max_tokens}) and max_completion_tokens ({max_completion_tokens}) differ; send one",
                    {"max_tokens": self.max_tokens, "max_completion_tokens": self.max_completion_tokens},
                )
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
