"""Mixture-of-experts layers: stacked expert weights and the routed experts over them.

``ExpertWeights`` holds one stacked tensor ``[E, N, K]`` whose expert slices arrive one checkpoint tensor at
a time: shard id ``"{e}.{part}"`` writes expert ``e``'s ``part`` (one of ``parts``, stacked along ``N`` in
order). ``FusedMoE`` is a block's experts: ``gate_up`` ``[E, 2I, H]`` (parts ``gate``, ``up``) and ``down``
``[E, H, I]`` (part ``down``), computed by the bundle's ``moe`` op for routing decided by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from asyncllm.kernels.bundle import KernelOps
from asyncllm.layers.weights import ShardId, copy_checked, empty_parameter


class ExpertWeights(nn.Module):
    """``weight`` ``[num_experts, sum(part_sizes), input_size]``; shard ``"{e}.{part}"`` is expert ``e``'s
    ``part`` rows (``[part_size, input_size]``, as a per-expert checkpoint stores it)."""

    def __init__(
        self, num_experts: int, parts: Sequence[str], part_sizes: Sequence[int], input_size: int, *,
        dtype: torch.dtype, device: torch.device,
    ) -> None:
        super().__init__()
        if num_experts <= 0 or input_size <= 0 or len(parts) != len(part_sizes) or min(part_sizes) <= 0:
            raise ValueError(f"ExpertWeights: bad shape {num_experts}, {parts}, {part_sizes}, {input_size}")
        self.parts = tuple(parts)
        self.part_sizes = tuple(part_sizes)
        self.weight = empty_parameter(num_experts, sum(part_sizes), input_size, dtype=dtype, device=device)
        self.shard_ids: tuple[ShardId, ...] = tuple(f"{e}.{part}" for e in range(num_experts) for part in parts)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId) -> None:
        if shard_id not in self.shard_ids:
            raise ValueError(f"shard_id: expected '<expert>.<part>' with part in {self.parts}, got {shard_id!r}")
        expert, part = str(shard_id).split(".")
        index = self.parts.index(part)
        offset = sum(self.part_sizes[:index])
        copy_checked(param.data[int(expert)].narrow(0, offset, self.part_sizes[index]), loaded, f"expert {shard_id}")


class FusedMoE(nn.Module):
    """The experts of one sparse block: ``forward(x, topk_weights, topk_ids)`` is the bundle's ``moe``."""

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, ops: KernelOps, *,
        dtype: torch.dtype, device: torch.device,
    ) -> None:
        super().__init__()
        self.ops = ops
        self.gate_up = ExpertWeights(num_experts, ("gate", "up"), (intermediate_size, intermediate_size),
                                     hidden_size, dtype=dtype, device=device)
        self.down = ExpertWeights(num_experts, ("down",), (hidden_size,), intermediate_size, dtype=dtype,
                                  device=device)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return self.ops.moe(x, topk_weights, topk_ids, self.gate_up.weight, self.down.weight)
