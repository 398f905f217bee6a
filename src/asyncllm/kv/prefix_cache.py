"""Content-addressed index of full KV blocks, with LRU order over the evictable ones.

A block's key chains the key of the block before it with its own tokens, so a key names the whole
prefix. Keys are 64-bit, so every hit is verified against the stored tokens and parent key: walking a
prompt from its first block, a chain of verified hits proves the entire prefix matches.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

ROOT_KEY = 0x5EED


def chain_key(parent_key: int, tokens: Sequence[int]) -> int:
    """Key of a full block whose predecessor has ``parent_key`` (``ROOT_KEY`` for the first block)."""
    return hash((parent_key, tuple(tokens)))


@dataclass(frozen=True)
class CachedBlockInfo:
    key: int
    parent_key: int
    tokens: tuple[int, ...]


class PrefixCache:
    """Maps chained keys to block ids and keeps unreferenced cached blocks in LRU order.

    Invariants: ``key -> block`` and ``block -> info`` are inverse maps over registered blocks; every
    block in ``_evictable`` is registered. The block manager decides refcounts; this class only indexes.
    """

    def __init__(self) -> None:
        self._block_by_key: dict[int, int] = {}
        self._info_by_block: dict[int, CachedBlockInfo] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._info_by_block)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def lookup(self, parent_key: int, tokens: Sequence[int]) -> tuple[int, int] | None:
        """``(block_id, key)`` of a verified hit, else ``None``."""
        key = chain_key(parent_key, tokens)
        block = self._block_by_key.get(key)
        if block is None:
            return None
        info = self._info_by_block[block]
        if info.parent_key != parent_key or info.tokens != tuple(tokens):
            return None
        return block, key

    def register(self, block: int, parent_key: int, tokens: Sequence[int]) -> int:
        """Index a full block; returns its key. A key already held by another block stays with that one."""
        key = chain_key(parent_key, tokens)
        if key not in self._block_by_key and block not in self._info_by_block:
            self._block_by_key[key] = block
            self._info_by_block[block] = CachedBlockInfo(key, parent_key, tuple(tokens))
        return key

    def is_registered(self, block: int) -> bool:
        return block in self._info_by_block

    def is_evictable(self, block: int) -> bool:
        return block in self._evictable

    def mark_evictable(self, block: int) -> None:
        """The block's last reference went away: it becomes the most recently used evictable block."""
        self._evictable[block] = None
        self._evictable.move_to_end(block)

    def unmark_evictable(self, block: int) -> None:
        self._evictable.pop(block, None)

    def evict_lru(self) -> int | None:
        """Forget the least recently used evictable block and return its id (``None`` if there is none)."""
        if not self._evictable:
            return None
        block, _ = self._evictable.popitem(last=False)
        info = self._info_by_block.pop(block)
        del self._block_by_key[info.key]
        return block
