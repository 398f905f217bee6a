"""The transcripts of server-side sessions, kept where requests are routed so that a session can be
rebuilt on another replica when the one holding its KV goes away.

A record mirrors what the replica's ``Session`` holds: the seed messages of the first turn, then each
turn's user message and reply for the turns that finished with ``stop`` or ``length`` (the turns a
``Session`` records). ``home`` names the replica (and its incarnation) that holds the session's KV.

Invariants: at most ``max_sessions`` records are kept (the least recently used is dropped first); a record
unused for ``idle_timeout`` seconds is dropped when next looked up; records are keyed by
``(principal digest, session_id)``, so two API keys using the same id never share a transcript.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, Any]
TranscriptKey = tuple[str, str]
"""(digest of the request's credentials, session id)."""
Home = tuple[str, str]
"""(replica name, replica incarnation): where a session's KV lives."""

RECORDED_FINISH_REASONS = ("stop", "length")


@dataclass
class SessionRecord:
    messages: list[Message] = field(default_factory=list)
    home: Home | None = None
    last_used: float = 0.0


class TranscriptStore:
    """Bounded, idle-expiring session transcripts. ``clock``: monotonic seconds."""

    def __init__(self, *, max_sessions: int, idle_timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions: must be >= 1, got {max_sessions}")
        if not idle_timeout > 0:
            raise ValueError(f"idle_timeout: must be > 0 seconds, got {idle_timeout}")
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._records: OrderedDict[TranscriptKey, SessionRecord] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: TranscriptKey) -> SessionRecord | None:
        """The record of ``key``, or ``None`` (never kept, dropped, or idle past the timeout)."""
        record = self._records.get(key)
        if record is not None and self._clock() - record.last_used >= self.idle_timeout:
            del self._records[key]
            return None
        return record

    def place(self, key: TranscriptKey, messages: Sequence[Message], home: Home) -> None:
        """The session ``key`` now lives on ``home`` with the transcript ``messages``."""
        self._records[key] = SessionRecord([dict(m) for m in messages], home, self._clock())
        self._records.move_to_end(key)
        while len(self._records) > self.max_sessions:
            self._records.popitem(last=False)

    def record_turn(self, key: TranscriptKey, user: Message, reply: str, finish_reason: str | None) -> None:
        """Add a finished turn (only when ``finish_reason`` is one a session records)."""
        record = self._records.get(key)
        if record is None:
            return
        record.last_used = self._clock()
        self._records.move_to_end(key)
        if finish_reason in RECORDED_FINISH_REASONS:
            record.messages.append(dict(user))
            record.messages.append({"role": "assistant", "content": reply})

    def drop(self, key: TranscriptKey) -> None:
        self._records.pop(key, None)
