"""Paged KV block accounting: allocation, refcounts, prefix reuse and eviction. Pure Python.

Every block is in exactly one state:
- free: refcount 0, not indexed; in ``_free``;
- cached: refcount 0, indexed by the prefix cache, evictable in LRU order;
- referenced: refcount >= 1, held by that many block tables (running requests and pinned sessions).
``num_available`` counts free plus cached blocks: all of them can be handed out, cached ones by eviction.

Free blocks are handed out most recently freed first, never-used blocks in id order after them, so a
workload touches as few distinct blocks as it can (a CPU pool's memory is committed page by page as
blocks are first written; see ``kernels.kv_cache.lazily_committed_zeros``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from asyncllm.kv.prefix_cache import ROOT_KEY, PrefixCache


class OutOfBlocks(RuntimeError):
    """Raised when an allocation cannot be satisfied even after evicting every cached block."""


class BlockManager:
    """Owns the refcount of every block of one KV pool of ``num_blocks`` blocks of ``block_size`` tokens."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks: must be positive, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size: must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._cache = PrefixCache()

    # -- queries -------------------------------------------------------------------------------
    @property
    def num_available(self) -> int:
        """Blocks that an allocation can obtain now (free, or cached and evictable)."""
        return len(self._free) + self._cache.num_evictable

    @property
    def num_evictable_cached(self) -> int:
        """Unreferenced blocks kept for prefix reuse."""
        return self._cache.num_evictable

    @property
    def num_referenced(self) -> int:
        return self.num_blocks - self.num_available

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def is_cached(self, block: int) -> bool:
        return self._cache.is_registered(block)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix matching -----------------------------------------------------------------------
    def match_prefix(
        self, token_ids: Sequence[int], *, max_tokens: int, start: int = 0, parent_key: int = ROOT_KEY
    ) -> tuple[list[int], list[int]]:
        """Longest run of verified cached full blocks from token ``start`` (a block boundary whose
        preceding block has key ``parent_key``) covering at most ``max_tokens`` leading tokens.

        Returns ``(block_ids, keys)``; nothing is referenced yet (see ``acquire``).
        """
        blocks: list[int] = []
        keys: list[int] = []
        if not self.enable_prefix_caching:
            return blocks, keys
        if start % self.block_size:
            raise ValueError(f"start: must be a multiple of block_size={self.block_size}, got {start}")
        parent = parent_key
        size = self.block_size
        for begin in range(start, max_tokens - size + 1, size):
            hit = self._cache.lookup(parent, token_ids[begin : begin + size])
            if hit is None:
                break
            block, parent = hit
            blocks.append(block)
            keys.append(parent)
        return blocks, keys

    def acquire(self, blocks: Sequence[int]) -> None:
        """Add one reference to each block (cached ones stop being evictable)."""
        for block in blocks:
            if self._ref_counts[block] == 0:
                if not self._cache.is_registered(block):
                    raise ValueError(f"block {block} is free; only cached or referenced blocks can be acquired")
                self._cache.unmark_evictable(block)
            self._ref_counts[block] += 1

    # -- allocation ----------------------------------------------------------------------------
    def allocate(self, count: int) -> list[int]:
        """``count`` fresh blocks with refcount 1, evicting LRU cached blocks when the free list runs dry."""
        if count > self.num_available:
            raise OutOfBlocks(f"need {count} blocks, {self.num_available} available")
        out: list[int] = []
        for _ in range(count):
            if self._free:
                block = self._free.popleft()
            else:
                evicted = self._cache.evict_lru()
                if evicted is None:  # unreachable: num_available was checked
                    raise OutOfBlocks("prefix cache reported evictable blocks it does not have")
                block = evicted
            self._ref_counts[block] = 1
            out.append(block)
        return out

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference from each block, last block first so that chain tails are evicted first."""
        for block in reversed(blocks):
            count = self._ref_counts[block]
            if count <= 0:
                raise ValueError(f"block {block} released more often than acquired")
            self._ref_counts[block] = count - 1
            if count == 1:
                if self._cache.is_registered(block):
                    self._cache.mark_evictable(block)
                else:
                    self._free.appendleft(block)  # reused first: its memory is already committed

    def register_full_block(self, block: int, parent_key: int, tokens: Sequence[int]) -> int:
        """Index a referenced, completely written block for reuse; returns its chained key."""
        if len(tokens) != self.block_size:
            raise ValueError(f"tokens: a full block has {self.block_size} tokens, got {len(tokens)}")
        if not self.enable_prefix_caching:
            return 0
        return self._cache.register(block, parent_key, tokens)

    def check_invariants(self, holders: Sequence[Sequence[int]]) -> None:
        """Raise ``AssertionError`` unless refcounts equal the number of ``holders`` tables holding each
        block and every block is in exactly one state. Used by tests."""
        expected = [0] * self.num_blocks
        for table in holders:
            for block in table:
                expected[block] += 1
        if expected != self._ref_counts:
            raise AssertionError("refcounts do not match the block tables holding the blocks")
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a block is on the free list twice")
        for block in range(self.num_blocks):
            states = [block in free, self._cache.is_evictable(block), self._ref_counts[block] > 0]
            if sum(states) != 1:
                raise AssertionError(f"block {block} is in {sum(states)} states")
            if self._cache.is_evictable(block) and not self._cache.is_registered(block):
                raise AssertionError(f"evictable block {block} is not indexed")
