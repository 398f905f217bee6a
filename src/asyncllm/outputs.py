"""What callers get back: per-step stream outputs, finished completions and usage."""

from __future__ import annotations

from dataclasses import dataclass, field

from asyncllm.sampling import TokenLogprobs
from asyncllm.sequence import FinishReason


@dataclass(frozen=True)
class Usage:
    """Token accounting of one request. ``cached_tokens`` prompt tokens reused KV instead of prefilling."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class StepOutput:
    """New output of one request since the consumer last read: it coalesces if the consumer lags.

    ``token_ids`` and ``logprobs`` (when requested) are aligned; ``text`` is the matching text delta,
    which may lag the tokens by a few characters while a multi-byte character or a possible stop string
    is incomplete. ``finish_reason`` and ``usage`` are set on the last output only.
    """

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class Completion:
    """A finished request: all generated text and ids (including a final EOS/stop id, if one was sampled)."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage
    logprobs: list[TokenLogprobs] | None = field(default=None)
