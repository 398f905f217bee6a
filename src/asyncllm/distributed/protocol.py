"""What the driver and the tensor-parallel workers say to each other over their pipes.

A step travels as ``StepMessage``: per chunk only what a rank's runner reads (the chunk's new token ids, its
start, its block table up to the blocks it touches, whether it samples), never a whole sequence, so a
step's message grows with the tokens it computes, not with the context. Sampling rows go to rank 0 only,
with each seeded request's generator as its state (``torch.Generator.get_state``), because generators
cannot cross processes; rank 0 returns the advanced states and the driver writes them back, so a seeded
request draws the same numbers whichever process samples it.

Replies are ``Reply``: ``ok`` with a payload, or the error a rank raised (the exception when it pickles,
else its text) with the rank's formatted traceback.
"""

from __future__ import annotations

import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from asyncllm.sampling import SamplerOutput, SamplingParams, SamplingRow
from asyncllm.scheduler import ScheduledChunk


@dataclass(frozen=True)
class ChunkWire:
    """One scheduled chunk as a rank needs it: ``token_ids`` are positions ``[start, start + len)``;
    ``block_table`` holds the sequence's blocks up to the last one this chunk writes."""

    start: int
    token_ids: tuple[int, ...]
    block_table: tuple[int, ...]
    samples: bool


@dataclass(frozen=True)
class RowWire:
    """A ``SamplingRow`` without its generator; ``generator_state``: the seeded request's generator state."""

    params: SamplingParams
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    min_tokens_blocked_ids: tuple[int, ...]
    generator_state: torch.Tensor | None


@dataclass(frozen=True)
class StepMessage:
    """One model step. ``rows``: rank 0's sampling rows (other ranks get ``None`` and only
    ``num_rows``, which tells them whether the step computes logits). ``return_logits``: rank 0 returns
    the gathered float32 logits of the sampling chunks instead of sampling (``rows`` is then empty)."""

    chunks: tuple[ChunkWire, ...]
    num_rows: int
    rows: tuple[RowWire, ...] | None = None
    return_logits: bool = False


@dataclass(frozen=True)
class StepReply:
    """Rank 0's answer: the sampled tokens and the seeded rows' advanced generator states, row order (or,
    for ``return_logits``, the logits on the CPU)."""

    output: SamplerOutput
    generator_states: tuple[torch.Tensor | None, ...] = ()
    logits: torch.Tensor | None = None


@dataclass(frozen=True)
class Reply:
    """A rank's answer to any message."""

    kind: Literal["ok", "error"]
    payload: Any = None
    traceback: str = ""

    @classmethod
    def error(cls, error: BaseException) -> Reply:
        import pickle

        text = "".join(traceback.format_exception(error))
        try:
            pickle.loads(pickle.dumps(error))
            payload: BaseException = error
        except Exception:
            payload = RuntimeError(f"{type(error).__name__}: {error}")
        return cls("error", payload, text)


@dataclass(frozen=True)
class Stop:
    """Leave the group and exit."""


@dataclass(frozen=True)
class Seed:
    seed: int


def encode_chunks(chunks: Sequence[ScheduledChunk], block_size: int) -> tuple[ChunkWire, ...]:
    """The wire form of a scheduled step's chunks (only text models: images are refused by the driver)."""
    wires = []
    for chunk in chunks:
        seq, end = chunk.seq, chunk.start + chunk.num_tokens
        used = -(-end // block_size)
        wires.append(ChunkWire(chunk.start, tuple(seq.token_ids[chunk.start:end]), tuple(seq.block_table[:used]),
                               chunk.samples))
    return tuple(wires)


def encode_rows(rows: Sequence[SamplingRow]) -> tuple[RowWire, ...]:
    return tuple(
        RowWire(row.params, tuple(row.prompt_token_ids), tuple(row.output_token_ids),
                tuple(row.min_tokens_blocked_ids),
                row.generator.get_state() if row.generator is not None else None)
        for row in rows
    )


class _TokenWindow:
    """Token ids of positions ``[offset, offset + len(ids))`` indexed by absolute position."""

    def __init__(self, offset: int, ids: tuple[int, ...]) -> None:
        self._offset = offset
        self._ids = ids

    def __len__(self) -> int:
        return self._offset + len(self._ids)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            start = (index.start or 0) - self._offset
            stop = (len(self) if index.stop is None else index.stop) - self._offset
            if start < 0:
                raise IndexError("token window: positions before the chunk are not sent")
            return list(self._ids[start:stop])
        if index - self._offset < 0:
            raise IndexError("token window: positions before the chunk are not sent")
        return self._ids[index - self._offset]


@dataclass
class _WorkerSeq:
    """The part of ``SequenceState`` a runner reads."""

    token_ids: _TokenWindow
    block_table: tuple[int, ...]
    images: tuple[()] = ()
    image_features: None = None
    flush_only: bool = False


@dataclass(frozen=True)
class WorkerChunk:
    """Stands in for ``ScheduledChunk`` in a worker's runner (same attributes the runner reads)."""

    seq: _WorkerSeq
    start: int
    num_tokens: int
    samples: bool


def decode_chunks(wires: Sequence[ChunkWire]) -> list[WorkerChunk]:
    return [WorkerChunk(_WorkerSeq(_TokenWindow(w.start, w.token_ids), w.block_table), w.start, len(w.token_ids),
                        w.samples) for w in wires]


def decode_rows(wires: Sequence[RowWire], device: torch.device) -> list[SamplingRow]:
    """Sampling rows with a generator on ``device`` rebuilt from each seeded row's state."""
    rows = []
    for wire in wires:
        generator = None
        if wire.generator_state is not None:
            generator = torch.Generator(device=device)
            generator.set_state(wire.generator_state)
        rows.append(SamplingRow(wire.params, list(wire.prompt_token_ids), list(wire.output_token_ids), generator,
                                list(wire.min_tokens_blocked_ids)))
    return rows
