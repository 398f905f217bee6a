"""One model step whose failure is confined to the requests that cause it.

``run_step`` runs a scheduled step through the runner. When the runner raises, the step's chunks are run
again in halves, recursively (bisection), until every chunk either ran in a group that succeeded or raised
alone; only the latter fail. With ``k`` offending chunks among ``n`` this takes ``O(k log n)`` extra runs,
each smaller than the step; a step that raises whatever it holds fails every chunk after ``2n - 1`` runs.
A ``RunnerFailedError`` (the runner can run nothing any more) is never isolated: it propagates at once.

Why running chunks again is safe: a step writes KV only at the positions ``[start, start + num_tokens)``
of its chunks, which their sequences have not yet marked computed (the scheduler advances
``num_computed_tokens`` and indexes full blocks in the prefix cache only in ``on_step_done``, which the
engine calls for the chunks that succeeded, after this returns). Those positions lie in blocks private to
the sequence, so a rerun writes the same values there and nobody reads them before. A failed request's
blocks, with whatever it half wrote, are released unindexed when the engine fails it.

Seeded requests draw from their own generators: each run restores the generators of the rows it holds to
their state before the step, so a seeded request's tokens do not depend on a neighbour's failure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from asyncllm.sampling import SamplerOutput, SamplingRow, TokenLogprobs
from asyncllm.scheduler import ScheduledChunk

logger = logging.getLogger("asyncllm")

StepFn = Callable[[Sequence[ScheduledChunk], Sequence[SamplingRow]], SamplerOutput]


class StepFailedError(RuntimeError):
    """The model step computing this request raised (its cause is chained); other requests went on."""


class RunnerFailedError(RuntimeError):
    """The runner itself can run no further step (e.g. a tensor-parallel worker process died): no request
    is to blame, so ``run_step`` does not isolate chunks and the engine fails as a whole."""


@dataclass
class StepResult:
    """``chunks``: the chunks that ran, in step order; ``output``: one entry per sampling chunk among them;
    ``failed``: each chunk that raised alone, with its error."""

    chunks: list[ScheduledChunk]
    output: SamplerOutput
    failed: list[tuple[ScheduledChunk, BaseException]] = field(default_factory=list)


def run_step(step: StepFn, chunks: Sequence[ScheduledChunk], rows: Sequence[SamplingRow]) -> StepResult:
    """Run ``step(chunks, rows)`` (``rows``: one per sampling chunk, in order), isolating failures."""
    saved = [(row.generator, row.generator.get_state()) for row in rows if row.generator is not None]
    try:
        return StepResult(list(chunks), step(chunks, rows))
    except RunnerFailedError:
        raise
    except Exception as error:  # any failure is confined to the chunks that cause it
        if len(chunks) == 1:
            return StepResult([], SamplerOutput([], []), [(chunks[0], error)])
        logger.warning("model step of %d chunks failed (%r); isolating the failing requests", len(chunks), error)
    return _Bisection(step, chunks, rows, dict(saved)).result()


class _Bisection:
    def __init__(self, step: StepFn, chunks: Sequence[ScheduledChunk], rows: Sequence[SamplingRow],
                 saved: dict[torch.Generator | None, torch.Tensor]) -> None:
        self._step = step
        self._chunks = list(chunks)
        sampled = iter(rows)
        self._rows: list[SamplingRow | None] = [next(sampled) if c.samples else None for c in self._chunks]
        self._saved = saved
        self._sampled: dict[int, tuple[int, TokenLogprobs | None]] = {}
        self._failed: dict[int, BaseException] = {}

    def result(self) -> StepResult:
        n = len(self._chunks)
        self._split(list(range(n)))
        ok = [i for i in range(n) if i not in self._failed]
        picked = [self._sampled[i] for i in ok if self._rows[i] is not None]
        return StepResult([self._chunks[i] for i in ok],
                          SamplerOutput([t for t, _ in picked], [lp for _, lp in picked]),
                          [(self._chunks[i], self._failed[i]) for i in sorted(self._failed)])

    def _split(self, indices: list[int]) -> None:
        mid = len(indices) // 2
        self._attempt(indices[:mid])
        self._attempt(indices[mid:])

    def _attempt(self, indices: list[int]) -> None:
        rows = [row for row in (self._rows[i] for i in indices) if row is not None]
        for row in rows:
            if row.generator is not None:
                row.generator.set_state(self._saved[row.generator])
        try:
            output = self._step([self._chunks[i] for i in indices], rows)
        except RunnerFailedError:
            raise
        except Exception as error:
            if len(indices) == 1:
                self._failed[indices[0]] = error
            else:
                self._split(indices)
            return
        results = iter(zip(output.token_ids, output.logprobs, strict=True))
        for i in indices:
            if self._rows[i] is not None:
                self._sampled[i] = next(results)


def step_error(request_id: str, error: BaseException) -> StepFailedError:
    """The error a request's stream ends with when its chunk of a step raised alone."""
    failure = StepFailedError(f"model step failed for request {request_id}: {error!r}")
    failure.__cause__ = error
    return failure
