"""Parsing and validation of OpenAI-style request bodies into engine terms.

Every rejection is an ``APIError`` (400) whose ``param`` names the offending field. ``null`` means "not
given" for every optional field, and fields this server does not know are ignored, as OpenAI clients expect.
Types are exact: a boolean is not an integer, an integer-valued float is not an integer, numbers must be
finite, strings must encode as UTF-8 (no lone surrogates), and ``logit_bias`` keys are ASCII decimal token
ids.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from asyncllm.adapters.errors import APIError, from_value_error, invalid
from asyncllm.image_inputs import ImageURL
from asyncllm.sampling import MAX_LOGPROBS, SamplingParams

Message = dict[str, Any]
Prompt = str | list[int] | list[Message]

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant"})
"""Roles a chat message may have; ``developer`` is OpenAI's newer name for ``system`` and is mapped to it."""

MAX_SESSION_ID_LENGTH = 256

IMAGE_DETAILS = ("auto", "low", "high")
"""Accepted values of an ``image_url`` part's ``detail`` (read, not acted on)."""

_TOKEN_ID_KEY = re.compile(r"[0-9]{1,12}")

_PASSTHROUGH_SAMPLING = (
    "temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "top_k", "min_p",
    "repetition_penalty", "min_tokens", "ignore_eos", "skip_special_tokens",
)


@dataclass(frozen=True)
class RequestLimits:
    """What a request may ask for: ``vocab_size`` bounds token ids, ``max_n`` bounds ``n``."""

    vocab_size: int
    max_n: int = 16

    def __post_init__(self) -> None:
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size: must be >= 1, got {self.vocab_size}")
        if self.max_n < 1:
            raise ValueError(f"max_n: must be >= 1, got {self.max_n}")


@dataclass(frozen=True)
class GenerationRequest:
    """A validated ``/v1/chat/completions`` (``chat``) or ``/v1/completions`` request.

    ``prompt`` is a message list for chat and a string or token id list for completions. ``params.max_tokens``
    is ``None`` when the client gave no limit. ``top_logprobs`` is the number of alternatives to return per
    token when ``params.logprobs`` is set. ``session_id`` is only ever set for chat. ``max_tokens_field`` is
    the request field the limit came from (errors about it name that field).
    """

    chat: bool
    prompt: Prompt
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    model: str | None
    session_id: str | None = None
    max_tokens_field: str = "max_tokens"

    def choice_params(self) -> list[SamplingParams]:
        """One ``SamplingParams`` per choice: choice ``i`` of a seeded request uses ``seed + i``."""
        if self.params.seed is None or self.n == 1:
            return [self.params] * self.n
        try:
            return [dataclasses.replace(self.params, seed=self.params.seed + i) for i in range(self.n)]
        except ValueError as error:
            raise invalid(f"seed: seed + n - 1 is out of range ({error})", "seed") from error


