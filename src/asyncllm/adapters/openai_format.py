"""OpenAI response bodies: chat completions, text completions, their stream chunks, usage and logprobs.

Token strings in logprobs are each token decoded on its own (special tokens included); ``bytes`` are that
string's UTF-8 bytes, so a token holding part of a multi-byte character shows U+FFFD. A log-probability
that is not finite is reported as ``-9999.0`` (as OpenAI does), keeping every body valid JSON.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from asyncllm.outputs import Usage
from asyncllm.sampling import TokenLogprobs
from asyncllm.tokenizer import Tokenizer

Json = dict[str, Any]

MIN_LOGPROB = -9999.0


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


def usage_json(usages: Sequence[Usage]) -> Json:
    """One request's usage over its choices: the shared prompt counted once, completions summed."""
    if not usages:
        raise ValueError("usages: at least one choice is needed")
    first = usages[0]
    completion = sum(u.completion_tokens for u in usages)
    return {
        "prompt_tokens": first.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": first.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": first.cached_tokens},
    }


@dataclass(frozen=True)
class Choice:
    """A finished choice of a non-streaming response."""

    index: int
    text: str
    finish_reason: str
    logprobs: list[TokenLogprobs] | None


class ResponseFormatter:
    """Builds the bodies of one API response; ``chat`` picks chat.completion vs text_completion shapes."""

    def __init__(self, tokenizer: Tokenizer, *, chat: bool, model: str, include_usage_field: bool = False,
                 session_id: str | None = None) -> None:
        self._tokenizer = tokenizer
        self.chat = chat
        self.model = model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._usage_field = include_usage_field
        self._session_id = session_id
        self._token_text: dict[int, str] = {}
        self._text_offset: dict[int, int] = {}

    # -- pieces --------------------------------------------------------------------------------
    def _text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_text[token_id] = text
        return text

    def _chat_entry(self, token_id: int, logprob: float) -> Json:
        text = self._text(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}

    def logprobs_json(self, index: int, logprobs: Sequence[TokenLogprobs] | None) -> Json | None:
        """Chat: ``{"content": [...]}``; completions: ``tokens``/``token_logprobs``/``top_logprobs``/
        ``text_offset`` (offsets continue across the chunks of choice ``index``)."""
        if logprobs is None:
            return None
        if self.chat:
            return {"content": [
                {**self._chat_entry(lp.token_id, lp.logprob),
                 "top_logprobs": [self._chat_entry(t, v) for t, v in lp.top]}
                for lp in logprobs
            ]}
        offset = self._text_offset.get(index, 0)
        offsets = []
        for lp in logprobs:
            offsets.append(offset)
            offset += len(self._text(lp.token_id))
        self._text_offset[index] = offset
        return {
            "tokens": [self._text(lp.token_id) for lp in logprobs],
            "token_logprobs": [_finite(lp.logprob) for lp in logprobs],
            "top_logprobs": [{self._text(t): _finite(v) for t, v in lp.top} for lp in logprobs],
            "text_offset": offsets,
        }

    def _envelope(self, obj: str, choices: list[Json]) -> Json:
        body: Json = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                      "choices": choices}
        if self._session_id is not None:
            body["session_id"] = self._session_id
        return body

    # -- streaming -----------------------------------------------------------------------------
    def chunk(self, index: int, *, text: str = "", role: bool = False, finish_reason: str | None = None,
              logprobs: Sequence[TokenLogprobs] | None = None) -> Json:
        """One stream chunk for choice ``index``."""
        lp = self.logprobs_json(index, logprobs) if logprobs else None
        if self.chat:
            delta: Json = {}
            if role:
                delta["role"] = "assistant"
                delta["content"] = text
            elif text:
                delta["content"] = text
            choice: Json = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
            body = self._envelope("chat.completion.chunk", [choice])
        else:
            choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}
            body = self._envelope("text_completion", [choice])
        if self._usage_field:
            body["usage"] = None
        return body

    def usage_chunk(self, usages: Sequence[Usage]) -> Json:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = usage_json(usages)
        return body

    # -- whole responses -----------------------------------------------------------------------
    def response(self, choices: Sequence[Choice], usages: Sequence[Usage]) -> Json:
        items: list[Json] = []
        for choice in choices:
            lp = self.logprobs_json(choice.index, choice.logprobs)
            if self.chat:
                items.append({"index": choice.index, "message": {"role": "assistant", "content": choice.text},
                              "logprobs": lp, "finish_reason": choice.finish_reason})
            else:
                items.append({"index": choice.index, "text": choice.text, "logprobs": lp,
                              "finish_reason": choice.finish_reason})
        body = self._envelope("chat.completion" if self.chat else "text_completion", items)
        body["usage"] = usage_json(usages)
        return body
