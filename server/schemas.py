"""Request and response bodies of ``POST /generate``.

Types are strict: ``"5"`` is not a number and ``2.0`` is not an integer, so no value a
client sent is silently converted. Unknown fields are rejected, so a misspelt option
is an error rather than ignored. Limits that depend on the loaded adapter or the
server's settings (rank range, ``max_new_tokens`` limit, prompt length) are checked by
the service, which has the adapters and settings. Custom error messages read after the
field name (``server.validation`` puts them together).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

MAX_STOP_STRINGS = 8
# Every generated token is checked against each stop string, so their length is bounded.
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1


def _check_rank_type(value: Any) -> Any:
    if value is None or value == "auto" or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise PydanticCustomError(
        "rank_type", "must be an integer or 'auto'", {"allowed": "an integer 0..max rank, or 'auto'"}
    )


def _check_stop(value: Any) -> Any:
    if value is None:
        return value
    stops = [value] if isinstance(value, str) else value
    allowed = f"1 to {MAX_STOP_STRINGS} strings of 1 to {MAX_STOP_CHARS} characters"
    if not isinstance(stops, list) or not all(isinstance(stop, str) for stop in stops):
        raise PydanticCustomError(
            "stop_type", "must be a string or a list of strings", {"allowed": f"a string, or a list of {allowed}"}
        )
    if not all(stops):
        raise PydanticCustomError("stop_empty", "must not contain empty strings", {"allowed": allowed})
    if any(len(stop) > MAX_STOP_CHARS for stop in stops):
        raise PydanticCustomError(
            "stop_too_long",
            "must contain strings of at most {max} characters",
            {"max": MAX_STOP_CHARS, "allowed": allowed},
        )
    return stops


RankField = Annotated[int | Literal["auto"] | None, BeforeValidator(_check_rank_type)]
StopField = Annotated[list[str] | None, BeforeValidator(_check_stop), Field(max_length=MAX_STOP_STRINGS)]


class SamplingFields(BaseModel):
    """Fields shared by /generate and the OpenAI routes."""

    model_config = ConfigDict(strict=True, extra="forbid")

    rank: RankField = Field(None, description="0 (base model) to the adapter's max rank, or 'auto'")
    temperature: float = Field(0.0, ge=0, allow_inf_nan=False, description="0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    stop: StopField = Field(None, description="strings that end the text; they are not returned")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False


def check_prompt_text(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError(
            "prompt_empty", "must contain text, not only whitespace", {"allowed": "a non-empty string"}
        )
    return value


class GenerateRequest(SamplingFields):
    """Body of ``POST /generate``. The prompt is used as given unless ``chat`` is true."""

    prompt: str
    chat: bool = Field(False, description="send the prompt as one user message through the tokenizer's chat template")
    max_new_tokens: int | None = Field(None, ge=1, description="1 to the server's --max-new-tokens-limit")
    adapter: str | None = Field(None, description="optional when one adapter is loaded")

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str) -> str:
        return check_prompt_text(value)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    id: str
    text: str
    rank: int
    adapter: str
    finish_reason: Literal["stop", "length"]
    usage: Usage