# -- small typed readers -------------------------------------------------------------------------
def _text(value: str, where: str) -> str:
    """``value`` when it encodes as UTF-8; a 400 naming ``where`` otherwise (a lone surrogate)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise invalid(f"{where}: must be valid Unicode text; it holds the unpaired surrogate "
                      f"U+{ord(value[error.start]):04X} at index {error.start}", where,
                      "invalid_string") from None
    return value


def _optional_bool(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"{name}: must be a boolean, got {value!r}", name)
    return value


def _optional_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{name}: must be an integer, got {value!r}", name)
    return value


def _optional_str(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid(f"{name}: must be a string, got {type(value).__name__}", name)
    return _text(value, name)


def _token_ids(value: Any, name: str, vocab_size: int) -> list[int]:
    if not isinstance(value, list):
        raise invalid(f"{name}: must be a list of token ids", name)
    for i, token in enumerate(value):
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise invalid(f"{name}[{i}]: token ids must be integers in [0, {vocab_size}), got {token!r}",
                          f"{name}[{i}]")
    return list(value)


def _logit_bias(value: Any, vocab_size: int) -> dict[int, float]:
    """Token id keys (ASCII decimal strings, or ints from Python callers) -> finite numeric biases; the range
    of the bias is checked by ``SamplingParams``."""
    if not isinstance(value, Mapping):
        raise invalid("logit_bias: must be an object mapping token ids to biases", "logit_bias")
    bias: dict[int, float] = {}
    for key, amount in value.items():
        if isinstance(key, int) and not isinstance(key, bool):
            token = key
        elif isinstance(key, str) and _TOKEN_ID_KEY.fullmatch(key):
            token = int(key)
        else:
            token = -1
        if not 0 <= token < vocab_size:
            raise invalid(f"logit_bias: keys must be token ids (ASCII decimal) in [0, {vocab_size}), got "
                          f"{key!r}", "logit_bias")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount):
            raise invalid(f"logit_bias: the bias of token {token} must be a finite number, got {amount!r}",
                          "logit_bias")
        bias[token] = float(amount)
    return bias


def _stop(value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise invalid(f"stop: must be a string or a list of strings, got {type(value).__name__}", "stop")
    for i, item in enumerate(items):
        where = "stop" if isinstance(value, str) else f"stop[{i}]"
        if not isinstance(item, str) or not item:
            raise invalid(f"{where}: stop sequences must be non-empty strings, got {item!r}", where)
        _text(item, where)
    return list(items)


def parse_messages(value: Any, name: str = "messages", *, images: bool = True) -> list[Message]:
    """Validated chat messages as ``{"role", "content"}`` dicts.

    Content may be a string or a list of ``{"type": "text", "text": ...}`` parts, which are concatenated,
    and (with ``images``) ``{"type": "image_url", "image_url": {"url": ..., "detail": ...}}`` parts. A
    message without image parts gets ``str`` content; one with image parts keeps a list of engine content
    parts: ``{"type": "text", "text": ...}`` and ``{"type": "image", "image": ImageURL}``, the URL not yet
    read (``ImageURL.field`` names the request field). Any other part type is rejected. Extra message keys
    (``name``, ...) are dropped.
    """
    if not isinstance(value, list) or not value:
        raise invalid(f"{name}: must be a non-empty list of messages", name)
    messages: list[Message] = []
    for i, message in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(message, Mapping):
            raise invalid(f"{where}: must be an object with 'role' and 'content'", where)
        role = message.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise invalid(f"{where}.role: must be one of {sorted(CHAT_ROLES)}, got {role!r}", f"{where}.role")
        content = _message_content(message.get("content"), f"{where}.content", images=images)
        messages.append({"role": "system" if role == "developer" else role, "content": content})
    return messages


def image_refs(messages: list[Message]) -> list[ImageURL]:
    """The unread image URLs of parsed ``messages``, in prompt order."""
    return [part["image"] for message in messages if isinstance(message["content"], list)
            for part in message["content"] if part["type"] == "image" and isinstance(part["image"], ImageURL)]


def _message_content(value: Any, where: str, *, images: bool) -> str | list[dict[str, Any]]:
    if isinstance(value, str):
        return _text(value, where)
    if not isinstance(value, list):
        raise invalid(f"{where}: must be a string or a list of content parts", where)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
        if isinstance(part, Mapping) and kind == "image_url" and images:
            parts.append({"type": "image", "image": _image_url(part, f"{where}[{j}]")})
            continue
        if not isinstance(part, Mapping) or kind != "text":
            allowed = "text and image_url" if images else "text"
            raise invalid(f"{where}[{j}]: only {allowed} content parts are supported, got {kind!r}",
                          f"{where}[{j}]")
        text = part.get("text")
        if not isinstance(text, str):
            raise invalid(f"{where}[{j}].text: must be a string", f"{where}[{j}].text")
        parts.append({"type": "text", "text": _text(text, f"{where}[{j}].text")})
    if all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts)
    return parts


def _image_url(part: Mapping[str, Any], where: str) -> ImageURL:
    """An ``image_url`` part's URL (a ``data:`` or ``http(s)`` URL; read later) and its ``detail``, which
    must be ``auto``, ``low`` or ``high`` when given (the served models take one fixed resolution)."""
    spec = part.get("image_url")
    if not isinstance(spec, Mapping):
        raise invalid(f"{where}.image_url: must be an object with a 'url'", f"{where}.image_url")
    url = spec.get("url")
    if not isinstance(url, str) or not url:
        raise invalid(f"{where}.image_url.url: must be a non-empty string", f"{where}.image_url.url")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in ("data", "http", "https"):
        raise invalid(f"{where}.image_url.url: must be a data: URL or an http(s) URL", f"{where}.image_url.url")
    detail = spec.get("detail")
    if detail is not None and detail not in IMAGE_DETAILS:
        raise invalid(f"{where}.image_url.detail: must be one of {list(IMAGE_DETAILS)}, got {detail!r}",
                      f"{where}.image_url.detail")
    return ImageURL(url, f"{where}.image_url.url")


def parse_prompt(value: Any, vocab_size: int) -> str | list[int]:
    """A completion prompt: a string, a token id list, or a list holding exactly one of those."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise invalid("prompt: must not be empty", "prompt")
        return _text(value, "prompt")
    if isinstance(value, list):
        if not value:
            raise invalid("prompt: must not be empty", "prompt")
        if all(isinstance(item, (str, list)) for item in value):
            raise invalid("prompt: a batch of several prompts is not supported; send one request per prompt",
                          "prompt")
        return _token_ids(value, "prompt", vocab_size)
    raise invalid("prompt: must be a string, a list of token ids, or a list of one of those", "prompt")


