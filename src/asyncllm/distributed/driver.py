"""The driver side of tensor parallelism: ``TensorParallelRunner`` starts one worker process per rank and
stands in for ``ModelRunner`` in the engine (``step``, ``seed``, ``spec``, ``max_model_len``, ``device``).

Process model: the engine's loop stays the driver (scheduling, block tables); its model thread calls
``step``, which sends the step to every rank over its pipe and waits for every rank's reply (rank 0's
carries the sampled tokens), so the event loop never blocks on the workers. The driver process joins no
process group and never touches a GPU: the ranks rendezvous through a file in a private temporary
directory and form their own group.

Failure: while waiting, the driver watches every worker's pipe *and* its process sentinel. A rank that
dies (any signal, any exit) or reports an error makes the runner broken: every worker is stopped and this
and every later ``step`` raises ``WorkerFailedError`` (a ``RunnerFailedError``), which fails the engine as
a whole, never a hang. A rank that fails to start makes ``start`` raise the rank's own exception (e.g. the
``ValueError`` of a shape that does not split) after stopping the others.

Invariant: after ``close`` (or a failure) no worker process of this runner is alive; a runner that is
garbage-collected without ``close`` stops its workers too (``weakref.finalize``).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import shutil
import signal
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import torch

from asyncllm.config import EngineConfig, ModelConfig
from asyncllm.distributed.protocol import (
    Reply,
    Seed,
    StepMessage,
    StepReply,
    Stop,
    encode_chunks,
    encode_rows,
)
from asyncllm.distributed.worker import WorkerReady, WorkerSpec, default_rank_threads, rank_cpus, run_worker
from asyncllm.runner import KVCacheSpec
from asyncllm.sampling import SamplerOutput, SamplingRow
from asyncllm.scheduler import ScheduledChunk
from asyncllm.step_isolation import RunnerFailedError

STOP_TIMEOUT_S = 10.0
"""How long ``close`` waits for a worker to leave on its own before killing it."""


class WorkerFailedError(RunnerFailedError):
    """A tensor-parallel worker process died or raised; the runner has stopped every worker."""


@dataclass(frozen=True)
class RemoteModel:
    """What the engine reads of a model that lives in the worker processes: its config, quantization name
    and resident weight bytes (summed over the ranks)."""

    config: ModelConfig
    quantization_name: str
    weight_bytes: int


def _stop_workers(processes: Sequence[BaseProcess], conns: Sequence[Connection], directory: str,
                  timeout: float) -> None:
    """Ask every live worker to stop, wait up to ``timeout`` s, kill whoever is left; remove ``directory``."""
    for process, conn in zip(processes, conns, strict=True):
        if process.is_alive():
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(Stop())
    deadline = timeout
    for process in processes:
        process.join(deadline)
        deadline = 0.5
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join(5.0)
    for conn in conns:
        conn.close()
    shutil.rmtree(directory, ignore_errors=True)


class TensorParallelRunner:
    """Runs a model split over ``size`` worker processes (see the module docstring)."""

    def __init__(self, processes: list[BaseProcess], conns: list[Connection], directory: str,
                 ready: Sequence[WorkerReady]) -> None:
        self._processes = processes
        self._conns = conns
        self._broken: WorkerFailedError | None = None
        self.size = len(processes)
        first = ready[0]
        self.spec: KVCacheSpec = first.spec
        self.max_model_len = first.max_model_len
        self.device = torch.device("cpu")
        """Where the engine keeps per-request generators: the driver's CPU (rank 0 samples)."""
        self.model = RemoteModel(first.model_config, first.quantization, sum(r.weight_bytes for r in ready))
        self._finalizer = weakref.finalize(self, _stop_workers, processes, conns, directory, STOP_TIMEOUT_S)

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def start(cls, model: str, config: EngineConfig) -> TensorParallelRunner:
        """Spawn ``config.tensor_parallel_size`` ranks on the checkpoint at the local path ``model`` and
        wait until each has loaded its slice; a rank's startup error is raised here."""
        size = config.tensor_parallel_size
        device = config.resolved_device()
        if device.type == "cuda" and torch.cuda.device_count() < size:
            raise ValueError(f"tensor_parallel_size: {size} ranks need {size} CUDA GPUs, "
                             f"{torch.cuda.device_count()} are visible")
        context = mp.get_context("spawn")
        directory = tempfile.mkdtemp(prefix="asyncllm-tp-")
        init_method = (Path(directory) / "rendezvous").as_uri()
        threads = default_rank_threads(config, size)
        cpus = rank_cpus(config, size)
        processes: list[BaseProcess] = []
        conns: list[Connection] = []
        try:
            for rank in range(size):
                parent, child = context.Pipe()
                spec = WorkerSpec(model, config, rank, size, init_method, threads, cpus[rank])
                process = context.Process(target=run_worker, args=(spec, child), name=f"asyncllm-tp-rank{rank}",
                                          daemon=True)
                process.start()
                child.close()
                processes.append(process)
                conns.append(parent)
            ready = _gather(processes, conns, [True] * size, "starting")
        except BaseException:
            _stop_workers(processes, conns, directory, 0.0)
            raise
        return cls(processes, conns, directory, ready)

    # -- the runner interface ----------------------------------------------------------------------
    @property
    def pids(self) -> list[int]:
        """The worker processes' ids, rank order."""
        return [process.pid for process in self._processes if process.pid is not None]

    def seed(self, seed: int) -> None:
        self._call(0, Seed(seed))

    def step(self, chunks: Sequence[ScheduledChunk], rows: Sequence[SamplingRow]) -> SamplerOutput:
        """Run one step on every rank; rank 0's sampled tokens (seeded rows' generators advanced here)."""
        if self._broken is not None:
            raise self._broken
        if not chunks:
            raise ValueError("chunks: a step needs at least one chunk")
        if any(chunk.seq.images for chunk in chunks):
            raise ValueError("images: a tensor-parallel engine serves text models only")
        wires = encode_chunks(chunks, self.spec.block_size)
        row_wires = encode_rows(rows)
        messages = [StepMessage(wires, len(rows), row_wires if rank == 0 else None) for rank in range(self.size)]
        replies = self._exchange(messages, "running a step")
        reply: StepReply = replies[0]
        for row, state in zip(rows, reply.generator_states, strict=True):
            if row.generator is not None and state is not None:
                row.generator.set_state(state)
        return reply.output

    def forward_logits(self, chunks: Sequence[ScheduledChunk]) -> torch.Tensor:
        """Run ``chunks`` (writing their KV) on every rank and return rank 0's gathered float32 logits
        ``[R, V]`` (on the CPU) for the ``R`` chunks that sample, in chunk order (as ``ModelRunner``)."""
        if not chunks:
            raise ValueError("chunks: a step needs at least one chunk")
        wires = encode_chunks(chunks, self.spec.block_size)
        num_rows = sum(1 for chunk in chunks if chunk.samples)
        messages = [StepMessage(wires, num_rows, () if rank == 0 else None, return_logits=True)
                    for rank in range(self.size)]
        reply: StepReply = self._exchange(messages, "computing logits")[0]
        if reply.logits is None:
            raise WorkerFailedError("tensor-parallel rank 0 returned no logits")
        return reply.logits

    def close(self) -> None:
        """Stop every worker (they leave their group and exit; stragglers are killed); later steps raise
        ``WorkerFailedError``. Idempotent."""
        self._shutdown(STOP_TIMEOUT_S)
        if self._broken is None:
            self._broken = WorkerFailedError("the tensor-parallel runner is closed")

    @property
    def failure(self) -> WorkerFailedError | None:
        """Why the runner stopped, or ``None`` while it works."""
        return self._broken

    # -- internals ---------------------------------------------------------------------------------
    def _call(self, rank: int, message: Any) -> Any:
        messages: list[Any] = [None] * self.size
        messages[rank] = message
        return self._exchange(messages, type(message).__name__.lower())[rank]

    def _exchange(self, messages: Sequence[Any], what: str) -> list[Any]:
        """Send ``messages[r]`` to rank ``r`` (``None``: nothing) and return each rank's payload."""
        if self._broken is not None:
            raise self._broken
        expected = [message is not None for message in messages]
        try:
            for conn, message in zip(self._conns, messages, strict=True):
                if message is not None:
                    conn.send(message)
            return _gather(self._processes, self._conns, expected, what)
        except WorkerFailedError as error:
            self._fail(error)
            raise
        except BaseException as error:
            broken = WorkerFailedError(f"tensor-parallel runner failed while {what}: {error!r}")
            self._fail(broken)
            raise broken from error

    def _fail(self, error: WorkerFailedError) -> None:
        """Mark the runner broken and kill every worker at once (the survivors may be waiting inside a
        collective for the rank that failed, so there is nothing to wait for)."""
        self._broken = error
        self._shutdown(0.0)

    def _shutdown(self, timeout: float) -> None:
        state = self._finalizer.detach()
        if state is not None:
            _, _, args, _ = state
            _stop_workers(*args[:3], timeout)


