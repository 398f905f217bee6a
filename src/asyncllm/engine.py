"""AsyncEngine: the request lifecycle around one scheduler task running in the caller's event loop.

The loop task alternates between scheduling (pure Python, on the loop) and a model step run on one
dedicated worker thread, so the event loop stays responsive while the model computes. Only the loop
task mutates scheduler state; callers interact through thread-safe wake-ups and per-request channels.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from torch import nn

from asyncllm.builder import build_runner, engine_config, load_model
from asyncllm.config import EngineConfig, ModelConfig
from asyncllm.cpu_threads import affinity_cpus
from asyncllm.event_loop import LoopHandle, LoopTask, Signal
from asyncllm.image_inputs import ImageLimits, check_image_count, needs_decoding, prepare_images
from asyncllm.images import ImageProcessor, PreparedImage, expand_image_tokens
from asyncllm.kv.block_manager import BlockManager
from asyncllm.kv.pins import PinRegistry
from asyncllm.layers.weights import parameter_bytes
from asyncllm.models import CausalLM
from asyncllm.outputs import Completion
from asyncllm.request import Message, Prompt, Request, SessionFlushes, encode_prompt, split_image_parts
from asyncllm.runner import ModelRunner
from asyncllm.sampling import SamplingParams, SamplingRow
from asyncllm.scheduler import ScheduledChunk, Scheduler, SchedulerStep
from asyncllm.sequence import FinishReason, ImageSpan
from asyncllm.step_isolation import StepFailedError, run_step, step_error
from asyncllm.streams import OutputChannel, RequestStream, TextStream, call_in_loop
from asyncllm.thread_governor import ThreadGovernor
from asyncllm.tokenizer import Tokenizer

if TYPE_CHECKING:
    from asyncllm.distributed.driver import TensorParallelRunner
    from asyncllm.session import Session

logger = logging.getLogger("asyncllm")
T = TypeVar("T")

__all__ = ["AsyncEngine", "EngineClosedError", "EngineStats", "Message", "Prompt", "StepFailedError"]


class EngineClosedError(RuntimeError):
    """The engine was closed (or failed) while the request was waiting or running."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine: KV blocks, requests, sessions, and the model's resident weight bytes
    (packed quantized weights counted as stored) with its quantization (``"unquantized"``, ``"gguf"``,
    ``"awq"``, ...). The KV pool: ``kv_cache_dtype`` (``"int8"``, ``"int4"`` or the compute dtype's
    name), ``kv_bytes_per_token`` (all layers, keys, values and scales) and ``kv_capacity_tokens`` (blocks
    times block size). With tensor parallelism ``kv_bytes_per_token`` is one rank's (its KV heads) and
    ``weight_bytes`` the sum over the ranks."""

    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_cached: int
    running: int
    waiting: int
    sessions_pinned: int
    num_preemptions: int
    weight_bytes: int = 0
    weight_quantization: str = "unquantized"
    kv_cache_dtype: str = "auto"
    kv_bytes_per_token: int = 0
    kv_capacity_tokens: int = 0


class AsyncEngine:
    """Continuous-batching inference inside the caller's event loop (asyncio, or trio: see ``start``).

    Invariants: every submitted request ends with exactly one final output (``finish_reason`` set) or
    an exception on its stream; a request's KV blocks are released (or pinned for its session) in the
    loop iteration that finishes it; after all requests end and sessions close, no block is referenced.

    The context bound ``max_model_len`` is the runner's (see ``asyncllm.builder.max_model_len_for``).
    """

    def __init__(
        self,
        runner: ModelRunner | TensorParallelRunner,
        tokenizer: Tokenizer,
        model_config: ModelConfig,
        config: EngineConfig | None = None,
        *,
        worker: ThreadPoolExecutor | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.model_config = model_config
        self.tokenizer = tokenizer
        self._runner = runner
        model = runner.model
        self._weight_bytes = parameter_bytes(model) if isinstance(model, nn.Module) else int(
            getattr(model, "weight_bytes", 0))
        self._weight_quantization = str(getattr(model, "quantization_name", "unquantized"))
        spec = runner.spec
        self._blocks = BlockManager(spec.num_blocks, spec.block_size,
                                    enable_prefix_caching=self.config.enable_prefix_caching)
        self._pins = PinRegistry(self._blocks)
        self._scheduler = Scheduler(self._blocks, self._pins, max_num_seqs=self.config.max_num_seqs,
                                    max_num_batched_tokens=self.config.max_num_batched_tokens,
                                    sliding_window=model_config.sliding_window if model_config.all_layers_sliding
                                    else None)
        self.max_model_len = runner.max_model_len
        self._eos_ids = frozenset(tokenizer.eos_token_ids) | frozenset(model_config.eos_token_ids)
        self._requests: dict[str, Request] = {}
        self._pending_aborts: set[str] = set()
        self._flushes = SessionFlushes(self._scheduler)
        self._ids = itertools.count()
        self._loop: LoopHandle | None = None
        self._task: LoopTask | None = None
        self._wakeup: Signal | None = None
        # One thread runs every model step (and, via from_pretrained/from_model, the loading): a second
        # thread doing torch work gets its own OpenMP team, and two teams on few cores slow each other down.
        self._executor = worker or _model_thread()
        self._closing = False
        self._failure: BaseException | None = None
        self._governor = _thread_governor(self.config)
        # Without an engine seed, unseeded requests must differ from one run to the next.
        runner.seed(self.config.seed if self.config.seed is not None else secrets.randbits(63))

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, model: str | os.PathLike[str], *, config: EngineConfig | None = None, **overrides: Any
    ) -> AsyncEngine:
        """Load an HF directory, a hub id (when online or cached) or a ``.gguf`` file.

        Keyword overrides are ``EngineConfig`` fields, e.g. ``num_kv_blocks=512`` or ``device="cpu"``.
        With ``tensor_parallel_size=N`` (N > 1) the model is split over N worker processes the engine starts
        and supervises (``asyncllm.distributed``); ``aclose`` stops them. A worker's startup error is raised
        here; a worker that dies later fails every request in flight and the engine (``failure``).
        """
        config = engine_config(config, overrides)
        if config.tensor_parallel_size > 1:
            return cls._from_pretrained_parallel(model, config)
        worker = _model_thread()
        try:
            net, tokenizer = worker.submit(load_model, model, config).result()
            return cls.from_model(net, tokenizer, config=config, worker=worker)
        except BaseException:
            worker.shutdown(wait=False)
            raise

    @classmethod
    def _from_pretrained_parallel(cls, model: str | os.PathLike[str], config: EngineConfig) -> AsyncEngine:
        from asyncllm.builder import load_tokenizer
        from asyncllm.distributed.driver import TensorParallelRunner
        from asyncllm.loaders import load_checkpoint

        # opened here only to resolve the path and read the config and tokenizer: the ranks read the weights
        checkpoint = load_checkpoint(model, dequantize_weights=config.dequantize_weights)
        model_config = ModelConfig.from_hf_config(checkpoint.hf_config)
        if model_config.vision is not None:
            raise ValueError(f"tensor_parallel_size: {config.tensor_parallel_size} ranks serve text models only; "
                             f"{model_config.architecture!r} takes images")
        tokenizer = load_tokenizer(checkpoint)
        runner = TensorParallelRunner.start(str(checkpoint.local_path), config)
        try:
            return cls(runner, tokenizer, runner.model.config, config)
        except BaseException:
            runner.close()
            raise

    @classmethod
    def from_model(
        cls,
        model: CausalLM,
        tokenizer: Tokenizer,
        *,
        config: EngineConfig | None = None,
        worker: ThreadPoolExecutor | None = None,
        **overrides: Any,
    ) -> AsyncEngine:
        """Serve an already built model (its weights on ``config``'s device and dtype).

        ``worker`` is the single thread that will run the model (a new one when omitted); pass the thread
        that built the model so that all torch work stays on one thread.
        """
        config = engine_config(config, overrides)
        if config.tensor_parallel_size > 1:
            raise ValueError(f"tensor_parallel_size: from_model serves a model built in this process on one rank; "
                             f"use from_pretrained for {config.tensor_parallel_size} ranks")
        worker = worker or _model_thread()
        runner = worker.submit(build_runner, model, config).result()
        return cls(runner, tokenizer, model.config, config, worker=worker)

    # -- lifecycle -----------------------------------------------------------------------------
    async def __aenter__(self) -> AsyncEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start the loop task in the running event loop (idempotent; also done on first use).

        Under asyncio the loop is a task; under trio it is a system task (no nursery needed), cancelled
        when the run's main task returns, which closes the engine. The engine stays bound to this loop.
        """
        self._ensure_started()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """An ASGI lifespan: ``FastAPI(lifespan=engine.lifespan)`` starts and closes the engine."""
        await self.start()
        try:
            yield
        finally:
            await self.aclose()

    def _ensure_started(self) -> None:
        if self._closing:
            raise EngineClosedError("engine is closed")
        if self._failure is not None:
            raise EngineClosedError(f"engine failed: {self._failure!r}") from self._failure
        if self._task is not None:
            assert self._loop is not None
            if not self._loop.is_current():
                raise RuntimeError("AsyncEngine is bound to another event loop; create one engine per loop")
            return
        self._loop = LoopHandle()
        self._wakeup = Signal()
        self._task = self._loop.spawn(self._run, name="asyncllm-engine")

    async def aclose(self) -> None:
        """Stop the loop; in-flight requests end with ``EngineClosedError``. Idempotent."""
        if self._closing:
            return
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            await self._task.wait()
        self._fail_all(EngineClosedError("engine closed while the request was in flight"))
        self._flushes.end_all()
        for owner in self._pins.owners():
            self._pins.release(owner)
        # on the model thread, after its last step: a tensor-parallel runner stops its worker processes
        closing = self._executor.submit(self._runner.close)
        if self._loop is not None and self._loop.is_current():
            await self._loop.wait_future(closing)
        else:
            closing.result()
        self._executor.shutdown(wait=True)

    @property
    def model(self) -> CausalLM:
        """The served model (read-only use: e.g. counting weight bytes or building a second engine); with
        tensor parallelism a ``RemoteModel`` (config, quantization, weight bytes): the weights live in the
        worker processes."""
        return self._runner.model  # type: ignore[return-value]

    @property
    def is_closed(self) -> bool:
        """``aclose()`` was called (or the loop was cancelled); new requests raise ``EngineClosedError``."""
        return self._closing

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._closing

    @property
    def failure(self) -> BaseException | None:
        return self._failure

    def _run_step(self, chunks: Any, rows: Any) -> Any:
        """One model step on the model thread, after the thread governor (if any) has had its say."""
        if self._governor is not None:
            self._governor.before_step()
        return run_step(self._runner.step, chunks, rows)

    async def run_on_model_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the engine's model thread, between model steps.

        Use it for other torch work in the same process: torch work on a second thread starts a second
        OpenMP thread team, and two teams on a small CPU slow the engine's steps down (about 15% per step
        measured on a 2-core machine, even when the other team had finished its work before).
        """
        loop = self._loop if self._loop is not None and self._loop.is_current() else LoopHandle()
        return await loop.wait_future(self._executor.submit(fn, *args))

    def stats(self) -> EngineStats:
        return EngineStats(
            kv_blocks_total=self._blocks.num_blocks,
            kv_blocks_used=self._blocks.num_referenced,
            kv_blocks_cached=self._blocks.num_evictable_cached,
            running=len(self._scheduler.running),
            waiting=len(self._scheduler.waiting),
            sessions_pinned=len(self._pins),
            num_preemptions=self._scheduler.num_preemptions,
            weight_bytes=self._weight_bytes,
            weight_quantization=self._weight_quantization,
            kv_cache_dtype=self._runner.spec.dtype_name,
            kv_bytes_per_token=self._runner.spec.bytes_per_token,
            kv_capacity_tokens=self._blocks.num_blocks * self._blocks.block_size,
        )

    # -- public request API --------------------------------------------------------------------
    def stream(self, prompt: Prompt, *, params: SamplingParams | None = None, **sampling: Any) -> TextStream:
        """Stream ``str`` deltas of the completion of ``prompt`` (text, token ids or chat messages)."""
        return TextStream(self.stream_detailed(prompt, params=params, **sampling))

    def stream_detailed(
        self, prompt: Prompt, *, params: SamplingParams | None = None, images: Sequence[Any] = (), **sampling: Any
    ) -> RequestStream:
        """Stream ``StepOutput``s (token ids, text delta, logprobs, finish reason, usage).

        A vision-language model also takes images: as ``{"type": "image", "image": ...}`` parts of chat
        message contents, or, for a text or token prompt, as ``images`` (one image placeholder token per
        image in the prompt). An image is a PIL image, encoded bytes, a path or a ``[C, S, S]`` pixel tensor
        already preprocessed."""
        token_ids, all_images = self.encode_with_images(prompt, images)
        return self.submit(token_ids, SamplingParams.from_kwargs(params, **sampling), images=all_images)

    async def generate(
        self, prompt: Prompt, *, params: SamplingParams | None = None, images: Sequence[Any] = (), **sampling: Any
    ) -> Completion:
        """Run ``prompt`` (with ``images``, see ``stream_detailed``) to completion."""
        return await self.stream_detailed(prompt, params=params, images=images, **sampling).collect()

    def session(self, system: str | None = None, *, messages: Sequence[Message] | None = None) -> Session:
        """A multi-turn chat whose KV stays pinned between turns (see ``asyncllm.Session``)."""
        from asyncllm.session import Session

        return Session(self, system=system, messages=messages)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids for a text prompt, a token id list or a list of chat messages."""
        return encode_prompt(prompt, self.tokenizer, self.model_config.vocab_size)

    def encode_with_images(self, prompt: Prompt, images: Sequence[Any] = ()) -> tuple[list[int], list[Any]]:
        """Token ids of ``prompt`` and its images, in prompt order: chat messages' ``{"type": "image"}``
        parts become the image token (one placeholder each, expanded at submission), followed by
        ``images``. ``ValueError("images: ...")`` when a text-only model is given an image."""
        images = list(images)
        if isinstance(prompt, Sequence) and not isinstance(prompt, str) and prompt \
                and all(isinstance(m, dict) for m in prompt):
            vision = self.model_config.vision
            image_token = vision and vision.image_text(self.tokenizer.id_to_token)
            messages, parts = split_image_parts(prompt, image_token or "")  # type: ignore[arg-type]
            if parts and not image_token:
                raise ValueError("images: this model takes no images")
            prompt, images = messages, [*parts, *images]
        return self.encode_prompt(prompt), images

    @property
    def image_limits(self) -> ImageLimits:
        """The per-request image limits of ``config`` (``max_images_per_request``, ``max_image_pixels``)."""
        return ImageLimits(self.config.max_images_per_request, self.config.max_image_pixels)

    def prepare_images(self, images: Sequence[Any]) -> list[PreparedImage]:
        """Check ``images`` against ``image_limits`` and preprocess them with the model's image processor
        (``ValueError`` naming ``images`` or ``images[k]``); prepared images pass through ``submit``
        unchanged. Touches no engine state: callers may run it on another thread (``run_on_model_thread``
        keeps torch work on the model's thread)."""
        return prepare_images(images, self._image_processor(), self.image_limits)

    def _image_processor(self) -> ImageProcessor:
        processor = getattr(self.model, "image_processor", None)
        if self.model_config.vision is None or processor is None:
            raise ValueError("images: this model takes no images")
        return processor

    # -- submission ----------------------------------------------------------------------------
    def submit(
        self,
        token_ids: list[int],
        params: SamplingParams,
        *,
        session_id: Hashable | None = None,
        on_done: Callable[[Completion | None], None] | None = None,
        images: Sequence[Any] = (),
    ) -> RequestStream:
        """Submit an encoded prompt; the request is queued on the stream's first ``__anext__``.

        ``session_id`` (one opened with ``open_session``): the request may reuse the KV the session has
        pinned, and its KV is pinned for the session when it finishes (a turn waits for the previous turn's
        KV to settle). ``on_done`` is called once with the ``Completion``, or ``None`` if the stream ends
        without one (aborted, failed or dropped). Raises ``ValueError`` for a prompt or ``max_tokens``
        that does not fit ``max_model_len``, for token ids outside the vocabulary, and for more images than
        ``image_limits`` allow. Images not yet prepared (``prepare_images``) are decoded and preprocessed on
        the model thread when the stream starts, never on the event loop: an image over the pixel limit or
        that cannot be decoded, and a prompt that its image tokens make too long, raise ``ValueError`` from
        the stream's first step (``await engine.generate(...)`` raises it as before).
        """
        request_id = f"req-{next(self._ids)}"
        if any(needs_decoding(image) for image in images):
            return self._submit_after_preparing(request_id, token_ids, params, session_id, on_done, images)
        request = self._create_request(request_id, token_ids, params, session_id, images)

        async def start() -> None:
            await self._start_request(request, session_id)

        return RequestStream(request.channel, self._abort_threadsafe, start, on_done)

    def _submit_after_preparing(
        self, request_id: str, token_ids: list[int], params: SamplingParams, session_id: Hashable | None,
        on_done: Callable[[Completion | None], None] | None, images: Sequence[Any],
    ) -> RequestStream:
        """``submit`` for images still to decode and preprocess: that work runs on the model thread when the
        stream starts, so the event loop never waits on it (the count and whether the model takes images
        are checked now; an image that cannot be prepared raises from the stream's first step). Prepared
        images and ready pixel values take ``submit``'s direct path: only a shape check is left, and
        requests submitted together then reach the same step (one vision-tower call for all their images)."""
        processor = self._image_processor()
        check_image_count(len(images), self.image_limits)
        channel = OutputChannel(request_id, keep_logprobs=params.logprobs is not None)
        pending = list(images)
        aborted = False

        def abort(request_id: str) -> None:
            nonlocal aborted
            aborted = True
            self._abort_threadsafe(request_id)

        async def start() -> None:
            prepared = await self.run_on_model_thread(prepare_images, pending, processor, self.image_limits)
            request = self._create_request(request_id, token_ids, params, session_id, prepared, channel)
            await self._start_request(request, session_id)
            if aborted:  # closed while its images were prepared: abort it now that the engine knows it
                self.abort(request_id)

        return RequestStream(channel, abort, start, on_done)

    def _create_request(self, request_id: str, token_ids: list[int], params: SamplingParams,
                        session_id: Hashable | None, images: Sequence[Any],
                        channel: OutputChannel | None = None) -> Request:
        """The request of ``token_ids`` with its image tokens expanded (``images`` prepared here if they are
        not yet: the synchronous path of ``submit``)."""
        spans: tuple[ImageSpan, ...] = ()
        if images:
            processor = self._image_processor()
            prepared = prepare_images(images, processor, self.image_limits)
            token_ids, spans = expand_image_tokens(token_ids, prepared, processor)
        return Request.create(
            request_id, token_ids, params, tokenizer=self.tokenizer, vocab_size=self.model_config.vocab_size,
            max_model_len=self.max_model_len, eos_token_ids=self._eos_ids, device=self._runner.device,
            session_id=session_id, images=spans, channel=channel,
        )

    async def _start_request(self, request: Request, session_id: Hashable | None) -> None:
        """Queue ``request`` (after its session's previous turn has settled) and wake the loop."""
        self._ensure_started()
        if session_id is not None:
            await self._flushes.settled(session_id)
        self._scheduler.add(request.seq)
        self._requests[request.seq.request_id] = request
        assert self._wakeup is not None
        self._wakeup.set()

    def abort(self, request_id: str) -> None:
        """Abort a request; its stream ends with ``finish_reason == "abort"``. Call from the loop thread."""
        request = self._requests.get(request_id)
        if request is None:
            return
        self._pending_aborts.add(request_id)
        if self._wakeup is not None:
            self._wakeup.set()

    def _abort_threadsafe(self, request_id: str) -> None:
        call_in_loop(self._loop, self.abort, request_id)

    # -- the loop ------------------------------------------------------------------------------
    async def _run(self) -> None:
        assert self._wakeup is not None and self._loop is not None
        try:
            while not self._closing:
                self._apply_aborts()
                if not self._scheduler.has_work:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                step = self._scheduler.schedule()
                if not step:
                    self._reject_stuck_head()
                    await anyio.sleep(0)
                    continue
                # A failing step is rerun without the chunks that fail it (step_isolation): only those fail.
                result = await self._loop.wait_future(self._executor.submit(
                    self._run_step, step.chunks, self._sampling_rows(step)))
                for chunk, error in result.failed:
                    logger.error("model step failed for %s", chunk.seq.request_id, exc_info=error)
                    if chunk.seq.flush_only:
                        self._flushes.end(chunk.seq, keep=False)
                    self._fail_request(chunk.seq.request_id, step_error(chunk.seq.request_id, error))
                self._scheduler.on_step_done(result.chunks)
                self._process(result.chunks, result.output)
                self._flushes.complete(result.chunks)
                await anyio.sleep(0)
        except anyio.get_cancelled_exc_class():
            # the event loop is shutting down (e.g. asyncio.run ending without aclose, or a trio run's main
            # task returning without it): a close, not a failure
            self._closing = True
            self._fail_all(EngineClosedError("engine loop was cancelled"))
            raise
        except BaseException as error:
            if not self._closing:
                logger.exception("engine loop failed")
                self._failure = error
                self._fail_all(EngineClosedError(f"engine loop failed: {error!r}"))
            raise

    def _sampling_rows(self, step: SchedulerStep) -> list[SamplingRow]:
        return [self._requests[chunk.seq.request_id].sampling.row(chunk.seq.token_ids, chunk.seq.num_prompt_tokens)
                for chunk in step.chunks if chunk.samples]

    def _process(self, chunks: Sequence[ScheduledChunk], output: Any) -> None:
        sampled = iter(zip(output.token_ids, output.logprobs, strict=True))
        for chunk in chunks:
            if not chunk.samples:
                continue
            token, logprob = next(sampled)
            request = self._requests.get(chunk.seq.request_id)
            if request is None or request.seq.is_finished:
                continue
            text, reason = request.accept(token, self._eos_ids, self.max_model_len)
            logprobs = [logprob] if logprob is not None else None
            if reason is None:
                request.channel.push([token], text, logprobs)
            else:
                self._finish(request, reason, [token], text, logprobs)

    def _finish(self, request: Request, reason: FinishReason, tokens: list[int], text: str,
                logprobs: Any = None) -> None:
        del self._requests[request.seq.request_id]
        request.finish(self._scheduler, self._flushes, reason, tokens, text, logprobs)

    def _apply_aborts(self) -> None:
        while self._pending_aborts:
            request = self._requests.get(self._pending_aborts.pop())
            if request is not None:
                self._finish(request, "abort", [], "")

    def _fail_request(self, request_id: str, error: BaseException) -> None:
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        self._scheduler.finish(request.seq, "abort")
        request.channel.fail(error)

    def _fail_all(self, error: BaseException) -> None:
        for request_id in list(self._requests):
            self._fail_request(request_id, error)

    def _reject_stuck_head(self) -> None:
        """Nothing could be scheduled although work is waiting: the head request cannot fit (pins are
        already evicted by then). Fail it rather than spin."""
        if self._scheduler.waiting and not self._scheduler.running:
            seq = self._scheduler.waiting[0]
            self._fail_request(seq.request_id, ValueError(
                f"prompt: request {seq.request_id} cannot be given enough KV blocks"))

    # -- session support (used by ``Session``; a session id is any hashable naming one pin owner) -------
    def open_session(self, session_id: Hashable) -> None:
        """Start pinning KV for ``session_id``: each finished request submitted with it leaves its KV pinned
        for the next one (released under memory pressure, idle sessions first)."""
        self._pins.open(session_id)

    def release_session(self, session_id: Hashable) -> None:
        """Drop a session's pinned KV (the session stays open)."""
        self._pins.release(session_id)

    async def close_session(self, session_id: Hashable) -> None:
        """Release the session's KV and refuse pins from any turn still in flight."""
        self._pins.close(session_id)
        if self.is_running:
            await self._flushes.settled(session_id)


def _thread_governor(config: EngineConfig) -> ThreadGovernor | None:
    """The thread governor of a CPU engine with ``adaptive_threads`` and more than one thread, else None
    (also with tensor parallelism: the driver runs no model work, its ranks set their own threads)."""
    if not config.adaptive_threads or config.resolved_device().type != "cpu" or config.tensor_parallel_size > 1:
        return None
    threads = config.resolved_num_threads()
    return ThreadGovernor.create(threads, affinity_cpus()) if threads > 1 else None


def _model_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="asyncllm-model")