# -- request bodies ------------------------------------------------------------------------------
def _sampling(body: Mapping[str, Any], limits: RequestLimits, *, max_tokens: tuple[str, int | None],
              logprobs: tuple[str, int | None]) -> SamplingParams:
    kwargs: dict[str, Any] = {
        name: body[name] for name in _PASSTHROUGH_SAMPLING if body.get(name) is not None
    }
    if body.get("stop") is not None:
        kwargs["stop"] = _stop(body["stop"])
    if body.get("stop_token_ids") is not None:
        kwargs["stop_token_ids"] = _token_ids(body["stop_token_ids"], "stop_token_ids", limits.vocab_size)
    if body.get("logit_bias") is not None:
        kwargs["logit_bias"] = _logit_bias(body["logit_bias"], limits.vocab_size)
    max_tokens_field, max_tokens_value = max_tokens
    logprobs_field, logprobs_value = logprobs
    try:
        return SamplingParams(max_tokens=max_tokens_value, logprobs=logprobs_value, **kwargs)
    except ValueError as error:
        raise from_value_error(error, {"max_tokens": max_tokens_field, "logprobs": logprobs_field}) from error


def _n(body: Mapping[str, Any], limits: RequestLimits) -> int:
    n = _optional_int(body, "n")
    if n is None:
        return 1
    if not 1 <= n <= limits.max_n:
        raise invalid(f"n: must be in [1, {limits.max_n}], got {n}", "n")
    return n


def _include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, Mapping):
        raise invalid("stream_options: must be an object", "stream_options")
    value = options.get("include_usage")
    if value is not None and not isinstance(value, bool):
        raise invalid(f"stream_options.include_usage: must be a boolean, got {value!r}",
                      "stream_options.include_usage")
    return bool(value)


def _common(body: Mapping[str, Any]) -> tuple[str | None, bool]:
    _optional_str(body, "user")
    return _optional_str(body, "model"), _optional_bool(body, "stream", False)


