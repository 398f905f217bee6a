"""Server-side chat sessions keyed by a client-chosen id, with an idle timeout and caps.

Invariants: at most ``max_sessions`` sessions are open in all, and at most ``max_sessions_per_key`` for one
principal (one API key); a session is only ever closed while no turn is in progress; making room for a new
session evicts an idle session of the same principal first, and another principal's idle session only when
the global cap forces it; the id of a session that ended without the client asking (idle timeout or eviction to make
room) is remembered (up to ``max_tombstones`` ids, one pool for every principal: a principal that ends
thousands of sessions can push out another's oldest remembered ids) so that a later turn on it is told
the context is gone instead of silently starting over. An id the client deleted may be reused for a new session.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass

from asyncllm.engine import AsyncEngine, Message
from asyncllm.session import Session, SessionBusyError

SessionKey = tuple[Hashable, str]
"""(the client's principal, e.g. the index of its API key, and the session id it chose)."""


class SessionGoneError(LookupError):
    """The session ended on the server (idle timeout or eviction); its context is lost."""


class SessionLimitError(RuntimeError):
    """The cap that applies is reached and every session under it has a turn in progress, so none can make
    room for a new one."""


@dataclass
class _Entry:
    session: Session
    last_used: float


class SessionRegistry:
    """Open sessions of one app. ``clock`` is monotonic seconds (injectable for tests)."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        max_sessions: int,
        idle_timeout: float,
        max_sessions_per_key: int | None = None,
        max_tombstones: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions: must be >= 1, got {max_sessions}")
        if max_sessions_per_key is not None and max_sessions_per_key < 1:
            raise ValueError(f"max_sessions_per_key: must be >= 1 or None, got {max_sessions_per_key}")
        if not idle_timeout > 0:
            raise ValueError(f"idle_timeout: must be > 0 seconds, got {idle_timeout}")
        if max_tombstones < 0:
            raise ValueError(f"max_tombstones: must be >= 0, got {max_tombstones}")
        self._engine = engine
        self.max_sessions = max_sessions
        self.max_sessions_per_key = min(max_sessions_per_key or max_sessions, max_sessions)
        self.idle_timeout = idle_timeout
        self._max_tombstones = max_tombstones
        self._clock = clock
        self._open: OrderedDict[SessionKey, _Entry] = OrderedDict()  # least recently used first
        self._by_principal: dict[Hashable, OrderedDict[SessionKey, None]] = {}  # same order, per principal
        self._gone: OrderedDict[SessionKey, None] = OrderedDict()
        self._to_close: list[Session] = []

    def __len__(self) -> int:
        return len(self._open)

    def count(self, principal: Hashable) -> int:
        """Open sessions of one principal."""
        return len(self._by_principal.get(principal, ()))

    def get(self, key: SessionKey) -> Session | None:
        """The open session for ``key``, ``None`` if there is none; ``SessionGoneError`` if it expired."""
        if key in self._gone:
            raise SessionGoneError(key[1])
        entry = self._open.get(key)
        return None if entry is None else entry.session

    def create(self, key: SessionKey, messages: Sequence[Message]) -> Session:
        """Open a session seeded with ``messages``, making room under the caps first.

        At its principal's cap, the principal's least recently used idle session is evicted. At the global
        cap, the principal's least recently used idle session is evicted if it has one, else the least
        recently used idle session of any principal. A session with a turn in progress is never evicted:
        when no idle session may make room, ``SessionLimitError``. Evicted sessions are closed by the next
        ``flush()``.
        """
        if key in self._open:
            raise ValueError(f"session_id: {key[1]!r} is already open")
        principal = key[0]
        own = self._by_principal.get(principal, OrderedDict())
        victim: SessionKey | None = None
        if len(own) >= self.max_sessions_per_key:
            victim = self._idle_lru(own)
            if victim is None:
                raise SessionLimitError(f"all {self.max_sessions_per_key} sessions of this API key have a "
                                        f"turn in progress")
        elif len(self._open) >= self.max_sessions:
            victim = self._idle_lru(own)
            if victim is None:
                victim = self._idle_lru(self._open)
            if victim is None:
                raise SessionLimitError(f"all {self.max_sessions} sessions have a turn in progress")
        if victim is not None:
            self._end(victim, expired=True)
        session: Session = self._engine.session(messages=list(messages))
        self._gone.pop(key, None)
        self._open[key] = _Entry(session, self._clock())
        self._by_principal.setdefault(principal, OrderedDict())[key] = None
        return session

    def _idle_lru(self, keys: Iterable[SessionKey]) -> SessionKey | None:
        return next((k for k in keys if not self._open[k].session.busy), None)

    def discard(self, key: SessionKey) -> None:
        """Forget a session that never ran a turn (its first turn was rejected)."""
        entry = self._open.pop(key, None)
        if entry is not None:
            self._forget(key)
            self._to_close.append(entry.session)

    def touch(self, key: SessionKey) -> None:
        entry = self._open.get(key)
        if entry is not None:
            entry.last_used = self._clock()
            self._open.move_to_end(key)
            self._by_principal[key[0]].move_to_end(key)

    async def close(self, key: SessionKey) -> bool:
        """Close a session the client asked to end; ``False`` if it is not open. A session with a turn in
        progress is not closed: ``SessionBusyError``."""
        entry = self._open.get(key)
        if entry is None:
            return False
        if entry.session.busy:
            raise SessionBusyError(f"session {key[1]!r} has a turn in progress")
        self._end(key, expired=False)
        await self.flush()
        return True

    async def sweep(self) -> int:
        """Close idle sessions past the timeout; returns how many ended."""
        now = self._clock()
        stale = [k for k, e in self._open.items()
                 if not e.session.busy and now - e.last_used >= self.idle_timeout]
        for key in stale:
            self._end(key, expired=True)
        await self.flush()
        return len(stale)

    async def flush(self) -> None:
        """Release the KV of sessions ended since the last flush."""
        while self._to_close:
            await self._to_close.pop().close()

    async def aclose(self) -> None:
        for key in list(self._open):
            self._end(key, expired=False)
        await self.flush()

    def _end(self, key: SessionKey, *, expired: bool) -> None:
        entry = self._open.pop(key)
        self._forget(key)
        self._to_close.append(entry.session)
        if expired and self._max_tombstones:
            self._gone[key] = None
            while len(self._gone) > self._max_tombstones:
                self._gone.popitem(last=False)

    def _forget(self, key: SessionKey) -> None:
        own = self._by_principal[key[0]]
        del own[key]
        if not own:
            del self._by_principal[key[0]]
