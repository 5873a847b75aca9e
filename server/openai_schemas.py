"""Request bodies of the OpenAI-compatible routes.

OpenAI fields this server does not implement are accepted only at their default value
(``n: 1``, ``presence_penalty: 0``...), and any other value is an error naming the
field, so a client never gets a silently different behaviour. ``user`` is accepted and
ignored, as it only labels the end user. ``rank`` is this server's extension (also
expressible as ``model: "name@rank"``).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator
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
                raise PydanticCustomError("unknown_field", "is not a known field; check its spelling", {"field": name})
            if value not in _UNSUPPORTED_DEFAULTS[name]:
                *others, last = [json.dumps(v) for v in _UNSUPPORTED_DEFAULTS[name]]
                allowed = f"{', '.join(others)} or {last}" if others else last
                raise PydanticCustomError(
                    "unsupported_field",
                    "is not supported by this server; send {allowed}, or leave it out",
                    {"field": name, "allowed": allowed, "value": value},
                )
        return self

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


def _one_prompt(value: Any) -> str:
    """Return the prompt from a string or a list of one string, and raise for any other value.

    Checking the type here gives one error rather than one per member of ``str | list[str]``.
    """
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise PydanticCustomError(
            "prompt_type",
            "must be a string or a list of one string",
            {"allowed": "a non-empty string, or a list of one"},
        )
    return check_prompt_text(value)


def _is_text_part(part: Any) -> bool:
    return (
        isinstance(part, dict)
        and part.keys() == {"type", "text"}
        and part["type"] == "text"
        and isinstance(part["text"], str)
    )


def _check_content_type(value: Any) -> Any:
    """Reject content that is neither a string nor a list of text parts, with one error rather than one per member."""
    if isinstance(value, str) or (isinstance(value, list) and all(_is_text_part(part) for part in value)):
        return value
    raise PydanticCustomError(
        "content_type",
        "must be a string or a list of text parts",
        {"allowed": 'a string, or a list of {"type": "text", "text": "..."} parts'},
    )


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    type: Literal["text"]
    text: str


class CompletionRequest(OpenAIRequest):
    """Body of ``POST /v1/completions``."""

    prompt: Annotated[str | list[str], BeforeValidator(_one_prompt)]
    max_tokens: int | None = Field(OPENAI_COMPLETIONS_DEFAULT_MAX_TOKENS, ge=1)


class ChatMessage(BaseModel):
    """One message of a conversation. A user message must contain text; other roles may be empty."""

    model_config = ConfigDict(strict=True, extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str | list[TextPart], BeforeValidator(_check_content_type)]
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _user_content_has_text(cls, content: str | list[TextPart], info: ValidationInfo) -> str | list[TextPart]:
        if info.data.get("role") == "user" and not _text_of(content).strip():
            raise PydanticCustomError(
                "content_empty",
                "must contain text in a user message, not only whitespace",
                {"allowed": "a non-empty string"},
            )
        return content

    def text(self) -> str:
        return _text_of(self.content)


def _text_of(content: str | list[TextPart]) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


class ChatCompletionRequest(OpenAIRequest):
    """Body of ``POST /v1/chat/completions``. The tokenizer's chat template builds the prompt."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _some_message_has_text(self) -> ChatCompletionRequest:
        if not any(message.text().strip() for message in self.messages):
            raise PydanticCustomError(
                "messages_empty",
                "must contain at least one message with text; every message is empty",
                {"field": "messages", "allowed": "1 or more messages, at least one with text"},
            )
        return self

    @model_validator(mode="after")
    def _one_token_limit(self) -> ChatCompletionRequest:
        if self.max_tokens is None or self.max_completion_tokens is None:
            return self
        if self.max_tokens != self.max_completion_tokens:
            raise PydanticCustomError(
                "conflicting_limits",
                "must equal max_tokens ({max_tokens}) when both are sent; send only one of them",
                {
                    "field": "max_completion_tokens",
                    "value": self.max_completion_tokens,
                    "max_tokens": self.max_tokens,
                    "allowed": f"{self.max_tokens} (the value of max_tokens), or leave one of them out",
                },
            )
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
