"""Plain descriptions of pydantic validation errors, for the HTTP error bodies and the ``serve`` settings.

Each description names the field, the value received in JSON spelling (``true``,
``null``, ``NaN``) and the values allowed. Custom errors raised by the request schemas
(:class:`pydantic_core.PydanticCustomError`) carry a message that reads after the field
name (``"must be an integer or 'auto'"``) and may carry ``allowed``, and for errors of
the whole body, ``field`` and ``value`` in their context.
"""

from __future__ import annotations

import json
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic_core.core_schema import ErrorType

MAX_VALUE_CHARS = 200

# JSON has no NaN or infinities; Python's json module writes these bare words, which strict parsers reject.
_NON_FINITE_NAMES = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_BUILTIN_TYPES = frozenset(typing.get_args(ErrorType))
_TYPE_NAMES = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "a list",
    "dict_type": "a JSON object",
    "model_type": "a JSON object",
    "model_attributes_type": "a JSON object",
}
_RANGE_TYPES = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal"})
_LENGTH_TYPES = frozenset({"too_long", "too_short"})
_UNKNOWN_FIELD_TYPES = frozenset({"extra_forbidden", "unknown_field"})
_UNKNOWN = object()


@dataclass(frozen=True)
class FieldProblem:
    """One invalid field: its dotted name, the value received (None when not echoed), the values allowed, and a sentence."""

    field: str
    value: Any
    allowed: str | None
    message: str


def describe(error: Mapping[str, Any], allowed_by_field: Mapping[str, str] | None = None) -> FieldProblem:
    """Describe one error of ``ValidationError.errors()``.

    ``allowed_by_field`` describes the accepted values of fields whose error alone would
    not say it (``{"max_new_tokens": "1..512"}``). A leading ``body`` in the location,
    which FastAPI adds, is left out of the field name.
    """
    kind = error.get("type", "")
    context = error.get("ctx") or {}
    location = list(error.get("loc", ()))
    if location[:1] == ["body"]:
        location = location[1:]
    field = context.get("field") or ".".join(str(part) for part in location)
    # An error of the whole model, or a missing field, has the enclosing object as its input, which is not echoed.
    echoed = location and kind != "missing"
    value = context.get("value", error.get("input") if echoed else _UNKNOWN)
    allowed = _allowed(kind, field, context, (allowed_by_field or {}).get(field))
    message = _message(kind, field, value, allowed, context, error.get("msg", "invalid value"))
    return FieldProblem(field, None if value is _UNKNOWN else value, allowed, message)


def field_bounds(model: type[BaseModel]) -> dict[str, str]:
    """Describe the numeric bounds of each field of ``model`` that has some (``"1..65535"``, ``">= 1"``).

    An error reports only the bound that the value broke, so this gives the whole range.
    """
    described = {}
    for name, field in model.model_fields.items():
        bounds = {}
        for constraint in field.metadata:
            bounds.update(
                {key: getattr(constraint, key) for key in ("gt", "ge", "lt", "le") if hasattr(constraint, key)}
            )
        if bounds:
            described[name] = _bounds(bounds)
    return described


def json_text(value: Any) -> str:
    """Return the JSON text of a value for a message, with ``NaN`` and ``Infinity`` bare, cut to ``MAX_VALUE_CHARS``."""
    if isinstance(value, float) and not math.isfinite(value):
        return _NON_FINITE_NAMES[str(value)]
    return _cut(json.dumps(json_safe(value), ensure_ascii=False))


def json_safe(value: Any) -> Any:
    """Return ``value`` with non-finite floats as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``.

    Bytes are decoded (invalid UTF-8 replaced) and other non-JSON types written with ``str``,
    so the result always serializes as standard JSON.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else _NON_FINITE_NAMES[str(value)]
    if value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return str(value)


def short_value(value: Any) -> Any:
    """Return a JSON-safe copy of ``value`` to echo, with long strings, lists and objects cut to about ``MAX_VALUE_CHARS``."""
    value = json_safe(value)
    if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
        return value[:MAX_VALUE_CHARS] + f"... ({len(value)} characters)"
    if isinstance(value, (dict, list)):
        text = json.dumps(value, ensure_ascii=False)
        if len(text) > MAX_VALUE_CHARS:
            return _cut(text)
    return value


def _message(kind: str, field: str, value: Any, allowed: str | None, context: Mapping[str, Any], text: str) -> str:
    got = "" if value is _UNKNOWN else f", got {json_text(value)}"
    if kind == "missing":
        return f"{field} is required"
    if kind in _UNKNOWN_FIELD_TYPES:
        return f"{field} is not a known field; check its spelling"
    if kind == "value_error":  # a validator's ValueError, whose text is a whole sentence
        return text.removeprefix("Value error, ")
    if kind in _RANGE_TYPES:
        return f"{field} is out of range: got {json_text(value)}, allowed {allowed}"
    if kind == "finite_number":
        return f"{field} must be a finite number{got}"
    if kind in _LENGTH_TYPES:
        length = context.get("actual_length")
        return f"{field} has {length} {_items(length)}, allowed {allowed}"
    if kind == "literal_error":
        return f"{field} must be one of {context.get('expected')}{got}"
    if kind in _TYPE_NAMES:
        return f"{field} must be {_TYPE_NAMES[kind]}{got}"
    if kind in _BUILTIN_TYPES:
        return f"{field} is invalid: {text}{got}"
    return f"{field} {text}{got}"


def _allowed(kind: str, field: str, context: Mapping[str, Any], described: str | None) -> str | None:
    """Return the accepted values: the error's own, else ``described``, else from the error's bounds or type."""
    if "allowed" in context:
        return str(context["allowed"])
    if kind in _UNKNOWN_FIELD_TYPES:
        return "no such field"
    if described:
        return described
    if kind in _RANGE_TYPES:
        return _bounds(context)
    if "max_length" in context:
        return f"at most {context['max_length']} {_items(context['max_length'])}"
    if "min_length" in context:
        return f"at least {context['min_length']} {_items(context['min_length'])}"
    if kind == "literal_error":
        return context.get("expected")
    return _TYPE_NAMES.get(kind)


def _bounds(context: Mapping[str, Any]) -> str:
    if "ge" in context and "le" in context:
        return f"{context['ge']}..{context['le']}"
    symbols = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
    return " and ".join(f"{symbol} {context[key]}" for key, symbol in symbols if key in context)


def _items(count: Any) -> str:
    return "item" if count == 1 else "items"


def _cut(text: str) -> str:
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS] + "..."
