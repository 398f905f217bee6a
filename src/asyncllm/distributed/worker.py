"""One tensor-parallel rank: a spawned process that joins the group, loads its slice of the model, holds
its slice of the KV pool and runs the steps the driver sends, until told to stop or the driver goes away.

Lifecycle: ``run_worker`` replies once to say it is ready (``WorkerReady``) or why it could not start, then
answers every message in order. Every rank runs every step (the collectives need all of them); rank 0 also
samples from the gathered logits and returns the tokens. After any error the rank replies with it and
exits: a rank that failed part-way through a step leaves the others inside a collective, so the group is
unusable and the driver stops every rank. End of the pipe (the driver exited) also ends the process.

The process group is this worker process's default group; the driver's process never joins one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection

import torch

from asyncllm.config import EngineConfig, ModelConfig
from asyncllm.cpu_threads import affinity_cpus, split_cpus
from asyncllm.distributed.parallel_state import TensorParallel, head_partition
from asyncllm.distributed.protocol import Reply, Seed, StepMessage, StepReply, Stop, decode_chunks, decode_rows
from asyncllm.runner import KVCacheSpec, ModelRunner
from asyncllm.sampling import SamplerOutput


@dataclass(frozen=True)
class WorkerSpec:
    """How rank ``rank`` of ``size`` starts: the checkpoint (a local path), the engine config the driver
    validated, the group's rendezvous (``init_method``), the rank's CPU threads and, for a CPU rank, the
    CPUs it is pinned to (``None``: not pinned)."""

    model: str
    config: EngineConfig
    rank: int
    size: int
    init_method: str
    threads: int
    cpus: tuple[int, ...] | None = None


@dataclass(frozen=True)
class WorkerReady:
    """A started rank: its KV pool (the same block count on every rank), context bound and weight bytes."""

    spec: KVCacheSpec
    max_model_len: int
    weight_bytes: int
    quantization: str
    model_config: ModelConfig


def rank_config(config: EngineConfig, rank: int) -> EngineConfig:
    """The engine config a rank builds with: its own device (``cuda:rank`` or the CPU) and the paths the
    tensor-parallel model does not support turned off: CUDA graphs (``enforce_eager``), the fused CPU decode
    layer (``native_layer_max_rows=0``) and the thread governor; the load progress bar on rank 0 only.
    Its ``tensor_parallel_size`` is 1: the rank builds its slice like a one-device engine, the split itself
    comes from the ``TensorParallel`` the model is built with."""
    device = f"cuda:{rank}" if config.resolved_device().type == "cuda" else "cpu"
    return config.replace(device=device, tensor_parallel_size=1, enforce_eager=True, native_layer_max_rows=0,
                          adaptive_threads=False, load_progress=config.load_progress and rank == 0)


def run_worker(spec: WorkerSpec, conn: Connection) -> None:
    """The process's entry point (``multiprocessing`` spawn target)."""
    try:
        runner, ready = _start(spec)
    except BaseException as error:  # any startup failure goes back to the caller of from_pretrained
        _send(conn, Reply.error(error))
        return
    if not _send(conn, Reply("ok", ready)):
        return
    sampler_generator = torch.Generator(device="cpu")
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break  # the driver is gone
        if isinstance(message, Stop):
            _send(conn, Reply("ok"))
            break
        try:
            if isinstance(message, Seed):
                runner.seed(message.seed)
                sampler_generator.manual_seed(message.seed)
                reply = Reply("ok")
            elif isinstance(message, StepMessage):
                reply = Reply("ok", _step(runner, message, sampler_generator))
            else:
                raise TypeError(f"message: unknown {type(message).__name__}")
        except BaseException as error:
            _send(conn, Reply.error(error))
            break
        if not _send(conn, reply):
            break
    _leave_group()


def _send(conn: Connection, reply: Reply) -> bool:
    try:
        conn.send(reply)
        return True
    except (BrokenPipeError, EOFError, OSError):
        return False


