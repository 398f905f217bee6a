"""``asyncllm.pipeline``: a synchronous batch API for scripts and notebooks.

>>> pipe = asyncllm.pipeline("model.gguf", device="cpu")
>>> pipe("Once upon a time", max_tokens=32, temperature=0).text
>>> [c.text for c in pipe(["a", "b", "c"], max_tokens=16)]     # one batch, results in input order
>>> for text in pipe.stream("Tell me a story", max_tokens=64):
...     print(text, end="")
>>> pipe(("Describe this image.", image), max_tokens=32).text         # a vision-language model
>>> pipe.close()

The pipeline owns a private event loop running in a daemon thread; the engine runs on that loop, and every
synchronous method submits its work there and blocks the calling thread until the result is ready. So it
also works where the calling thread already runs an event loop (a Jupyter cell): no ``nest_asyncio``.

Invariants: sampling keywords and every prompt of a call are validated before any request is submitted;
a call that ends early (an exception, ``KeyboardInterrupt``, a closed or dropped stream iterator) aborts
the requests it submitted; ``close()`` (also run by ``with``, and when the pipeline is garbage collected
or the interpreter exits) closes the engine, stops the loop and joins its thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import sys
import threading
import weakref
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any, TypeVar

from asyncllm.engine import AsyncEngine, EngineClosedError, EngineStats
from asyncllm.outputs import Completion
from asyncllm.request import Message
from asyncllm.sampling import SamplingParams
from asyncllm.streams import RequestStream, TextStream

__all__ = ["AUTO_PROGRESS_MIN_PROMPTS", "Pipeline", "image_prompt", "pipeline"]

T = TypeVar("T")

AUTO_PROGRESS_MIN_PROMPTS = 8
"""With ``progress=None``, a batch of at least this many prompts shows a progress bar when stderr is a TTY."""

_POLL_SECONDS = 0.1  # how often a blocked caller wakes up, so that Ctrl-C is seen promptly on every platform


def pipeline(model: str | os.PathLike[str] | AsyncEngine, **engine_options: Any) -> Pipeline:
    """A ``Pipeline`` over ``model``: an HF directory, a hub id, a ``.gguf`` file, or an ``AsyncEngine``.

    ``engine_options`` are ``EngineConfig`` fields (``device="cpu"``, ``kv_cache_tokens=...``) used to load
    ``model``; they cannot be combined with an already built engine, which must not have been started: the
    pipeline starts it on its own loop and closes it when the pipeline closes.
    """
    if isinstance(model, AsyncEngine):
        if engine_options:
            raise TypeError(f"{sorted(engine_options)[0]}: engine options cannot be given with an AsyncEngine")
        return Pipeline(model)
    return Pipeline(AsyncEngine.from_pretrained(model, **engine_options))


class Pipeline:
    """Synchronous calls into an ``AsyncEngine`` running on a private event loop thread (see the module).

    The engine must not have been started on another event loop: it is started on the pipeline's loop, and
    since an engine cannot move between event loops, ``close()`` closes it too (an engine passed to
    ``pipeline()`` is handed over, not borrowed).
    """

    def __init__(self, engine: AsyncEngine) -> None:
        if engine.is_closed:
            raise EngineClosedError("engine is closed")
        if engine._loop is not None:
            raise ValueError("engine: already started on another event loop; pass an engine that was not started")
        self._engine = engine
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=_run_loop, args=(self._loop,), name="asyncllm-pipeline", daemon=True)
        self._closed = False
        self._lock = threading.Lock()
        self._thread.start()
        self._finalizer = weakref.finalize(self, _shutdown, self._loop, self._thread, engine)
        try:
            self._run(engine.start())
        except BaseException:
            self._finalizer()
            raise

    # -- properties ----------------------------------------------------------------------------
    @property
    def engine(self) -> AsyncEngine:
        """The engine (its methods must run on the pipeline's loop thread; ``stats()`` below is safe)."""
        return self._engine

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def thread(self) -> threading.Thread:
        """The thread running the pipeline's event loop."""
        return self._thread

    def stats(self) -> EngineStats:
        """The engine's ``stats()``, read on the loop thread."""
        return self._run(_call_async(self._engine.stats))

    # -- generation ----------------------------------------------------------------------------
    def __call__(
        self,
        prompts: Any,
        *,
        params: SamplingParams | None = None,
        progress: bool | None = None,
        **sampling: Any,
    ) -> Any:
        """Complete one prompt (a ``str``, or an image prompt: see ``image_prompt``) -> ``Completion``, or
        a list of prompts (each a ``str``, a list of token ids or an image prompt) -> a list of
        ``Completion`` in input order. A list is submitted at once, so the engine batches it. ``progress``:
        a tqdm bar over requests on stderr (``None``: on for at least ``AUTO_PROGRESS_MIN_PROMPTS`` prompts
        when stderr is a TTY)."""
        if isinstance(prompts, (str, tuple, dict)):
            return self._generate_all([prompts], params, sampling, progress=False, single=True)[0]
        if not isinstance(prompts, Sequence) or isinstance(prompts, (bytes, bytearray)):
            raise ValueError(f"prompts: must be a str or a list of prompts, got {type(prompts).__name__}")
        return self._generate_all(list(prompts), params, sampling, progress=progress)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        *,
        params: SamplingParams | None = None,
        progress: bool | None = None,
        **sampling: Any,
    ) -> Any:
        """Reply to one conversation (a list of ``{"role", "content"}`` dicts, rendered with the chat
        template) -> ``Completion``, or to a list of conversations -> a list of ``Completion`` in order."""
        if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
            raise ValueError("messages: must be a non-empty list of messages or a list of conversations")
        if all(isinstance(m, dict) for m in messages):
            return self._generate_all([list(messages)], params, sampling, progress=False, single=True,
                                      name="messages")[0]
        for i, conversation in enumerate(messages):
            if (isinstance(conversation, (str, dict)) or not isinstance(conversation, Sequence) or not conversation
                    or not all(isinstance(m, dict) for m in conversation)):
                raise ValueError(f"messages[{i}]: must be a non-empty list of message dicts")
        return self._generate_all([list(c) for c in messages], params, sampling, progress=progress, name="messages")

    def stream(self, prompt: Any, *, params: SamplingParams | None = None, **sampling: Any) -> PipelineStream:
        """Stream the completion of one prompt (text, token ids or chat messages) as ``str`` deltas.

        The returned iterator's ``close()`` (or leaving a ``with`` block, or dropping the iterator, e.g. by
        ``break`` out of a ``for`` loop) aborts the request; ``completion`` holds the result once finished.
        """
        self._check_usable()
        sampling_params = SamplingParams.from_kwargs(params, **sampling)
        token_ids, images = self._encode(prompt)
        stream = self._run(self._submit(token_ids, sampling_params, images))
        return PipelineStream(self, TextStream(stream))

    async def _submit(self, token_ids: list[int], params: SamplingParams, images: list[Any]) -> RequestStream:
        """Submit one request, its images prepared first on the model thread (so that a bad image raises
        here, before anything runs)."""
        if images:
            images = await self._engine.run_on_model_thread(self._engine.prepare_images, images)
        return self._engine.submit(token_ids, params, images=images)

    def _encode(self, prompt: Any) -> tuple[list[int], list[Any]]:
        """Token ids and images of a prompt: text, token ids, chat messages (whose image parts are taken)
        or an image prompt (``image_prompt``)."""
        if isinstance(prompt, (tuple, dict)):
            text, images = image_prompt(prompt, self._image_text())
            return self._engine.encode_prompt(text), images
        return self._engine.encode_with_images(prompt)

    def _image_text(self) -> str | None:
        vision = self._engine.model_config.vision
        return None if vision is None else vision.image_text(self._engine.tokenizer.id_to_token)

    def _generate_all(
        self, prompts: list[Any], params: SamplingParams | None, sampling: dict[str, Any], *,
        progress: bool | None, single: bool = False, name: str = "prompts",
    ) -> list[Completion]:
        self._check_usable()
        sampling_params = SamplingParams.from_kwargs(params, **sampling)
        encoded = []
        for i, prompt in enumerate(prompts):
            try:
                encoded.append(self._encode(prompt))
            except ValueError as error:
                where = name if single else f"{name}[{i}]"
                raise ValueError(f"{where}: {error}") from None
        show = _show_progress(progress, len(encoded))
        return self._run(self._batch(encoded, sampling_params, show, name=name, single=single))

    async def _batch(self, encoded: list[tuple[list[int], list[Any]]], params: SamplingParams, show: bool, *,
                     name: str, single: bool) -> list[Completion]:
        # every request is created (and validated against the context and the image limits) before any starts
        streams: list[RequestStream] = []
        for i, (token_ids, images) in enumerate(encoded):
            try:
                streams.append(await self._submit(token_ids, params, images))
            except ValueError as error:
                raise ValueError(f"{name if single else f'{name}[{i}]'}: {error}") from None
        bar = _progress_bar(len(streams)) if show else None
        tasks = [asyncio.ensure_future(stream.collect()) for stream in streams]
        if bar is not None:
            for task in tasks:
                task.add_done_callback(lambda _: bar.update(1))
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()  # one failed, or the call was interrupted: abort the rest
            await asyncio.gather(*tasks, return_exceptions=True)
            if bar is not None:
                bar.close()

    # -- running work on the loop --------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._closed:
            raise EngineClosedError("pipeline is closed")
        if threading.current_thread() is self._thread:
            raise RuntimeError("the pipeline's synchronous methods cannot be called from its own event loop "
                               "thread (they would wait on themselves); call them from another thread")

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for it; an interrupt (Ctrl-C) cancels it before re-raising."""
        try:
            self._check_usable()
        except BaseException:
            coro.close()
            raise
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            while True:
                try:
                    return future.result(timeout=_POLL_SECONDS)
                except concurrent.futures.TimeoutError:
                    continue
        except BaseException:
            if not future.done():
                future.cancel()  # cancels the task on the loop: its requests are aborted there
                concurrent.futures.wait([future], timeout=5)
            raise

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        """Close the engine, stop the loop and join its thread (in-flight requests end with an error).
        Idempotent; afterwards every call raises ``EngineClosedError``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._finalizer()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Pipeline {state} max_model_len={self._engine.max_model_len}>"


