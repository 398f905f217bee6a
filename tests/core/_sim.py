"""A torch-free stand-in for the model that checks the KV cache's contents, for scheduler tests.

Each slot stores a fingerprint of the whole token prefix written there; before a chunk runs, every
context position it will read must hold the fingerprint of the sequence's own prefix. So a wrong block
table, a bad prefix-cache hit or a block overwritten while shared is caught the moment it matters.
"""

from __future__ import annotations

from asyncllm.scheduler import ScheduledChunk, Scheduler


def fingerprint(tokens: list[int]) -> int:
    return hash(tuple(tokens))


def next_token(tokens: list[int], vocab: int = 5) -> int:
    """Deterministic toy 'model': depends on the context, so recompute must reproduce it."""
    return (sum(tokens[-3:]) * 31 + len(tokens)) % vocab


class SimulatedKV:
    """``window``: the model attends to the last ``window`` positions only, so a chunk reads (and must find
    intact) only those before its first token."""

    def __init__(self, block_size: int, window: int | None = None) -> None:
        self.block_size = block_size
        self.window = window
        self.slots: dict[int, int] = {}

    def slot(self, table: list[int], position: int) -> int:
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def run(self, chunks: list[ScheduledChunk]) -> None:
        for chunk in chunks:
            seq = chunk.seq
            first = 0 if self.window is None else max(0, chunk.start - self.window + 1)
            for p in range(first, chunk.start):
                found = self.slots.get(self.slot(seq.block_table, p))
                if found != fingerprint(seq.token_ids[: p + 1]):
                    raise AssertionError(f"{seq.request_id}: KV at position {p} is not this sequence's")
            for p in range(chunk.start, chunk.start + chunk.num_tokens):
                self.slots[self.slot(seq.block_table, p)] = fingerprint(seq.token_ids[: p + 1])


def run_step(scheduler: Scheduler, kv: SimulatedKV) -> list[ScheduledChunk]:
    """One scheduler step against the simulated model; returns the chunks that sampled."""
    step = scheduler.schedule()
    kv.run(step.chunks)
    scheduler.on_step_done(step.chunks)
    sampled = [chunk for chunk in step.chunks if chunk.samples]
    for chunk in sampled:
        chunk.seq.token_ids.append(next_token(chunk.seq.token_ids))
    return sampled