def _leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _start(spec: WorkerSpec) -> tuple[ModelRunner, WorkerReady]:
    import torch.distributed as dist

    from asyncllm.builder import kv_cache_spec, max_model_len_for, model_from_checkpoint
    from asyncllm.layers.weights import parameter_bytes
    from asyncllm.loaders import load_checkpoint

    config = rank_config(spec.config, spec.rank)
    device = config.resolved_device()
    if spec.cpus is not None and device.type == "cpu" and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, spec.cpus)
    torch.set_num_threads(spec.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=spec.init_method,
                            rank=spec.rank, world_size=spec.size)
    parallel = TensorParallel(spec.rank, spec.size, dist.group.WORLD)
    checkpoint = load_checkpoint(spec.model, dequantize_weights=config.dequantize_weights)
    model = model_from_checkpoint(checkpoint, config, parallel=parallel)
    model_config = model.config
    heads = head_partition(model_config.num_attention_heads, model_config.num_key_value_heads, parallel)
    kv = kv_cache_spec(config, model_config, device, num_kv_heads=heads.num_kv_heads)
    # every rank must hold the same blocks: the driver's block tables index all of them at once
    kv = replace(kv, num_blocks=parallel.all_reduce_min(kv.num_blocks, device))
    runner = ModelRunner(model, kv, device=device, max_model_len=max_model_len_for(model, kv, config.max_model_len))
    ready = WorkerReady(kv, runner.max_model_len, parameter_bytes(model),
                        str(getattr(model, "quantization_name", "unquantized")), model_config)
    return runner, ready


@torch.inference_mode()
def _step(runner: ModelRunner, message: StepMessage, cpu_generator: torch.Generator) -> StepReply | None:
    """Run one step on this rank; rank 0 (the one given ``rows``) samples and returns the tokens.

    Seeded rows on a CUDA rank are sampled on the CPU (with ``cpu_generator`` for the unseeded rows of the
    same step), because their generators' states are CPU generator states."""
    chunks = decode_chunks(message.chunks)
    if message.return_logits:
        logits = runner.forward_logits(chunks)  # type: ignore[arg-type]
        return StepReply(SamplerOutput([], []), logits=logits.cpu().clone()) if message.rows is not None else None
    if message.rows is None:
        if message.num_rows:
            runner.forward_logits(chunks)  # type: ignore[arg-type]
        else:
            runner.step(chunks, [])  # type: ignore[arg-type]
        return None
    seeded = any(row.generator_state is not None for row in message.rows)
    if seeded and runner.device.type != "cpu":
        rows = decode_rows(message.rows, torch.device("cpu"))
        logits = runner.forward_logits(chunks)  # type: ignore[arg-type]
        output = runner.sampler(logits.cpu(), rows, cpu_generator)
    else:
        rows = decode_rows(message.rows, runner.device)
        output = runner.step(chunks, rows)  # type: ignore[arg-type]
    states = tuple(row.generator.get_state() if row.generator is not None else None for row in rows)
    return StepReply(output, states)


def default_rank_threads(config: EngineConfig, size: int) -> int:
    """CPU threads per rank: ``config.num_threads`` when set (per rank), else the CPUs this process may use
    shared evenly by the ``size`` ranks (at least one each). A CUDA rank keeps one host thread per share too."""
    if config.num_threads is not None:
        return config.num_threads
    return max(1, config.resolved_num_threads() // size)


def rank_cpus(config: EngineConfig, size: int) -> list[tuple[int, ...] | None]:
    """Per rank, the CPUs a CPU rank is pinned to: this process's allowed CPUs in ``size`` disjoint
    contiguous sets (``cpu_threads.split_cpus``); no pinning on CUDA or with fewer CPUs than ranks."""
    if config.resolved_device().type != "cpu":
        return [None] * size
    parts = split_cpus(affinity_cpus(), size)
    return list(parts) if parts is not None else [None] * size


__all__ = ["WorkerReady", "WorkerSpec", "default_rank_threads", "rank_config", "rank_cpus", "run_worker"]
