"""Dense linear layers, plain and merged (fused QKV, fused gate/up), loaded through ``weight_loader``.

Every layer computes ``y = x @ weight.T + bias`` with ``weight`` ``[output_size, input_size]``. Merged
layers stack several checkpoint matrices along the output dimension, in ``shard_ids`` order, and each
checkpoint matrix arrives separately: ``weight_loader(param, full_tensor, shard_id)`` copies it into rows
``offset : offset + size`` of the merged parameter (and the same rows of the bias). See
:mod:`asyncllm.layers.weights` for the contract that sharded or quantized replacements keep.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from asyncllm.kernels.bundle import LinearOp
from asyncllm.layers.weights import ShardId, copy_checked, empty_parameter, load_unsharded


class Linear(nn.Module):
    """A replicated linear layer loaded from one checkpoint tensor per parameter (``shard_id=None``).

    ``matmul`` computes ``x @ weight.T + bias`` (``F.linear`` unless a kernel bundle supplies a faster one).
    """

    shard_ids: tuple[ShardId, ...] = (None,)

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
        matmul: LinearOp = F.linear,
    ) -> None:
        super().__init__()
        self.matmul = matmul
        if input_size <= 0 or output_size <= 0:
            raise ValueError(f"input_size/output_size: must be positive, got {input_size}, {output_size}")
        self.input_size = input_size
        self.output_size = output_size
        self.weight = empty_parameter(output_size, input_size, dtype=dtype, device=device)
        self.bias: nn.Parameter | None
        if bias:
            self.bias = empty_parameter(output_size, dtype=dtype, device=device)
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        load_unsharded(param, loaded, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}"


class MergedColumnLinear(Linear):
    """Several linears over the same input, fused along the output dim: shards ``0 .. n-1`` in order.

    Invariant: ``output_size == sum(output_sizes)``; shard ``i`` owns output rows
    ``sum(output_sizes[:i]) : sum(output_sizes[:i + 1])``.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        *,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
        matmul: LinearOp = F.linear,
    ) -> None:
        if not output_sizes or any(size <= 0 for size in output_sizes):
            raise ValueError(f"output_sizes: must be a non-empty list of positive sizes, got {output_sizes}")
        super().__init__(input_size, sum(output_sizes), bias=bias, dtype=dtype, device=device, matmul=matmul)
        self.output_sizes = tuple(output_sizes)
        self.shard_ids = tuple(range(len(output_sizes)))

    def shard_index(self, shard_id: ShardId) -> int:
        """Position of ``shard_id`` in ``shard_ids``; unknown ids raise ``ValueError``."""
        if shard_id not in self.shard_ids:
            raise ValueError(f"shard_id: expected one of {self.shard_ids}, got {shard_id!r}")
        return self.shard_ids.index(shard_id)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        index = self.shard_index(shard_id)
        offset = sum(self.output_sizes[:index])
        size = self.output_sizes[index]
        copy_checked(param.data.narrow(0, offset, size), loaded, f"shard {shard_id!r}")


class QKVLinear(MergedColumnLinear):
    """Fused query/key/value projection: shard ``"q"`` is ``Hq * D`` rows, ``"k"`` and ``"v"`` ``Hk * D``."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        *,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
        matmul: LinearOp = F.linear,
    ) -> None:
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        super().__init__(hidden_size, (q_size, kv_size, kv_size), bias=bias, dtype=dtype, device=device,
                         matmul=matmul)
        self.shard_ids = ("q", "k", "v")
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views (no copy) of this layer's ``[T, (Hq + 2 Hk) * D]`` output as ``[T, H, D]`` q, k, v."""
        q, k, v = qkv.split(self.output_sizes, dim=-1)
        return (
            q.unflatten(-1, (self.num_heads, self.head_dim)),
            k.unflatten(-1, (self.num_kv_heads, self.head_dim)),
            v.unflatten(-1, (self.num_kv_heads, self.head_dim)),
        )