class PipelineStream:
    """A synchronous iterator of ``str`` deltas of one request; ``close()`` aborts it if unfinished."""

    def __init__(self, pipe: Pipeline, stream: TextStream) -> None:
        self._pipe = pipe
        self._stream = stream
        self._done = False

    @property
    def request_id(self) -> str:
        return self._stream.request_id

    @property
    def completion(self) -> Completion | None:
        """The finished completion (``None`` until the stream ends normally)."""
        return self._stream.completion

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        try:
            more, text = self._pipe._run(_next_text(self._stream))
        except BaseException:
            self.close()
            raise
        if not more:
            self._done = True
            raise StopIteration
        return text

    def close(self) -> None:
        """Abort the request if it has not finished; idempotent. Does nothing once the pipeline is closed."""
        if self._done:
            return
        self._done = True
        pipe = self._pipe
        if pipe.closed or threading.current_thread() is pipe.thread:
            return
        pipe._run(self._stream.aclose())

    def __enter__(self) -> PipelineStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown or a closed pipeline: nothing to abort
            self.close()


# -- helpers ---------------------------------------------------------------------------------------
def image_prompt(prompt: tuple[Any, ...] | dict[str, Any], image_text: str | None) -> tuple[str, list[Any]]:
    """A text prompt and its images from ``(text, image)``, ``(text, [image, ...])`` or
    ``{"prompt": text, "images": [image, ...]}`` (an image: a PIL image, encoded bytes, a path or a pixel
    tensor). Where ``text`` holds no ``image_text`` (the model's image token), one is put in front of it
    per image, each followed by a newline, as LLaVA's prompts place them; otherwise ``text`` must hold
    exactly one per image. ``ValueError`` naming the part at fault."""
    if isinstance(prompt, dict):
        unknown = [key for key in prompt if key not in ("prompt", "images")]
        if unknown:
            raise ValueError(f"prompt: unknown key {unknown[0]!r} (an image prompt has 'prompt' and 'images')")
        text, images = prompt.get("prompt"), prompt.get("images")
        if not isinstance(images, (list, tuple)) or not images:
            raise ValueError("images: must be a non-empty list of images")
    else:
        if len(prompt) != 2:
            raise ValueError(f"prompt: an image prompt is a (text, image) pair, got {len(prompt)} items")
        text, images = prompt
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValueError("images: must not be empty")
    if not isinstance(text, str) or not text:
        raise ValueError("prompt: the text of an image prompt must be a non-empty str")
    if image_text is None:
        raise ValueError("images: this model takes no images")
    if image_text not in text:
        text = f"{image_text}\n" * len(images) + text
    return text, list(images)


