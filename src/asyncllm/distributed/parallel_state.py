"""One rank's view of a tensor-parallel group: its rank, the group size, and the two collectives the
sharded layers need (sum across ranks, gather along the last dimension).

A ``TensorParallel`` is a value handed to the layers when the model is built; nothing is stored in a
module-level global. ``SINGLE`` (size 1) makes every collective the identity, so the single-process
path runs exactly the code it ran before tensor parallelism existed.

Partitioning rules (``head_partition``, ``even_range``, ``vocab_range``) are pure functions of the
shape, the size and the rank, so every rank computes the same plan without talking to the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TensorParallel:
    """Rank ``rank`` of ``size`` ranks; ``group`` is the ``torch.distributed`` process group the
    collectives run on (``None`` only when ``size == 1``).

    Invariant: ``0 <= rank < size``; every rank of a group calls the same collectives in the same order."""

    rank: int = 0
    size: int = 1
    group: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"tensor_parallel_size: must be an int >= 1, got {self.size!r}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank: must be in [0, {self.size}), got {self.rank!r}")

    @property
    def is_parallel(self) -> bool:
        return self.size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place; returns ``x``."""
        if self.size > 1:
            import torch.distributed as dist

            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` (same shape on all ranks) along the last dimension, rank order."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=-1)

    def all_reduce_min(self, value: int, device: torch.device) -> int:
        """The least of every rank's ``value`` (e.g. the KV blocks every rank can hold)."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.group)
        return int(tensor.item())


SINGLE = TensorParallel()
"""The one-process group: every collective is the identity."""


def even_range(total: int, parallel: TensorParallel, what: str) -> tuple[int, int]:
    """``(start, length)`` of this rank's equal share of ``total`` items; ``ValueError`` naming
    ``tensor_parallel_size`` and ``what`` when ``total`` does not divide."""
    if total % parallel.size:
        raise ValueError(f"tensor_parallel_size: {parallel.size} does not divide {what}={total}")
    length = total // parallel.size
    return parallel.rank * length, length


@dataclass(frozen=True)
class HeadPartition:
    """This rank's attention heads: query heads ``[q_start, q_start + num_heads)`` and key/value heads
    ``[kv_start, kv_start + num_kv_heads)`` (in head units). With fewer key/value heads than ranks each
    rank holds one key/value head, replicated on ``size / total_kv_heads`` ranks; otherwise the key/value
    heads are split evenly. Either way every local query head's key/value head is local."""

    q_start: int
    num_heads: int
    kv_start: int
    num_kv_heads: int


def head_partition(num_heads: int, num_kv_heads: int, parallel: TensorParallel) -> HeadPartition:
    """Split ``num_heads`` query and ``num_kv_heads`` key/value heads over the ranks (``ValueError`` naming
    ``tensor_parallel_size`` when the query heads do not divide, or the key/value heads neither divide nor
    are divided by the size)."""
    size, rank = parallel.size, parallel.rank
    q_start, local_heads = even_range(num_heads, parallel, "num_attention_heads")
    if num_kv_heads >= size:
        kv_start, local_kv = even_range(num_kv_heads, parallel, "num_key_value_heads")
    else:
        if size % num_kv_heads:
            raise ValueError(f"tensor_parallel_size: {size} is neither a divisor nor a multiple of "
                             f"num_key_value_heads={num_kv_heads}")
        kv_start, local_kv = rank * num_kv_heads // size, 1
    return HeadPartition(q_start, local_heads, kv_start, local_kv)


def vocab_range(vocab_size: int, parallel: TensorParallel) -> tuple[int, int, int]:
    """``(start, count, padded)``: this rank holds vocabulary rows ``[start, start + count)`` in a matrix of
    ``padded = ceil(vocab_size / size)`` rows (rows past ``count`` are zero). Gathering every rank's
    ``padded`` logits in rank order and keeping the first ``vocab_size`` gives the full vocabulary."""
    padded = -(-vocab_size // parallel.size)
    start = parallel.rank * padded
    count = max(0, min(padded, vocab_size - start))
    if vocab_size < parallel.size:
        raise ValueError(f"tensor_parallel_size: {parallel.size} exceeds vocab_size={vocab_size}")
    return start, count, padded