def parse_chat_request(body: Mapping[str, Any], limits: RequestLimits) -> GenerationRequest:
    """``/v1/chat/completions``: ``max_completion_tokens`` wins over the older ``max_tokens``; ``logprobs``
    is a boolean and ``top_logprobs`` (0..20) the number of alternatives, which needs ``logprobs: true``."""
    model, stream = _common(body)
    messages = parse_messages(body.get("messages"))
    max_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    want_logprobs = _optional_bool(body, "logprobs", False)
    top = _optional_int(body, "top_logprobs")
    if top is not None and not want_logprobs:
        raise invalid("top_logprobs: requires logprobs to be true", "top_logprobs")
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise invalid(f"top_logprobs: must be in [0, {MAX_LOGPROBS}], got {top}", "top_logprobs")
    params = _sampling(body, limits, max_tokens=(max_field, _optional_int(body, max_field)),
                       logprobs=("top_logprobs", (top or 0) if want_logprobs else None))
    session_id = _optional_str(body, "session_id")
    if session_id is not None and not 1 <= len(session_id) <= MAX_SESSION_ID_LENGTH:
        raise invalid(f"session_id: must be 1 to {MAX_SESSION_ID_LENGTH} characters", "session_id")
    n = _n(body, limits)
    if session_id is not None and n != 1:
        raise invalid("n: a session turn produces exactly one choice", "n")
    return GenerationRequest(chat=True, prompt=messages, params=params, n=n, stream=stream,
                             include_usage=_include_usage(body), model=model, session_id=session_id,
                             max_tokens_field=max_field)


def parse_completion_request(body: Mapping[str, Any], limits: RequestLimits) -> GenerationRequest:
    """``/v1/completions``: ``logprobs`` is the number of alternatives per token (0..20) or null."""
    model, stream = _common(body)
    if "prompt" not in body or body["prompt"] is None:
        raise invalid("prompt: is required", "prompt")
    prompt = parse_prompt(body["prompt"], limits.vocab_size)
    params = _sampling(body, limits, max_tokens=("max_tokens", _optional_int(body, "max_tokens")),
                       logprobs=("logprobs", body.get("logprobs")))
    return GenerationRequest(chat=False, prompt=prompt, params=params, n=_n(body, limits), stream=stream,
                             include_usage=_include_usage(body), model=model)


@dataclass(frozen=True)
class TokenizeRequest:
    """``/tokenize``: exactly one of ``prompt`` (text) and ``messages`` (rendered with the chat template)."""

    prompt: str | None
    messages: list[Message] | None
    add_special_tokens: bool
    add_generation_prompt: bool
    model: str | None


def parse_tokenize_request(body: Mapping[str, Any]) -> TokenizeRequest:
    model = _optional_str(body, "model")
    has_prompt, has_messages = body.get("prompt") is not None, body.get("messages") is not None
    if has_prompt == has_messages:
        raise invalid("prompt: give exactly one of 'prompt' and 'messages'", "prompt")
    prompt = _optional_str(body, "prompt")
    messages = parse_messages(body["messages"], images=False) if has_messages else None
    return TokenizeRequest(prompt=prompt, messages=messages,
                           add_special_tokens=_optional_bool(body, "add_special_tokens", True),
                           add_generation_prompt=_optional_bool(body, "add_generation_prompt", True),
                           model=model)


def parse_detokenize_request(body: Mapping[str, Any], vocab_size: int) -> tuple[list[int], str | None, bool]:
    """``/detokenize``: ``tokens`` (ids in the vocabulary), the optional ``model`` and
    ``skip_special_tokens`` (default false, so that special tokens round-trip)."""
    model = _optional_str(body, "model")
    if body.get("tokens") is None:
        raise invalid("tokens: is required", "tokens")
    skip = _optional_bool(body, "skip_special_tokens", False)
    return _token_ids(body["tokens"], "tokens", vocab_size), model, skip


def ensure_object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body
