"""Running the engine streams of one API request (its ``n`` choices) into a response or an event stream.

Invariants: every stream of a request is closed (aborting its engine request if unfinished) when the
response completes, fails, or is abandoned by the client; every choice's ``RequestTimer`` is ended exactly
once; ``on_end`` runs exactly once, after the streams are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from asyncllm.adapters.asgi_io import DONE
from asyncllm.adapters.errors import SERVER_ERROR, APIError, from_value_error, unavailable
from asyncllm.adapters.openai_format import Choice, Json, ResponseFormatter
from asyncllm.adapters.server_metrics import RequestTimer
from asyncllm.engine import EngineClosedError
from asyncllm.outputs import StepOutput, Usage
from asyncllm.session import SessionBusyError
from asyncllm.streams import RequestStream

logger = logging.getLogger("asyncllm.adapters")


def api_error_of(error: BaseException, renames: dict[str, str] | None = None) -> APIError:
    """The client-facing error for an exception raised while serving a request."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, EngineClosedError):
        return unavailable(f"the engine is not running: {error}", "engine_unavailable")
    if isinstance(error, SessionBusyError):
        return APIError(409, str(error), param="session_id", code="session_busy")
    if isinstance(error, ValueError):
        return from_value_error(error, renames)
    logger.error("request failed", exc_info=error)
    return APIError(500, f"internal error: {type(error).__name__}", type=SERVER_ERROR, code="internal_error")


async def merge_streams(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, StepOutput]]:
    """``(choice index, output)`` pairs from several streams in arrival order; closes every stream on exit."""
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            await streams[0].aclose()
        return
    pending: dict[asyncio.Future[StepOutput], int] = {}
    try:
        for index, stream in enumerate(streams):
            pending[asyncio.ensure_future(stream.__anext__())] = index
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in sorted(done, key=lambda f: pending[f]):
                index = pending.pop(future)
                try:
                    out = future.result()
                except StopAsyncIteration:
                    continue
                yield index, out
                if out.finish_reason is None:
                    pending[asyncio.ensure_future(streams[index].__anext__())] = index
    finally:
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


@dataclass
class RunningRequest:
    """The engine side of one API request: one stream and one timer per choice."""

    streams: list[RequestStream]
    timers: list[RequestTimer]
    formatter: ResponseFormatter
    include_usage: bool = False
    renames: dict[str, str] = field(default_factory=dict)
    on_end: Callable[[], None] | None = None

    def _end(self, reason: str) -> None:
        for timer in self.timers:
            timer.end(reason)
        callback, self.on_end = self.on_end, None
        if callback is not None:
            callback()

    async def complete(self) -> Json:
        """Run every choice to the end and return the whole response body."""
        n = len(self.streams)
        usages: list[Usage | None] = [None] * n
        reason = "error"
        try:
            async with contextlib.aclosing(merge_streams(self.streams)) as outputs:
                async for index, out in outputs:
                    self.timers[index].on_output(out)
                    if out.finish_reason is not None:
                        self.timers[index].end(out.finish_reason)
                        usages[index] = out.usage
            reason = "ok"
        except asyncio.CancelledError:
            reason = "abort"
            raise
        except Exception as error:
            raise api_error_of(error, self.renames) from error
        finally:
            self._end(reason)
        choices = []
        for index, stream in enumerate(self.streams):
            completion = stream.completion
            if completion is None:
                raise APIError(500, "a choice ended without a completion", type=SERVER_ERROR,
                               code="internal_error")
            choices.append(Choice(index, completion.text, completion.finish_reason, completion.logprobs))
        return self.formatter.response(choices, [u for u in usages if u is not None])

    async def events(self) -> AsyncIterator[Json | str]:
        """Stream chunks: a role chunk per choice first (chat), deltas, exactly one finish chunk per choice,
        the usage chunk when asked for, then ``[DONE]``; an error ends the stream with an error event."""
        fmt = self.formatter
        usages: list[Usage | None] = [None] * len(self.streams)
        reason = "abort"
        try:
            try:
                if fmt.chat:
                    for index in range(len(self.streams)):
                        yield fmt.chunk(index, role=True)
                async with contextlib.aclosing(merge_streams(self.streams)) as outputs:
                    async for index, out in outputs:
                        self.timers[index].on_output(out)
                        if out.text or out.logprobs:
                            yield fmt.chunk(index, text=out.text, logprobs=out.logprobs)
                        if out.finish_reason is not None:
                            self.timers[index].end(out.finish_reason)
                            usages[index] = out.usage
                            yield fmt.chunk(index, finish_reason=out.finish_reason)
                if self.include_usage:
                    yield fmt.usage_chunk([u for u in usages if u is not None])
                reason = "ok"
            except Exception as error:
                reason = "error"
                yield api_error_of(error, self.renames).body()
            yield DONE
        finally:
            with contextlib.suppress(Exception):
                for stream in self.streams:
                    await stream.aclose()
            self._end(reason)
