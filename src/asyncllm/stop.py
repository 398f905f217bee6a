"""Stop-string matching over a stream of text deltas.

A stop string may arrive split over any number of deltas, so the matcher holds back the longest tail of the
stream that could still grow into a stop string, and releases it once it cannot.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Filters a text stream so that no stop string, nor anything after one, is ever released.

    Invariants:
    - the concatenation of everything ``feed`` and ``flush`` return equals the concatenated input cut just
      before the first stop-string occurrence to complete: the one that ends earliest, and of those ending at
      the same character the one that starts earliest (the whole input when none occurs). This does not
      depend on how the input is split into pieces;
    - text is held back only while it is a proper prefix of some stop string, so at most
      ``max(len(s) for s in stop) - 1`` characters are held at any time;
    - once a stop string has matched, ``stopped`` is true and every later call returns ``""``.
    """

    def __init__(self, stop: Sequence[str] = ()) -> None:
        if isinstance(stop, str):
            raise ValueError("stop: must be a sequence of strings, not a single string")
        for index, candidate in enumerate(stop):
            if not isinstance(candidate, str):
                raise ValueError(f"stop[{index}]: must be a str, got {type(candidate).__name__}")
            if not candidate:
                raise ValueError(f"stop[{index}]: must be a non-empty string")
        self._stops: tuple[str, ...] = tuple(dict.fromkeys(stop))
        self._longest = max((len(s) for s in self._stops), default=0)
        self._held = ""
        self._matched: str | None = None

    @property
    def stopped(self) -> bool:
        """Whether a stop string has matched."""
        return self._matched is not None

    @property
    def matched(self) -> str | None:
        """The stop string that matched, or ``None``."""
        return self._matched

    @property
    def held(self) -> str:
        """Text received but not yet released because it may be the start of a stop string."""
        return self._held

    def feed(self, text: str) -> str:
        """Take the next piece of the stream; return the part of the stream that is now safe to release."""
        if self._matched is not None:
            return ""
        if not self._stops:
            return text
        buffer = self._held + text
        # A match not complete before this call starts inside the held tail: searching the buffer suffices.
        best: tuple[int, int] | None = None  # (end, start) of the first occurrence to complete
        for candidate in self._stops:
            start = buffer.find(candidate)
            if start >= 0 and (best is None or (start + len(candidate), start) < best):
                best, self._matched = (start + len(candidate), start), candidate
        if best is not None:
            self._held = ""
            return buffer[: best[1]]
        keep = self._partial_match_length(buffer)
        self._held = buffer[len(buffer) - keep:]
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """End of stream: release the held tail (it can no longer become a stop string)."""
        held, self._held = self._held, ""
        return "" if self._matched is not None else held

    def _partial_match_length(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of some stop string."""
        for length in range(min(len(buffer), self._longest - 1), 0, -1):
            suffix = buffer[len(buffer) - length:]
            if any(candidate.startswith(suffix) for candidate in self._stops):
                return length
        return 0
