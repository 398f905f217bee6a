"""The scheduler's view of one request: its tokens, its KV blocks and how far they are computed."""

from __future__ import annotations

import enum
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from asyncllm.sampling import SamplingParams

FinishReason = Literal["stop", "length", "abort"]


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class SequenceState:
    """One request's token stream.

    Invariants: ``num_computed_tokens <= len(token_ids)``; the KV of ``token_ids[:num_computed_tokens]``
    lives in ``block_table`` (block ``i`` holds tokens ``i*B .. i*B+B-1``); ``block_keys`` has one chained
    key for each of the first ``len(block_keys)`` blocks, all of which are full and computed.
    ``session_id`` names the session whose pinned KV this request may inherit and hand back.
    ``num_dropped_blocks``: the leading blocks of ``block_table`` whose references were dropped because no later
    token can attend to them (a model whose every layer has a sliding window); their ids stay in the table
    (positions keep their blocks) but may since hold other tokens, which attention never reads.
    ``flush_only``: the caller already has the final output; the sequence stays scheduled only until the
    KV of its last token is computed, then its blocks are pinned for the session (no sampling).
    """

    request_id: str
    token_ids: list[int]
    params: SamplingParams | None
    max_total_tokens: int
    session_id: Hashable | None = None
    num_prompt_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_keys: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int | None = None
    num_preemptions: int = 0
    num_dropped_blocks: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    flush_only: bool = False

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise ValueError("prompt: must contain at least one token")
        self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
