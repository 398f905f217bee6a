"""The line handling of ``asyncllm chat``: slash commands, streamed replies, and stopping a reply.

``ChatConsole.handle(line)`` is the whole behaviour of one input line, with the terminal left out: the
replies go to ``out``, the notices and errors to ``err``. ``asyncllm.cli`` feeds it lines read with
``input()`` (line editing and history through ``readline`` where the platform has it) and calls
``interrupt()`` on Ctrl-C, which stops the reply in progress and keeps the chat going.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from asyncllm.engine import AsyncEngine
    from asyncllm.session import Session

HELP = """commands:
  /help           this list
  /system TEXT    set the system message (the conversation so far is kept)
  /reset          clear the conversation (the system message stays)
  /save FILE      write the transcript to FILE as JSON chat messages
  /load FILE      continue the transcript saved in FILE
  /stats          tokens, cached tokens and speed of the last reply
  /exit           quit (also Ctrl-D)
Ctrl-C stops a reply in progress. A line that starts with '//' is sent as a message starting with '/'.
Several lines as one message: begin the first with three double quotes and end the last with them
(a terminal's bracketed paste also sends a pasted block as one message)."""

FENCE = '"""'
PROMPT = "> "
CONTINUATION_PROMPT = "... "


@dataclass(frozen=True)
class ReplyStats:
    """What ``/stats`` reports about the last reply."""

    prompt_tokens: int | None  # None for a stopped reply: its usage never arrived
    cached_tokens: int | None
    completion_tokens: int
    seconds: float
    stopped: bool

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        text = (f"last reply: {self.completion_tokens} tokens in {self.seconds:.2f} s "
                f"({self.tokens_per_second:.1f} tok/s){' (stopped)' if self.stopped else ''}")
        if self.prompt_tokens is not None:
            text += f"; prompt {self.prompt_tokens} tokens, {self.cached_tokens} of them cached"
        return text


def _load_messages(path: str) -> list[dict[str, str]]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in data
    ):
        raise ValueError("expected a JSON list of {\"role\": ..., \"content\": ...} messages")
    return [{"role": m["role"], "content": m["content"]} for m in data]


class ChatConsole:
    """One terminal conversation over ``engine``: ``await handle(line)`` per input line (``False`` means
    quit), ``interrupt()`` from a signal handler, ``await close()`` at the end."""

    def __init__(self, engine: AsyncEngine, *, system: str | None = None, sampling: dict[str, Any] | None = None,
                 out: TextIO, err: TextIO, verbose: bool = False) -> None:
        self.engine = engine
        self.sampling = dict(sampling or {})
        self.out = out
        self.err = err
        self.verbose = verbose
        self.chat: Session = engine.session(system=system)
        self.last: ReplyStats | None = None
        self._reply: asyncio.Task[None] | None = None
        self._interrupted = False
        self._block: list[str] | None = None  # the lines of a ``FENCE`` message not yet closed

    @property
    def prompt(self) -> str:
        """What to prompt the next line with: ``PROMPT``, or ``CONTINUATION_PROMPT`` inside a ``FENCE`` block."""
        return PROMPT if self._block is None else CONTINUATION_PROMPT

    async def close(self) -> None:
        await self.chat.close()

    def interrupt(self) -> bool:
        """Stop the reply in progress (``True``), or do nothing when there is none (``False``)."""
        if self._reply is None or self._reply.done():
            return False
        self._interrupted = True
        self._reply.cancel()
        return True

    def _note(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()

    async def _replace_session(self, messages: list[dict[str, str]]) -> None:
        new = self.engine.session(messages=messages)
        await self.chat.close()
        self.chat = new

    async def handle(self, line: str) -> bool:
        """Act on one input line: a command, or a message whose reply is streamed to ``out``. A line holding
        several lines (a bracketed paste) is one message; so are the lines between ``FENCE`` marks."""
        if self._block is not None or line.lstrip().startswith(FENCE):
            return await self._fenced(line)
        text = line.strip()
        if not text:
            return True
        if text.startswith("/") and not text.startswith("//"):
            return await self._command(text)
        await self._send(text[1:] if text.startswith("//") else text)
        return True

    async def _fenced(self, line: str) -> bool:
        """Collect the lines of a ``FENCE`` block; send them as one message once the block closes."""
        if self._block is None:
            line = line.lstrip()[len(FENCE):]
            self._block = []
        closed = line.rstrip().endswith(FENCE)
        self._block.append(line.rstrip()[: -len(FENCE)] if closed else line)
        if not closed:
            return True
        text, self._block = "\n".join(self._block).strip(), None
        if text:
            await self._send(text)
        return True

    async def _command(self, text: str) -> bool:
        name, _, rest = text.partition(" ")
        rest = rest.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            self._note(HELP)
        elif name == "/reset":
            self.chat.reset()
            self._note("(conversation cleared)")
        elif name == "/system":
            if not rest:
                system = next((m["content"] for m in self.chat.messages if m["role"] == "system"), None)
                self._note(f"system: {system!r}" if system is not None
                           else "(no system message; /system TEXT sets one)")
                return True
            turns = [m for m in self.chat.messages if m["role"] != "system"]
            await self._replace_session([{"role": "system", "content": rest}, *turns])
            self._note("(system message set)")
        elif name == "/save":
            if not rest:
                self._note("error: /save needs a file name")
                return True
            try:
                Path(rest).write_text(json.dumps(self.chat.messages, indent=2, ensure_ascii=False) + "\n",
                                      encoding="utf-8")
            except OSError as error:
                self._note(f"error: /save: {error}")
                return True
            self._note(f"(saved {len(self.chat.messages)} messages to {rest})")
        elif name == "/load":
            if not rest:
                self._note("error: /load needs a file name")
                return True
            try:
                messages = _load_messages(rest)
            except (OSError, ValueError) as error:
                self._note(f"error: /load {rest}: {error}")
                return True
            await self._replace_session(messages)
            self._note(f"(loaded {len(messages)} messages from {rest})")
        elif name == "/stats":
            self._note(str(self.last) if self.last is not None else "(no reply yet)")
        else:
            self._note(f"error: unknown command {name}; /help lists the commands")
        return True

    async def _send(self, text: str) -> None:
        self._reply = asyncio.ensure_future(self._stream_reply(text))
        try:
            await self._reply
        except asyncio.CancelledError:
            if not self._interrupted:
                raise  # this task itself is cancelled, not just the reply
        finally:
            self._reply = None
            self._interrupted = False

    async def _stream_reply(self, text: str) -> None:
        start = time.perf_counter()
        stream = self.chat.stream_detailed(text, **self.sampling)
        tokens = 0
        try:
            async for out in stream:
                tokens += len(out.token_ids)
                self.out.write(out.text)
                self.out.flush()
        except asyncio.CancelledError:
            await stream.aclose()  # aborts the request; the turn is left out of the transcript
            self.out.write("\n")
            self.out.flush()
            self._note("(reply stopped)")
            self.last = ReplyStats(None, None, tokens, time.perf_counter() - start, stopped=True)
            raise
        self.out.write("\n")
        self.out.flush()
        usage = stream.completion.usage if stream.completion is not None else None
        if usage is not None:
            self.last = ReplyStats(usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens,
                                   time.perf_counter() - start, stopped=False)
            if self.verbose:
                self._note(f"[prompt {usage.prompt_tokens} tokens, {usage.cached_tokens} reused from the "
                           f"session; completion {usage.completion_tokens}]")