async def _call_async(fn: Any, *args: Any) -> Any:
    return fn(*args)


async def _next_text(stream: TextStream) -> tuple[bool, str]:
    try:
        return True, await stream.__anext__()
    except StopAsyncIteration:
        return False, ""


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def _shutdown(loop: asyncio.AbstractEventLoop, thread: threading.Thread, engine: AsyncEngine) -> None:
    """Close the engine on its loop, stop the loop and join the thread (``weakref.finalize`` callback: it must
    not reference the pipeline)."""
    if loop.is_closed():
        return

    async def stop() -> None:
        try:
            await engine.aclose()
        finally:
            loop.stop()

    try:
        future = asyncio.run_coroutine_threadsafe(stop(), loop)
    except RuntimeError:  # the loop closed meanwhile
        return
    if threading.current_thread() is thread:
        return  # finalized from the loop thread itself: the loop stops once ``stop`` has run
    try:
        future.result(timeout=60)
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=60)


def _show_progress(progress: bool | None, count: int) -> bool:
    if progress is None:
        return count >= AUTO_PROGRESS_MIN_PROMPTS and _stderr_is_tty()
    if not isinstance(progress, bool):
        raise ValueError(f"progress: must be True, False or None, got {progress!r}")
    return progress


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _progress_bar(total: int) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with transformers; without it, no bar
        return None
    return tqdm(total=total, desc="asyncllm", unit="req", file=sys.stderr, dynamic_ncols=True)
