"""Per-request output channels and the async iterators handed to callers.

The engine loop is the only producer and never waits on a consumer: outputs that arrive while the
consumer is busy are merged into one pending ``StepOutput``. Closing or dropping an unfinished stream
aborts its request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from asyncllm.event_loop import LoopHandle, Signal
from asyncllm.outputs import Completion, StepOutput, Usage
from asyncllm.sampling import TokenLogprobs
from asyncllm.sequence import FinishReason


def call_in_loop(loop: LoopHandle | None, fn: Callable[..., object], *args: object) -> None:
    """Call ``fn(*args)`` at once when running in ``loop``, else schedule it there (thread-safe); do nothing
    when ``loop`` is ``None`` or closed."""
    if loop is not None:
        loop.call_soon_threadsafe(fn, *args)


class OutputChannel:
    """Single-producer, single-consumer buffer of one request's outputs; ``push`` never blocks."""

    def __init__(self, request_id: str, *, keep_logprobs: bool) -> None:
        self.request_id = request_id
        self._keep_logprobs = keep_logprobs
        self._event = Signal()
        self._token_ids: list[int] = []
        self._text: list[str] = []
        self._logprobs: list[TokenLogprobs] = []
        self._finish_reason: FinishReason | None = None
        self._usage: Usage | None = None
        self._error: BaseException | None = None
        self._closed = False

    @property
    def finished(self) -> bool:
        return self._finish_reason is not None or self._error is not None

    def push(
        self,
        token_ids: list[int],
        text: str,
        logprobs: list[TokenLogprobs] | None = None,
        finish_reason: FinishReason | None = None,
        usage: Usage | None = None,
    ) -> None:
        self._token_ids.extend(token_ids)
        if text:
            self._text.append(text)
        if self._keep_logprobs and logprobs:
            self._logprobs.extend(logprobs)
        if finish_reason is not None:
            self._finish_reason = finish_reason
            self._usage = usage
        self._event.set()

    def fail(self, error: BaseException) -> None:
        if not self.finished:
            self._error = error
            self._event.set()

    async def get(self) -> StepOutput:
        """Next coalesced output; raises ``StopAsyncIteration`` after the final one, or the failure."""
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._token_ids or self._text or self._finish_reason is not None:
                out = StepOutput(
                    request_id=self.request_id,
                    token_ids=self._token_ids,
                    text="".join(self._text),
                    logprobs=self._logprobs if self._keep_logprobs else None,
                    finish_reason=self._finish_reason,
                    usage=self._usage,
                )
                self._token_ids, self._text, self._logprobs = [], [], []
                if self._finish_reason is not None:
                    self._closed = True
                return out
            if self._error is not None:
                self._closed = True
                raise self._error
            self._event.clear()
            await self._event.wait()


class RequestStream:
    """Async iterator over a request's ``StepOutput``s. ``aclose()`` (or dropping it) aborts the request.

    After the final output, ``completion`` holds the whole result.
    """

    def __init__(
        self,
        channel: OutputChannel,
        abort: Callable[[str], None],
        start: Callable[[], Awaitable[None]],
        on_done: Callable[[Completion | None], None] | None = None,
    ) -> None:
        self._channel = channel
        self._abort = abort
        self._start = start
        self._on_done = on_done
        self._started = False
        self._done = False
        self._token_ids: list[int] = []
        self._text: list[str] = []
        self._logprobs: list[TokenLogprobs] = []
        self.completion: Completion | None = None

    @property
    def request_id(self) -> str:
        return self._channel.request_id

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StepOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            if not self._started:
                self._started = True
                await self._start()
            out = await self._channel.get()
        except BaseException:
            await self.aclose()
            raise
        self._token_ids.extend(out.token_ids)
        self._text.append(out.text)
        if out.logprobs:
            self._logprobs.extend(out.logprobs)
        if out.finish_reason is not None:
            self._done = True
            if out.usage is None:
                raise RuntimeError("engine invariant broken: final output without usage")
            self.completion = Completion(
                request_id=self.request_id,
                text="".join(self._text),
                token_ids=self._token_ids,
                finish_reason=out.finish_reason,
                usage=out.usage,
                logprobs=self._logprobs if out.logprobs is not None else None,
            )
            self._done_callback(self.completion)
        return out

    def _done_callback(self, completion: Completion | None) -> None:
        callback, self._on_done = self._on_done, None
        if callback is not None:
            callback(completion)

    async def aclose(self) -> None:
        """Abort the request if it has not finished; idempotent."""
        if not self._done:
            self._done = True
            if self._started and not self._channel.finished:
                self._abort(self.request_id)
        self._done_callback(None)

    def __del__(self) -> None:
        if not self._done:
            self._done = True
            if self._started:
                self._abort(self.request_id)
        self._done_callback(None)

    async def collect(self) -> Completion:
        """Drain the stream and return the finished completion."""
        async for _ in self:
            pass
        if self.completion is None:
            raise RuntimeError("stream ended without a completion")
        return self.completion


class TextStream:
    """Async iterator of ``str`` deltas over a ``RequestStream``; empty deltas are skipped."""

    def __init__(self, inner: RequestStream) -> None:
        self._inner = inner

    @property
    def request_id(self) -> str:
        return self._inner.request_id

    @property
    def completion(self) -> Completion | None:
        return self._inner.completion

    def __aiter__(self) -> TextStream:
        return self

    async def __anext__(self) -> str:
        while True:
            out = await self._inner.__anext__()
            if out.text:
                return out.text

    async def aclose(self) -> None:
        await self._inner.aclose()
