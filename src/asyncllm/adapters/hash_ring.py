"""A consistent-hash ring: which member owns a key.

Each member sits at ``points`` pseudo-random positions on a 64-bit ring (BLAKE2b of ``"member#i"``); a key
belongs to the first member clockwise from the key's own hash. Invariants: the owner of a key depends only
on the key and the set of members (not on the order they were added); adding a member moves only keys that
the new member now owns, and removing one moves only the keys it owned; ``owner(key, exclude)`` is the
owner on the ring without the excluded members.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Collection, Iterable

DEFAULT_POINTS = 64
"""Positions per member: enough that each of a few members owns close to its fair share of keys."""


def ring_hash(text: str) -> int:
    """A stable 64-bit hash of ``text`` (the same in every process, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


class HashRing:
    """Members (strings) on a consistent-hash ring."""

    def __init__(self, members: Iterable[str] = (), *, points: int = DEFAULT_POINTS) -> None:
        if points < 1:
            raise ValueError(f"points: must be >= 1, got {points}")
        self._points = points
        self._members: set[str] = set()
        self._positions: list[tuple[int, str]] = []  # sorted by (hash, member)
        for member in members:
            self.add(member)

    @property
    def members(self) -> frozenset[str]:
        return frozenset(self._members)

    def __contains__(self, member: object) -> bool:
        return member in self._members

    def __len__(self) -> int:
        return len(self._members)

    def add(self, member: str) -> None:
        """Put ``member`` on the ring (no change if it is there)."""
        if member in self._members:
            return
        self._members.add(member)
        for i in range(self._points):
            bisect.insort(self._positions, (ring_hash(f"{member}#{i}"), member))

    def remove(self, member: str) -> None:
        """Take ``member`` off the ring (no change if it is not there)."""
        if member not in self._members:
            return
        self._members.discard(member)
        self._positions = [p for p in self._positions if p[1] != member]

    def owner(self, key: str, exclude: Collection[str] = ()) -> str | None:
        """The member owning ``key`` among those not in ``exclude``; ``None`` when there is none."""
        if not self._members or self._members <= set(exclude):
            return None
        start = bisect.bisect_left(self._positions, (ring_hash(key), ""))
        count = len(self._positions)
        for step in range(count):
            member = self._positions[(start + step) % count][1]
            if member not in exclude:
                return member
        return None
