"""Mixture-of-experts layers: stacked expert weights and the routed experts over them.

``ExpertWeights`` holds one stacked tensor ``[E, N, K]`` whose expert slices arrive one checkpoint tensor at
a time: shard id ``"{e}.{part}"`` writes expert ``e``'s ``part`` (one of ``parts``, stacked along ``N`` in
order). ``FusedMoE`` is a block's experts: ``gate_up`` ``[E, 2I, H]`` (parts ``gate``, ``up``) and ``down``
``[E, H, I]`` (part ``down``), computed by the bundle's ``moe`` op for routing decided by the caller.

Tensor parallelism (``parallel`` with more than one rank) splits every expert, not the set of experts: rank
``r`` holds intermediate features ``[r I/N, (r+1) I/N)`` of every expert, so ``gate_up`` is split by output
rows (``split="column"``: each part's rows evenly) and ``down`` by input columns (``split="row"``). The
loader receives each full checkpoint tensor and copies only the rank's slice. ``FusedMoE.forward`` then
returns this rank's partial sum, which the caller all-reduces (once, together with anything else it adds).
A size that does not divide raises ``ValueError`` naming ``tensor_parallel_size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from asyncllm.distributed.parallel_state import SINGLE, TensorParallel, even_range
from asyncllm.kernels.bundle import KernelOps
from asyncllm.layers.weights import ShardId, copy_checked, empty_parameter


class ExpertWeights(nn.Module):
    """``weight`` ``[num_experts, sum(part_sizes), input_size]``; shard ``"{e}.{part}"`` is expert ``e``'s
    ``part`` rows (``[part_size, input_size]``, as a per-expert checkpoint stores it).

    ``part_sizes`` and ``input_size`` are the checkpoint's (full) sizes. With ``parallel`` over more than
    one rank, ``split="column"`` keeps the rank's even share of each part's rows and ``split="row"`` the
    rank's even share of the input columns; ``weight`` has the local sizes (``local_part_sizes``,
    ``local_input_size``)."""

    def __init__(
        self, num_experts: int, parts: Sequence[str], part_sizes: Sequence[int], input_size: int, *,
        dtype: torch.dtype, device: torch.device, parallel: TensorParallel = SINGLE,
        split: Literal["column", "row"] | None = None,
    ) -> None:
        super().__init__()
        if num_experts <= 0 or input_size <= 0 or len(parts) != len(part_sizes) or min(part_sizes) <= 0:
            raise ValueError(f"ExpertWeights: bad shape {num_experts}, {parts}, {part_sizes}, {input_size}")
        if split not in (None, "column", "row"):
            raise ValueError(f"split: must be None, 'column' or 'row', got {split!r}")
        self.parts = tuple(parts)
        self.part_sizes = tuple(part_sizes)
        self.input_size = input_size
        self.parallel = parallel if split is not None else SINGLE
        self.split = split if self.parallel.is_parallel else None
        self.part_ranges = tuple((0, size) for size in self.part_sizes)
        self.input_range = (0, input_size)
        if self.split == "column":
            self.part_ranges = tuple(even_range(size, self.parallel, f"the expert {part} rows")
                                     for part, size in zip(self.parts, self.part_sizes, strict=True))
        elif self.split == "row":
            self.input_range = even_range(input_size, self.parallel, "the expert input columns")
        self.local_part_sizes = tuple(length for _, length in self.part_ranges)
        self.local_input_size = self.input_range[1]
        self.weight = empty_parameter(num_experts, sum(self.local_part_sizes), self.local_input_size, dtype=dtype,
                                      device=device)
        self.shard_ids: tuple[ShardId, ...] = tuple(f"{e}.{part}" for e in range(num_experts) for part in parts)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId) -> None:
        """Copy the rank's slice of expert ``e``'s full ``part`` tensor ``loaded`` (``[part_size, input_size]``)."""
        if shard_id not in self.shard_ids:
            raise ValueError(f"shard_id: expected '<expert>.<part>' with part in {self.parts}, got {shard_id!r}")
        expert, part = str(shard_id).split(".")
        index = self.parts.index(part)
        if self.split is not None:
            full = (self.part_sizes[index], self.input_size)
            if tuple(loaded.shape) != full:
                raise ValueError(f"expert {shard_id}: checkpoint tensor has shape {tuple(loaded.shape)}, "
                                 f"expected {full}")
            start, length = self.part_ranges[index]
            loaded = loaded.narrow(0, start, length).narrow(1, *self.input_range)
        offset = sum(self.local_part_sizes[:index])
        copy_checked(param.data[int(expert)].narrow(0, offset, self.local_part_sizes[index]), loaded,
                     f"expert {shard_id}")


class FusedMoE(nn.Module):
    """The experts of one sparse block: ``forward(x, topk_weights, topk_ids)`` is the bundle's ``moe``.

    With ``parallel`` over more than one rank every expert is split by its intermediate features (module
    docstring) and ``forward`` returns this rank's partial sum: the caller all-reduces it."""

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, ops: KernelOps, *,
        dtype: torch.dtype, device: torch.device, parallel: TensorParallel = SINGLE,
    ) -> None:
        super().__init__()
        self.ops = ops
        self.parallel = parallel
        self.gate_up = ExpertWeights(num_experts, ("gate", "up"), (intermediate_size, intermediate_size),
                                     hidden_size, dtype=dtype, device=device, parallel=parallel, split="column")
        self.down = ExpertWeights(num_experts, ("down",), (hidden_size,), intermediate_size, dtype=dtype,
                                  device=device, parallel=parallel, split="row")

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return self.ops.moe(x, topk_weights, topk_ids, self.gate_up.weight, self.down.weight)
