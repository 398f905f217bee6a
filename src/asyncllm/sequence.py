"""The scheduler's view of one request: its tokens, its KV blocks and how far they are computed."""

from __future__ import annotations

import enum
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from asyncllm.mrope import prompt_positions

if TYPE_CHECKING:
    from asyncllm.sampling import SamplingParams

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True, eq=False)
class ImageSpan:
    """An image in a prompt: its ``length`` placeholder tokens start at ``start``; ``pixels`` is the
    ``[P, C, S, S]`` tensor of tiles the vision tower reads (``P == 1`` unless the model tiles images);
    ``size`` is the original ``(height, width)`` (a tiled model unpads its features by it); ``digest`` (a
    hash of what the model reads) enters the prefix-cache keys of the blocks these tokens fall in, so the
    same text with another image reuses nothing. ``grid`` (models with M-RoPE positions, Qwen2-VL): the
    image's token grid ``(t, rows, cols)`` after the spatial merge, ``t * rows * cols == length``, row-major
    in the span; ``None`` for models whose images have no grid."""

    start: int
    length: int
    pixels: Any
    digest: int
    size: tuple[int, int] = (0, 0)
    grid: tuple[int, int, int] | None = None

    @property
    def end(self) -> int:
        return self.start + self.length


_KEY_MASK = (1 << 62) - 1


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
    ``images``: the prompt's images, in order; ``image_features``: their projected rows (one ``[length, H]``
    tensor per image), computed when the first step whose chunk covers one of the images runs and dropped
    once the chunk covering the last image token has run.
    ``mrope_positions`` / ``rope_delta``: when an image has a ``grid`` (an M-RoPE model), the prompt's
    ``[3, num_prompt_tokens]`` positions and the offset of every later token's position (``asyncllm.mrope``),
    computed once here from the prompt's length and its images; ``None`` / ``0`` otherwise. They depend only
    on the image spans (their digests key the prefix cache), so a cached block's positions are its prefix's.
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
    images: tuple[ImageSpan, ...] = ()
    image_features: list[Any] | None = None
    mrope_positions: Any = None
    rope_delta: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise ValueError("prompt: must contain at least one token")
        self.num_prompt_tokens = len(self.token_ids)
        if any(image.grid is not None for image in self.images):
            self.mrope_positions, self.rope_delta = prompt_positions(self.num_prompt_tokens, self.images)

    def rope_positions(self, begin: int, end: int) -> np.ndarray:
        """``[3, end - begin]`` int64 M-RoPE positions of tokens ``begin .. end - 1`` (prompt tokens from
        ``mrope_positions``, later ones ``offset + rope_delta``; plain offsets without image grids)."""
        out = np.empty((3, end - begin), dtype=np.int64)
        out[:] = np.arange(begin, end) + self.rope_delta
        table = self.mrope_positions
        if table is not None and begin < self.num_prompt_tokens:
            stop = min(end, self.num_prompt_tokens)
            out[:, : stop - begin] = table[:, begin:stop]
        return out

    def key_tokens(self, begin: int, end: int) -> list[int]:
        """``token_ids[begin:end]`` as the prefix cache keys them: an image's placeholder tokens become
        negative values derived from the image's digest and their offset in it (never a real token id)."""
        tokens = self.token_ids[begin:end]
        for image in self.images:
            lo, hi = max(begin, image.start), min(end, image.end)
            for pos in range(lo, hi):
                tokens[pos - begin] = -1 - ((image.digest ^ (pos - image.start)) & _KEY_MASK)
        return tokens

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
