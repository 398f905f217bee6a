"""Chat templates: compiling a Hugging Face Jinja chat template, and validating the messages it renders."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the environment Hugging Face templates are written for.

    Sandboxed and immutable; ``trim_blocks``/``lstrip_blocks``; ``loopcontrols``; a ``tojson`` that keeps
    non-ASCII text and does not HTML-escape; ``raise_exception`` and ``strftime_now`` globals.
    """

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(
            f"chat_template: invalid Jinja template (line {error.lineno}): {error.message}"
        ) from error


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of chat messages, each a dict with non-empty str ``role`` and str ``content``; anything else
    raises ``ValueError`` naming the message and field."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(
            f"messages: must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}"
        )
    checked: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{index}]: must be a dict, got {type(message).__name__}")
        for field in ("role", "content"):
            if field not in message:
                raise ValueError(f"messages[{index}].{field}: missing")
            if not isinstance(message[field], str):
                kind = type(message[field]).__name__
                raise ValueError(f"messages[{index}].{field}: must be a str, got {kind}")
        if not message["role"]:
            raise ValueError(f"messages[{index}].role: must be non-empty")
        checked.append(dict(message))
    return checked
