"""The event-loop operations the engine needs, on asyncio and on trio.

The engine loop, the request streams and sessions are written against backend-neutral primitives: the
``Signal`` below (on ``anyio.Event``), ``anyio`` checkpoints and ``anyio``'s cancellation exception. Three
operations need the running loop itself and are done here for each backend (``LoopHandle``):

* starting the engine loop as a task that outlives the caller's scope: an asyncio ``Task``, or under trio
  a system task (``trio.lowlevel.spawn_system_task``), cancelled when the run's main task returns;
* awaiting a ``concurrent.futures.Future`` of the engine's dedicated model thread (``anyio.to_thread``
  would run the step on one of anyio's worker threads, not on the thread that built the model);
* calling into the loop from another thread (a stream dropped and collected elsewhere aborts its request).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import anyio
import sniffio

T = TypeVar("T")

__all__ = ["LoopHandle", "Signal", "current_backend"]

SUPPORTED_BACKENDS = ("asyncio", "trio")


def current_backend() -> str | None:
    """``"asyncio"``, ``"trio"`` (or another library's name) when called inside a running loop, else ``None``."""
    try:
        return sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return None


def require_asyncio(what: str) -> None:
    """Raise at once when ``what`` (a part that needs asyncio) is used under another async library."""
    backend = current_backend()
    if backend is not None and backend != "asyncio":
        raise RuntimeError(f"asyncllm: {what} needs asyncio; running under {backend}")


class Signal:
    """A resettable event for one loop: ``set``, ``clear``, ``await wait()``.

    Plain Python until someone waits (the ``anyio.Event`` is made by the waiter, inside the loop), so it can
    be created and set from synchronous code and from loop callbacks. Not thread-safe: use it on the loop.
    """

    __slots__ = ("_event", "_flag")

    def __init__(self) -> None:
        self._flag = False
        self._event: anyio.Event | None = None

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        self._flag = True
        if self._event is not None:
            self._event.set()

    def clear(self) -> None:
        self._flag = False
        if self._event is not None and self._event.is_set():
            self._event = None  # its waiters were released; the next wait gets a fresh event

    async def wait(self) -> None:
        if self._flag:
            return  # as asyncio.Event: a set signal does not yield
        if self._event is None:
            self._event = anyio.Event()
        await self._event.wait()


class LoopHandle:
    """The running asyncio loop or trio run, captured where the engine starts."""

    def __init__(self) -> None:
        backend = current_backend()
        if backend not in SUPPORTED_BACKENDS:
            raise RuntimeError(f"asyncllm: the engine runs under asyncio or trio; running under {backend}")
        self.backend: str = backend
        self._loop: asyncio.AbstractEventLoop | None = None
        self._token: Any = None
        if backend == "asyncio":
            self._loop = asyncio.get_running_loop()
        else:
            import trio

            self._token = trio.lowlevel.current_trio_token()

    def is_current(self) -> bool:
        """Whether the caller runs in this loop's thread, inside this loop."""
        if self._loop is not None:
            try:
                return asyncio.get_running_loop() is self._loop
            except RuntimeError:
                return False
        import trio

        try:
            return trio.lowlevel.current_trio_token() is self._token
        except RuntimeError:
            return False

    def is_closed(self) -> bool:
        return self._loop.is_closed() if self._loop is not None else False

    def spawn(self, fn: Callable[[], Awaitable[None]], name: str) -> LoopTask:
        """Start ``fn()`` as a task not bound to the caller's scope. Under trio it must not raise (a system
        task that raises ends the run): anything but the cancellation is dropped here, so ``fn`` must
        record its own failures."""
        if self._loop is not None:
            return LoopTask(task=self._loop.create_task(fn(), name=name))  # type: ignore[arg-type]
        import trio

        task = LoopTask()

        async def system_task() -> None:
            try:
                await fn()
            except trio.Cancelled:
                raise
            except Exception:
                pass  # recorded by fn
            finally:
                task.finished.set()

        trio.lowlevel.spawn_system_task(system_task, name=name)
        return task

    async def wait_future(self, future: Future[T]) -> T:
        """Await a ``concurrent.futures.Future`` (e.g. of a ``ThreadPoolExecutor``) without blocking the loop."""
        if self._loop is not None:
            return await asyncio.wrap_future(future, loop=self._loop)
        import trio

        done = trio.Event()
        token = self._token

        def wake(_: Future[T]) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            future.cancel()  # as asyncio does for a cancelled run_in_executor: drop it if not started
            raise
        return future.result()

    def call_soon_threadsafe(self, fn: Callable[..., object], *args: object) -> None:
        """Call ``fn(*args)`` at once when running in this loop, else schedule it there (thread-safe); do
        nothing when the loop is closed or the run has finished."""
        if self.is_current():
            fn(*args)
            return
        if self._loop is not None:
            if not self._loop.is_closed():
                with contextlib.suppress(RuntimeError):  # closed between the check and the call
                    self._loop.call_soon_threadsafe(fn, *args)
            return
        import trio

        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(fn, *args)


class LoopTask:
    """The engine loop's task: ``done()`` and ``await wait()`` (never raises)."""

    def __init__(self, task: asyncio.Task[None] | None = None) -> None:
        self._task = task
        self.finished = Signal()

    def done(self) -> bool:
        return self._task.done() if self._task is not None else self.finished.is_set()

    async def wait(self) -> None:
        if self._task is not None:
            with contextlib.suppress(BaseException):
                await self._task
        else:
            await self.finished.wait()
