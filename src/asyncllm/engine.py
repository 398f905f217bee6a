"""AsyncEngine: the request lifecycle around one scheduler task running in the caller's event loop.

The loop task alternates between scheduling (pure Python, on the loop) and a model step run on one
dedicated worker thread, so the event loop stays responsive while the model computes. Only the loop
task mutates scheduler state; callers interact through thread-safe wake-ups and per-request channels.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from asyncllm.config import EngineConfig, ModelConfig
from asyncllm.cuda_graphs import decode_graphs_for
from asyncllm.detokenizer import IncrementalDetokenizer
from asyncllm.kernels import get_kernel_ops
from asyncllm.kv.block_manager import BlockManager
from asyncllm.kv.pins import PinRegistry
from asyncllm.models import CausalLM
from asyncllm.outputs import Completion, Usage
from asyncllm.runner import KVCacheSpec, ModelRunner
from asyncllm.sampling import SamplingParams, SamplingRow
from asyncllm.scheduler import Scheduler, SchedulerStep
from asyncllm.sequence import FinishReason, SequenceState
from asyncllm.streams import OutputChannel, RequestStream, TextStream
from asyncllm.tokenizer import Tokenizer

if TYPE_CHECKING:
    from asyncllm.session import Session

logger = logging.getLogger("asyncllm")
T = TypeVar("T")

Message = dict[str, Any]
Prompt = str | Sequence[int] | Sequence[Message]


class EngineClosedError(RuntimeError):
    """The engine was closed (or failed) while the request was waiting or running."""


@dataclass(frozen=True)
class EngineStats:
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_cached: int
    running: int
    waiting: int
    sessions_pinned: int
    num_preemptions: int


@dataclass
class _Request:
    seq: SequenceState
    channel: OutputChannel
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    banned_until_min: tuple[int, ...]


class AsyncEngine:
    """Continuous-batching inference inside the caller's asyncio loop.

    Invariants: every submitted request ends with exactly one final output (``finish_reason`` set) or
    an exception on its stream; a request's KV blocks are released (or pinned for its session) in the
    loop iteration that finishes it; after all requests end and sessions close, no block is referenced.
    """

    def __init__(
        self,
        runner: ModelRunner,
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
        spec = runner.spec
        self._blocks = BlockManager(spec.num_blocks, spec.block_size,
                                    enable_prefix_caching=self.config.enable_prefix_caching)
        self._pins = PinRegistry(self._blocks)
        self._scheduler = Scheduler(self._blocks, self._pins, max_num_seqs=self.config.max_num_seqs,
                                    max_num_batched_tokens=self.config.max_num_batched_tokens)
        model_max = self.config.max_model_len or model_config.max_position_embeddings
        self.max_model_len = min(model_max, spec.num_blocks * spec.block_size)
        self._eos_ids = frozenset(tokenizer.eos_token_ids) | frozenset(model_config.eos_token_ids)
        self._requests: dict[str, _Request] = {}
        self._pending_aborts: set[str] = set()
        self._flushing: dict[str, SequenceState] = {}
        self._settled: dict[Hashable, asyncio.Event] = {}
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        # One thread runs every model step (and, via from_pretrained/from_model, the loading): a second
        # thread doing torch work gets its own OpenMP team, and two teams on few cores slow each other down.
        self._executor = worker or _model_thread()
        self._closing = False
        self._failure: BaseException | None = None
        runner.seed(self.config.seed)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, model: str | os.PathLike[str], *, config: EngineConfig | None = None, **overrides: Any
    ) -> AsyncEngine:
        """Load an HF directory, a hub id (when online or cached) or a ``.gguf`` file.

        Keyword overrides are ``EngineConfig`` fields, e.g. ``num_kv_blocks=512`` or ``device="cpu"``.
        """
        config = (config or EngineConfig()).replace(**overrides) if overrides else (config or EngineConfig())
        worker = _model_thread()
        try:
            net, checkpoint_path = worker.submit(_load_model, model, config).result()
            tokenizer = Tokenizer.from_path(checkpoint_path)
            return cls.from_model(net, tokenizer, config=config, worker=worker)
        except BaseException:
            worker.shutdown(wait=False)
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
        config = (config or EngineConfig()).replace(**overrides) if overrides else (config or EngineConfig())
        device = config.resolved_device()
        dtype = config.resolved_dtype()
        num_blocks = _num_kv_blocks(config, model.config, device, dtype)
        spec = KVCacheSpec.for_model(model.config, num_blocks=num_blocks, block_size=config.block_size, dtype=dtype)
        worker = worker or _model_thread()
        graphs = decode_graphs_for(config, model, device)
        runner = worker.submit(ModelRunner, model, spec, device=device, decode_graphs=graphs).result()
        return cls(runner, tokenizer, model.config, config, worker=worker)

    # -- lifecycle -----------------------------------------------------------------------------
    async def __aenter__(self) -> AsyncEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start the loop task in the running event loop (idempotent; also done on first use)."""
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
        loop = asyncio.get_running_loop()
        if self._task is not None:
            if loop is not self._loop:
                raise RuntimeError("AsyncEngine is bound to another event loop; create one engine per loop")
            return
        self._loop = loop
        self._wakeup = asyncio.Event()
        self._task = loop.create_task(self._run(), name="asyncllm-engine")

    async def aclose(self) -> None:
        """Stop the loop; in-flight requests end with ``EngineClosedError``. Idempotent."""
        if self._closing:
            return
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            with contextlib.suppress(BaseException):
                await self._task
        self._fail_all(EngineClosedError("engine closed while the request was in flight"))
        for seq in list(self._flushing.values()):
            self._end_flush(seq, keep=False)
        for owner in self._pins.owners():
            self._pins.release(owner)
        self._executor.shutdown(wait=True)

    @property
    def model(self) -> CausalLM:
        """The served model (read-only use: e.g. counting weight bytes or building a second engine)."""
        return self._runner.model

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

    async def run_on_model_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the engine's model thread, between model steps.

        Use it for other torch work in the same process: torch work on a second thread starts a second
        OpenMP thread team, and two teams on a small CPU slow the engine's steps down (about 15% per step
        measured on a 2-core machine, even when the other team had finished its work before).
        """
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def stats(self) -> EngineStats:
        return EngineStats(
            kv_blocks_total=self._blocks.num_blocks,
            kv_blocks_used=self._blocks.num_referenced,
            kv_blocks_cached=self._blocks.num_evictable_cached,
            running=len(self._scheduler.running),
            waiting=len(self._scheduler.waiting),
            sessions_pinned=len(self._pins),
            num_preemptions=self._scheduler.num_preemptions,
        )

    # -- public request API --------------------------------------------------------------------
    def stream(self, prompt: Prompt, *, params: SamplingParams | None = None, **sampling: Any) -> TextStream:
        """Stream ``str`` deltas of the completion of ``prompt`` (text, token ids or chat messages)."""
        return TextStream(self.stream_detailed(prompt, params=params, **sampling))

    def stream_detailed(
        self, prompt: Prompt, *, params: SamplingParams | None = None, **sampling: Any
    ) -> RequestStream:
        """Stream ``StepOutput``s (token ids, text delta, logprobs, finish reason, usage)."""
        return self._submit(self.encode_prompt(prompt), SamplingParams.from_kwargs(params, **sampling))

    async def generate(self, prompt: Prompt, *, params: SamplingParams | None = None, **sampling: Any) -> Completion:
        """Run ``prompt`` to completion."""
        return await self.stream_detailed(prompt, params=params, **sampling).collect()

    def session(self, system: str | None = None, *, messages: Sequence[Message] | None = None) -> Session:
        """A multi-turn chat whose KV stays pinned between turns (see ``asyncllm.Session``)."""
        from asyncllm.session import Session

        return Session(self, system=system, messages=messages)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids for a text prompt, a token id list or a list of chat messages."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: must not be empty")
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, Sequence) or isinstance(prompt, (bytes, bytearray)) or len(prompt) == 0:
            raise ValueError("prompt: must be a non-empty str, list of token ids or list of chat messages")
        if all(isinstance(m, dict) for m in prompt):
            return self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True)  # type: ignore[arg-type]
        ids = list(prompt)
        vocab = self.model_config.vocab_size
        for i, token in enumerate(ids):
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
                raise ValueError(f"prompt[{i}]: token ids must be ints in [0, {vocab}), got {token!r}")
        return ids

    # -- submission ----------------------------------------------------------------------------
    def _submit(
        self,
        token_ids: list[int],
        params: SamplingParams,
        *,
        session_id: Hashable | None = None,
        on_done: Callable[[Completion | None], None] | None = None,
    ) -> RequestStream:
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt: {len(token_ids)} tokens leave no room to generate within max_model_len={self.max_model_len}"
            )
        room = self.max_model_len - len(token_ids)
        if params.max_tokens is not None and params.max_tokens > room:
            raise ValueError(
                f"max_tokens: {params.max_tokens} plus the prompt's {len(token_ids)} tokens exceeds "
                f"max_model_len={self.max_model_len}"
            )
        self._check_token_ids(params)
        max_new = params.max_tokens if params.max_tokens is not None else room
        request_id = f"req-{next(self._ids)}"
        seq = SequenceState(request_id, list(token_ids), params, max_total_tokens=len(token_ids) + max_new,
                  session_id=session_id)
        channel = OutputChannel(request_id, keep_logprobs=params.logprobs is not None)
        detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids=token_ids,
                                       skip_special_tokens=params.skip_special_tokens, stop=params.stop)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self._runner.device)
            generator.manual_seed(params.seed)
        banned = tuple(sorted(self._eos_ids | set(params.stop_token_ids))) if params.min_tokens else ()
        request = _Request(seq, channel, detok, generator, banned)

        async def start() -> None:
            self._ensure_started()
            if session_id is not None:
                await self._session_settled(session_id)
            self._scheduler.add(seq)
            self._requests[request_id] = request
            assert self._wakeup is not None
            self._wakeup.set()

        return RequestStream(channel, self._abort_threadsafe, start, on_done)

    def _check_token_ids(self, params: SamplingParams) -> None:
        vocab = self.model_config.vocab_size
        for token in params.stop_token_ids:
            if not 0 <= token < vocab:
                raise ValueError(f"stop_token_ids: {token} is outside the vocabulary [0, {vocab})")
        for token in params.logit_bias or {}:
            if not 0 <= token < vocab:
                raise ValueError(f"logit_bias: token {token} is outside the vocabulary [0, {vocab})")

    def abort(self, request_id: str) -> None:
        """Abort a request; its stream ends with ``finish_reason == "abort"``. Call from the loop thread."""
        request = self._requests.get(request_id)
        if request is None:
            return
        self._pending_aborts.add(request_id)
        if self._wakeup is not None:
            self._wakeup.set()

    def _abort_threadsafe(self, request_id: str) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self.abort(request_id)
        else:
            loop.call_soon_threadsafe(self.abort, request_id)

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
                    await asyncio.sleep(0)
                    continue
                rows = self._sampling_rows(step)
                try:
                    output = await self._loop.run_in_executor(self._executor, self._runner.step, step.chunks, rows)
                except Exception as error:  # a failed step fails its requests; others keep being served
                    logger.exception("model step failed")
                    for chunk in step.chunks:
                        if chunk.seq.flush_only:
                            self._end_flush(chunk.seq, keep=False)
                        self._fail_request(chunk.seq.request_id, error)
                    continue
                self._scheduler.on_step_done(step.chunks)
                self._process(step, output)
                self._complete_flushes(step)
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            # the event loop is shutting down (e.g. asyncio.run ending without aclose): a close, not a failure
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
        rows = []
        for chunk in step.chunks:
            if not chunk.samples:
                continue
            request = self._requests[chunk.seq.request_id]
            seq = request.seq
            params = seq.params
            needs_history = params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty
            blocked = request.banned_until_min if seq.num_output_tokens < params.min_tokens else ()
            rows.append(SamplingRow(
                params=params,
                prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens] if needs_history else (),
                output_token_ids=seq.output_token_ids if needs_history else (),
                generator=request.generator,
                min_tokens_blocked_ids=blocked,
            ))
        return rows

    def _process(self, step: SchedulerStep, output: Any) -> None:
        sampled = iter(zip(output.token_ids, output.logprobs, strict=True))
        for chunk in step.chunks:
            if not chunk.samples:
                continue
            token, logprob = next(sampled)
            request = self._requests.get(chunk.seq.request_id)
            if request is None or request.seq.is_finished:
                continue
            self._append_token(request, token, logprob)

    def _append_token(self, request: _Request, token: int, logprob: Any) -> None:
        seq = request.seq
        params = seq.params
        seq.token_ids.append(token)
        reason: FinishReason | None = None
        text = ""
        if (token in self._eos_ids and not params.ignore_eos) or token in params.stop_token_ids:
            reason = "stop"
        else:
            text = request.detokenizer.push(token)
            if request.detokenizer.stopped:
                reason = "stop"
        if reason is None and (len(seq.token_ids) >= seq.max_total_tokens or len(seq.token_ids) >= self.max_model_len):
            reason = "length"
        logprobs = [logprob] if logprob is not None else None
        if reason is None:
            request.channel.push([token], text, logprobs)
            return
        if not request.detokenizer.stopped:
            text += request.detokenizer.finish()
        if seq.session_id is not None:
            self._finish_keeping_kv(request, reason, [token], text, logprobs)
        else:
            self._finish(request, reason, [token], text, logprobs)

    def _finish(self, request: _Request, reason: FinishReason, tokens: list[int], text: str,
                logprobs: Any = None) -> None:
        seq = request.seq
        self._scheduler.finish(seq, reason)
        request.channel.push(tokens, text, logprobs, finish_reason=reason, usage=self._usage(seq))
        del self._requests[seq.request_id]

    def _finish_keeping_kv(self, request: _Request, reason: FinishReason, tokens: list[int], text: str,
                           logprobs: Any) -> None:
        """End a session turn for its caller now, but keep its sequence for one more KV-only step that
        computes the last sampled token's KV, so the next turn reuses every token of this one."""
        seq = request.seq
        seq.flush_only = True
        seq.finish_reason = reason
        del self._requests[seq.request_id]
        self._flushing[seq.request_id] = seq
        self._settled.setdefault(seq.session_id, asyncio.Event()).clear()
        request.channel.push(tokens, text, logprobs, finish_reason=reason, usage=self._usage(seq))

    def _complete_flushes(self, step: SchedulerStep) -> None:
        for chunk in step.chunks:
            seq = chunk.seq
            if seq.flush_only and seq.num_computed_tokens == len(seq.token_ids):
                self._end_flush(seq, keep=True)

    def _end_flush(self, seq: SequenceState, *, keep: bool) -> None:
        self._flushing.pop(seq.request_id, None)
        self._scheduler.finish(seq, seq.finish_reason if keep and seq.finish_reason else "abort")
        event = self._settled.pop(seq.session_id, None)
        if event is not None:
            event.set()

    async def _session_settled(self, session_id: Hashable) -> None:
        event = self._settled.get(session_id)
        if event is not None:
            await event.wait()

    @staticmethod
    def _usage(seq: SequenceState) -> Usage:
        return Usage(prompt_tokens=seq.num_prompt_tokens, completion_tokens=seq.num_output_tokens,
                     cached_tokens=seq.num_cached_tokens or 0)

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

    # -- session support -----------------------------------------------------------------------
    def _open_session(self, session_id: Hashable) -> None:
        self._pins.open(session_id)

    async def _close_session(self, session_id: Hashable) -> None:
        """Release the session's KV and refuse pins from any turn still in flight."""
        self._pins.close(session_id)
        if self.is_running:
            await self._session_settled(session_id)

    def _release_session(self, session_id: Hashable) -> None:
        """Drop a session's pinned KV (the session stays open)."""
        self._pins.release(session_id)


def _model_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="asyncllm-model")


def _load_model(model: str | os.PathLike[str], config: EngineConfig) -> tuple[CausalLM, Path]:
    """Read the checkpoint and build the model (on the engine's model thread); returns the model and the
    local path its tokenizer is read from."""
    from asyncllm.loaders import load_checkpoint
    from asyncllm.models import build_model

    checkpoint = load_checkpoint(model)
    device = config.resolved_device()
    dtype = config.resolved_dtype()
    ops = get_kernel_ops(config.kernel_backend, device)
    net = build_model(ModelConfig.from_hf_config(checkpoint.hf_config), ops, dtype=dtype, device=device)
    net.load_weights(checkpoint.tensors(dtype))
    return net, checkpoint.local_path


def _num_kv_blocks(config: EngineConfig, model: ModelConfig, device: torch.device, dtype: torch.dtype) -> int:
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    spec = KVCacheSpec.for_model(model, num_blocks=1, block_size=config.block_size, dtype=dtype)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return max(1, int(free * config.gpu_memory_fraction) // spec.bytes_per_block)
    return max(1, config.kv_cache_tokens // config.block_size)
