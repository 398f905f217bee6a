"""Continuous batching policy: which sequences run each step and with how many tokens. Pure Python.

Each step spends a token budget: running sequences first (oldest first; a decode costs one token, an
unfinished prefill a chunk), then waiting sequences are admitted in arrival order while sequence slots,
budget and KV blocks allow. When a running sequence needs a block and none is available, idle session
pins are evicted first, then the newest running sequence is preempted by recompute (its blocks are
released; it returns to the head of the queue and later re-admits through the prefix cache). Since
the oldest sequence is never the victim while a newer one runs, and any single admitted sequence fits
the whole pool, some sequence always progresses: the policy cannot deadlock.

With ``sliding_window`` set (a model whose every layer attends to the last ``sliding_window`` positions
only), a running sequence drops its references to the leading blocks that no later query can read
(``droppable_blocks``), so they return to the pool while it runs. Models with any global layer (Gemma 2/3
alternate sliding and global layers) keep every block: their global layers read the whole context.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from asyncllm.kv.block_manager import BlockManager
from asyncllm.kv.pins import PinnedKV, PinRegistry
from asyncllm.kv.prefix_cache import ROOT_KEY
from asyncllm.sequence import FinishReason, SequenceState, SequenceStatus


@dataclass(frozen=True)
class ScheduledChunk:
    """Run ``num_tokens`` tokens of ``seq`` starting at position ``start``; sample after iff ``samples``."""

    seq: SequenceState
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        return self.start + self.num_tokens == len(self.seq.token_ids) and not self.seq.flush_only


@dataclass
class SchedulerStep:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[SequenceState] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunks)

    def __bool__(self) -> bool:
        return bool(self.chunks)


def droppable_blocks(num_computed_tokens: int, window: int, block_size: int) -> int:
    """Leading blocks no later query reads: the next query sits at ``num_computed_tokens`` or later and sees
    keys after ``position - window``, so tokens ``<= num_computed_tokens - window`` are never read again."""
    return max(0, (num_computed_tokens - window + 1) // block_size)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Scheduler:
    """Owns the waiting queue and the running list; the engine feeds it requests and step results."""

    def __init__(
        self,
        blocks: BlockManager,
        pins: PinRegistry,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        sliding_window: int | None = None,
    ) -> None:
        if max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs: must be positive, got {max_num_seqs}")
        if max_num_batched_tokens <= 0:
            raise ValueError(f"max_num_batched_tokens: must be positive, got {max_num_batched_tokens}")
        self.blocks = blocks
        self.pins = pins
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        if sliding_window is not None and sliding_window <= 0:
            raise ValueError(f"sliding_window: must be positive or None, got {sliding_window}")
        self.sliding_window = sliding_window
        self.waiting: deque[SequenceState] = deque()
        self.running: list[SequenceState] = []
        self.num_preemptions = 0
        self._watermark = max(1, blocks.num_blocks // 100)

    # -- bookkeeping ---------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: SequenceState) -> None:
        if self.blocks.blocks_needed(seq.max_total_tokens) > self.blocks.num_blocks:
            raise ValueError(
                f"prompt: {len(seq.token_ids)} tokens plus max_tokens need "
                f"{self.blocks.blocks_needed(seq.max_total_tokens)} KV blocks; the pool has {self.blocks.num_blocks}"
            )
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: SequenceState, reason: FinishReason) -> None:
        """Remove ``seq``; its blocks are pinned for its session (if any and not aborted) or released."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.flush_only and reason != "abort" and seq.num_computed_tokens < len(seq.token_ids):
            raise ValueError("a flushing sequence can only be finished once its last token is computed")
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq.session_id is not None and reason != "abort" and seq.block_table and not seq.num_dropped_blocks:
            computed = seq.num_computed_tokens
            keys = seq.block_keys[: computed // self.blocks.block_size]
            self.pins.pin(seq.session_id, PinnedKV(seq.key_tokens(0, computed), seq.block_table, keys))
        else:
            self._release_blocks(seq)
        seq.block_table = []
        seq.block_keys = []

    def _release_blocks(self, seq: SequenceState) -> None:
        """Drop the references ``seq`` still holds (not those of its dropped leading blocks)."""
        self.blocks.release(seq.block_table[seq.num_dropped_blocks :])
        seq.num_dropped_blocks = 0

    def holders(self) -> list[list[int]]:
        """Every block table holding references: running and waiting sequences, then pins."""
        tables = [s.block_table[s.num_dropped_blocks :] for s in (*self.running, *self.waiting) if s.block_table]
        return tables + self.pins.tables()

    # -- the step ------------------------------------------------------------------------------
    def schedule(self) -> SchedulerStep:
        step = SchedulerStep()
        budget = self.max_num_batched_tokens
        queue = deque(self.running)
        kept: list[SequenceState] = []
        while queue and budget > 0:
            seq = queue.popleft()
            n = min(seq.num_uncomputed_tokens, budget)
            if n == 0:
                kept.append(seq)
                continue
            if not self._reserve(seq, seq.num_computed_tokens + n, queue, step):
                self._preempt(seq, step)
                break
            step.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            kept.append(seq)
            budget -= n
        self.running = kept + list(queue)
        if not step.preempted:
            budget = self._admit(step, budget)
        return step

    def _reserve(self, seq: SequenceState, num_tokens: int, victims: deque[SequenceState], step: SchedulerStep) -> bool:
        """Grow ``seq``'s table to cover ``num_tokens``, evicting pins then preempting the newest of ``victims``."""
        need = self.blocks.blocks_needed(num_tokens) - len(seq.block_table)
        while need > self.blocks.num_available:
            if self.pins.evict_lru():
                continue
            if not victims:
                return False
            self._preempt(victims.pop(), step)
        if need > 0:
            seq.block_table.extend(self.blocks.allocate(need))
        return True

    def _preempt(self, seq: SequenceState, step: SchedulerStep) -> None:
        self._release_blocks(seq)
        seq.block_table = []
        seq.block_keys = []
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.num_preemptions += 1
        step.preempted.append(seq)
        self.waiting.appendleft(seq)

    def _admit(self, step: SchedulerStep, budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            self._attach_cached_kv(seq)
            need = self.blocks.blocks_needed(len(seq.token_ids)) - len(seq.block_table)
            reserve = need + (self._watermark if self.running else 0)
            while reserve > self.blocks.num_available and self.pins.evict_lru():
                pass
            if reserve > self.blocks.num_available:
                self._detach(seq)
                break
            seq.block_table.extend(self.blocks.allocate(need))
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = seq.num_computed_tokens
            n = min(seq.num_uncomputed_tokens, budget)
            step.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            budget -= n
        return budget

    def _attach_cached_kv(self, seq: SequenceState) -> None:
        """Give a waiting ``seq`` the longest reusable KV: its session's pin, else the prefix cache.

        At least one token is always left to compute, so the step yields logits to sample from.
        """
        tokens = seq.key_tokens(0, len(seq.token_ids))
        limit = len(tokens) - 1
        size = self.blocks.block_size
        pinned = self.pins.take(seq.session_id) if seq.session_id is not None else None
        if pinned is not None:
            common = min(common_prefix_length(pinned.token_ids, tokens), limit)
            keep = self.blocks.blocks_needed(common)
            if common % size and self.blocks.is_cached(pinned.block_table[keep - 1]):
                keep -= 1  # never write into a block other requests may read through the prefix cache
                common = keep * size
            self.blocks.release(pinned.block_table[keep:])
            seq.block_table = pinned.block_table[:keep]
            seq.block_keys = pinned.block_keys[: common // size]
            seq.num_computed_tokens = common
        if len(seq.block_keys) * size < limit - size + 1:
            # extend through the prefix cache past what the pin covered (or from scratch)
            hits, keys = self._match_after(seq, limit)
            self.blocks.acquire(hits)
            seq.block_table.extend(hits)
            seq.block_keys.extend(keys)
            seq.num_computed_tokens = max(seq.num_computed_tokens, len(seq.block_keys) * size)

    def _match_after(self, seq: SequenceState, limit: int) -> tuple[list[int], list[int]]:
        size = self.blocks.block_size
        if len(seq.block_table) != len(seq.block_keys):
            return [], []  # a partial private block follows: the cache cannot extend past it
        start = len(seq.block_keys) * size
        hits, keys = self.blocks.match_prefix(
            seq.key_tokens(0, len(seq.token_ids)), start=start,
            parent_key=seq.block_keys[-1] if seq.block_keys else ROOT_KEY, max_tokens=limit,
        )
        return hits, keys

    def _detach(self, seq: SequenceState) -> None:
        self._release_blocks(seq)
        seq.block_table = []
        seq.block_keys = []
        seq.num_computed_tokens = 0

    def on_step_done(self, chunks: Iterable[ScheduledChunk]) -> None:
        """Mark the chunks' tokens as computed and index newly completed blocks in the prefix cache; with a
        sliding window, drop the blocks no later query reads."""
        size = self.blocks.block_size
        for chunk in chunks:
            seq = chunk.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            seq.num_computed_tokens = chunk.start + chunk.num_tokens
            full = seq.num_computed_tokens // size
            for i in range(len(seq.block_keys), full):
                parent = seq.block_keys[-1] if seq.block_keys else ROOT_KEY
                key = self.blocks.register_full_block(
                    seq.block_table[i], parent, seq.key_tokens(i * size, (i + 1) * size)
                )
                seq.block_keys.append(key)
            if self.sliding_window is not None:
                dead = min(droppable_blocks(seq.num_computed_tokens, self.sliding_window, size), full)
                if dead > seq.num_dropped_blocks:
                    self.blocks.release(seq.block_table[seq.num_dropped_blocks : dead])
                    seq.num_dropped_blocks = dead
