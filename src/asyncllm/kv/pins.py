"""KV kept alive between the turns of a session: pinned block tables, evictable under memory pressure."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field

from asyncllm.kv.block_manager import BlockManager


@dataclass
class PinnedKV:
    """A block table whose first ``len(token_ids)`` slots hold the KV of ``token_ids``.

    ``block_keys[i]`` is the chained prefix-cache key of full block ``i`` (only full blocks have keys).
    The pin owns one reference to every block in ``block_table``.
    """

    token_ids: list[int]
    block_table: list[int]
    block_keys: list[int] = field(default_factory=list)


class PinRegistry:
    """Pinned KV per owner (a session), least recently pinned first when memory runs short.

    Invariant: every pinned table holds exactly one reference to each of its blocks; ``take`` hands that
    reference to the caller, ``release``/``evict_lru`` return it to the block manager (full cached blocks
    stay reusable through the prefix cache). Only open owners hold pins: pinning for an owner that was
    never opened or is already closed releases the blocks at once, so a turn that ends after its session
    closed cannot leak.
    """

    def __init__(self, blocks: BlockManager) -> None:
        self._blocks = blocks
        self._pins: OrderedDict[Hashable, PinnedKV] = OrderedDict()
        self._open: set[Hashable] = set()

    def open(self, owner: Hashable) -> None:
        self._open.add(owner)

    def close(self, owner: Hashable) -> None:
        """Release the owner's pin and refuse its future pins."""
        self._open.discard(owner)
        self.release(owner)

    def __len__(self) -> int:
        return len(self._pins)

    def __contains__(self, owner: Hashable) -> bool:
        return owner in self._pins

    def owners(self) -> list[Hashable]:
        return list(self._pins)

    def tables(self) -> list[list[int]]:
        return [pin.block_table for pin in self._pins.values()]

    def pin(self, owner: Hashable, kv: PinnedKV) -> bool:
        """Keep ``kv`` for ``owner`` (replacing an older pin); ``False`` and released if ``owner`` is closed."""
        if owner in self._pins:
            self.release(owner)
        if owner not in self._open:
            self._blocks.release(kv.block_table)
            return False
        self._pins[owner] = kv
        return True

    def take(self, owner: Hashable) -> PinnedKV | None:
        return self._pins.pop(owner, None)

    def release(self, owner: Hashable) -> None:
        kv = self._pins.pop(owner, None)
        if kv is not None:
            self._blocks.release(kv.block_table)

    def evict_lru(self) -> bool:
        """Release the least recently pinned table; ``False`` when nothing is pinned."""
        if not self._pins:
            return False
        _, kv = self._pins.popitem(last=False)
        self._blocks.release(kv.block_table)
        return True
