"""Session: a multi-turn chat whose KV blocks stay pinned between turns.

Each turn renders the whole transcript with the chat template and submits it; the scheduler reuses the
longest token prefix shared with the KV the session pinned at the end of its previous turn, so a turn
prefills only its new tokens (and wherever the template re-renders history differently, everything up
to the first differing token is still reused). Under memory pressure an idle session's pin is released
to the prefix cache; its next turn then recomputes whatever the cache no longer holds.

A vision-language model's turn may send content parts (``{"type": "text"}`` and ``{"type": "image"}``) instead
of a string; the transcript keeps the images, so later turns render them again and, the prefix cache keying
image tokens by their pixels, reuse their KV.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from asyncllm.outputs import Completion
from asyncllm.sampling import SamplingParams
from asyncllm.streams import RequestStream, TextStream

if TYPE_CHECKING:
    from asyncllm.engine import AsyncEngine, Message

Content = str | list[dict[str, Any]]
"""A user turn: a string, or content parts (``{"type": "text", "text": ...}``, ``{"type": "image", ...}``)."""

_session_ids = itertools.count()


class SessionBusyError(RuntimeError):
    """A session runs one turn at a time; a second concurrent turn raises this."""


class SessionClosedError(RuntimeError):
    """The session was closed."""


class Session:
    """A chat transcript plus the KV that backs it. Not safe to share between concurrent turns.

    ``messages`` holds the completed turns only: a turn is recorded when its reply finishes with
    ``"stop"`` or ``"length"``; an aborted or failed turn leaves the transcript unchanged.
    """

    def __init__(
        self, engine: AsyncEngine, *, system: str | None = None, messages: Sequence[Message] | None = None
    ) -> None:
        self._engine = engine
        self.id = f"session-{next(_session_ids)}-{id(self):x}"
        self._messages: list[Message] = []
        if system is not None:
            if not isinstance(system, str):
                raise ValueError("system: must be a str")
            self._messages.append({"role": "system", "content": system})
        for i, message in enumerate(messages or ()):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"messages[{i}]: must be a dict with 'role' and 'content'")
            self._messages.append(dict(message))
        self._busy = False
        self._closed = False
        engine.open_session(self.id)

    @property
    def messages(self) -> list[Message]:
        """A copy of the transcript."""
        return [dict(m) for m in self._messages]

    @property
    def busy(self) -> bool:
        return self._busy

    # -- turns ---------------------------------------------------------------------------------
    def stream(self, content: Content, *, params: SamplingParams | None = None, **sampling: Any) -> TextStream:
        """Send a user message (a string, or text and image content parts) and stream the reply as ``str``
        deltas."""
        return TextStream(self.stream_detailed(content, params=params, **sampling))

    def stream_detailed(
        self, content: Content, *, params: SamplingParams | None = None, **sampling: Any
    ) -> RequestStream:
        """Send a user message (a string, or a list of text and image parts) and stream ``StepOutput``s of
        the reply."""
        if self._closed:
            raise SessionClosedError(f"{self.id} is closed")
        if self._busy:
            raise SessionBusyError(f"{self.id} already has a turn in progress; await it before the next")
        if not content or not isinstance(content, (str, list)):
            raise ValueError("content: must be a non-empty str or list of content parts")
        sampling_params = SamplingParams.from_kwargs(params, **sampling)
        user = {"role": "user", "content": content if isinstance(content, str) else list(content)}
        token_ids, images = self._engine.encode_with_images([*self._messages, user])
        self._busy = True
        try:
            return self._engine.submit(
                token_ids, sampling_params, session_id=self.id, images=images,
                on_done=lambda completion: self._end_turn(user, completion),
            )
        except BaseException:
            self._busy = False
            raise

    async def send(self, content: Content, *, params: SamplingParams | None = None, **sampling: Any) -> Completion:
        """Send a user message and return the whole reply."""
        return await self.stream_detailed(content, params=params, **sampling).collect()

    def _end_turn(self, user: Message, completion: Completion | None) -> None:
        self._busy = False
        if completion is not None and completion.finish_reason in ("stop", "length"):
            self._messages.append(user)
            self._messages.append({"role": "assistant", "content": completion.text})

    # -- lifecycle -----------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the transcript (keeping a system message) and release the pinned KV."""
        if self._busy:
            raise SessionBusyError(f"{self.id} has a turn in progress")
        self._messages = [m for m in self._messages[:1] if m.get("role") == "system"]
        self._engine.release_session(self.id)

    async def close(self) -> None:
        """Release the session's KV; idempotent."""
        if not self._closed:
            self._closed = True
            await self._engine.close_session(self.id)

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