def _gather(processes: Sequence[BaseProcess], conns: Sequence[Connection], expected: Sequence[bool],
            what: str) -> list[Any]:
    """Each expected rank's ``ok`` payload, watching pipes and process sentinels together: a rank's error
    is raised (as ``WorkerFailedError`` chained to it, or as itself while ``starting``), a rank that exits
    without replying raises ``WorkerFailedError``."""
    payloads: list[Any] = [None] * len(conns)
    pending = {rank for rank, wanted in enumerate(expected) if wanted}
    while pending:
        waitables: list[Any] = [conns[rank] for rank in pending] + [processes[rank].sentinel for rank in pending]
        ready = wait(waitables)
        for rank in sorted(pending):
            conn = conns[rank]
            if conn in ready or conn.poll():
                try:
                    reply: Reply = conn.recv()
                except (EOFError, OSError):
                    raise _died(processes[rank], rank, what) from None
                if reply.kind == "error":
                    if what == "starting":
                        error = reply.payload
                        error.add_note(f"raised in tensor-parallel rank {rank}:\n{reply.traceback}")
                        raise error
                    raise WorkerFailedError(f"tensor-parallel rank {rank} failed while {what}: {reply.payload!r}\n"
                                            f"{reply.traceback}") from reply.payload
                payloads[rank] = reply.payload
                pending.discard(rank)
            elif processes[rank].sentinel in ready:
                raise _died(processes[rank], rank, what)
    return payloads


def _died(process: BaseProcess, rank: int, what: str) -> WorkerFailedError:
    process.join(1.0)
    code = process.exitcode
    killed = code is not None and code < 0
    how = f"was killed by {signal.Signals(-code).name}" if killed and code else f"exited with code {code}"
    return WorkerFailedError(f"tensor-parallel rank {rank} (pid {process.pid}) {how} while {what}")


__all__ = ["RemoteModel", "TensorParallelRunner", "WorkerFailedError"]
