"""OpenAI-shaped API errors: ``{"error": {"message", "type", "param", "code"}}`` plus an HTTP status.

Error bodies can always be sent: every text in them is made encodable as UTF-8 (a lone surrogate echoed from
the request becomes the escape ``\\udXXX``) and bounded in length, so answering an error never fails.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"

_FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")

MAX_MESSAGE_CHARS = 2000
MAX_PARAM_CHARS = 300


def safe_text(value: object, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``value`` as text that encodes as UTF-8 (unencodable characters escaped) and has at most ``limit``
    characters (longer text is cut and ends with ``...``)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        text = text[: max(limit - 3, 0)] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class APIError(Exception):
    """An error answered to the client as ``status`` with OpenAI's error body.

    ``param`` names the offending request field (``None`` when no single field is at fault); ``code`` is a
    short machine-readable reason. ``headers`` are extra response headers (``Retry-After`` on 503).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        if not 400 <= status <= 599:
            raise ValueError(f"status: must be an HTTP error status, got {status}")
        self.status = status
        self.message = safe_text(message)
        self.type = type
        self.param = None if param is None else safe_text(param, MAX_PARAM_CHARS)
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": safe_text(message), "type": type,
                      "param": None if param is None else safe_text(param, MAX_PARAM_CHARS), "code": code}}


def field_of(message: str) -> str | None:
    """The field a ``"field: message"`` validation error names, or ``None``."""
    match = _FIELD_PREFIX.match(message)
    return match.group(1) if match else None


def invalid(message: str, param: str | None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_value_error(error: ValueError, renames: Mapping[str, str] | None = None) -> APIError:
    """A 400 for an engine/sampling ``ValueError`` whose message starts with ``"field: "``.

    ``renames`` maps engine field names to request field names (e.g. ``prompt`` -> ``messages``); an
    indexed field such as ``prompt[3]`` is renamed by its base name. Errors about the context length get
    OpenAI's ``context_length_exceeded`` code.
    """
    message = str(error)
    field = field_of(message)
    param = field
    if field is not None and renames:
        base = re.split(r"[.\[]", field, maxsplit=1)[0]
        if base in renames:
            param = renames[base] + field[len(base):]
            message = param + message[len(field):]
    code = "context_length_exceeded" if "max_model_len" in message or "KV blocks" in message else None
    return invalid(message, param, code)


def not_found(message: str, code: str, param: str | None = None) -> APIError:
    return APIError(404, message, param=param, code=code)


def unavailable(message: str, code: str, retry_after: int | None = None) -> APIError:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return APIError(503, message, type=SERVER_ERROR, code=code, headers=headers)
