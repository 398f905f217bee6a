"""Parameter creation and the weight-loading contract shared by every layer that owns weights.

Contract: a module that owns parameters exposes ``shard_ids`` (every logical shard it needs, ``(None,)``
for an unmerged tensor) and ``weight_loader(param, loaded, shard_id)``. The model calls it once per
checkpoint tensor with the *full, unsharded* tensor as stored in the checkpoint; the module alone decides
which slice of it to keep and where that slice lands in ``param``. A tensor-parallel or quantized
replacement keeps this contract (and the logical shapes of its constructor) and the model is unchanged.
Parameters are created uninitialised (``torch.empty``): their values come from the checkpoint.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

ShardId = str | int | None


@runtime_checkable
class WeightLoading(Protocol):
    """A module whose parameters are filled from checkpoint tensors through ``weight_loader``."""

    shard_ids: tuple[ShardId, ...]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId) -> None: ...


def empty_parameter(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    """An uninitialised, frozen parameter (inference only: no autograd graph is ever built on it)."""
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def copy_checked(dst: torch.Tensor, loaded: torch.Tensor, what: str) -> None:
    """Copy ``loaded`` into ``dst`` (casting dtype/device); a shape mismatch raises ``ValueError``."""
    if tuple(dst.shape) != tuple(loaded.shape):
        raise ValueError(
            f"{what}: checkpoint tensor has shape {tuple(loaded.shape)}, expected {tuple(dst.shape)}"
        )
    dst.copy_(loaded)


def load_unsharded(param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId) -> None:
    """The whole checkpoint tensor is the whole parameter; only ``shard_id=None`` is accepted."""
    if shard_id is not None:
        raise ValueError(f"shard_id: this parameter is not merged, got shard {shard_id!r}")
    copy_checked(param.data, loaded, "weight")


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters, each tensor counted once (tied weights once), whether they own
    their storage or are views of one shared arena (padding between them not counted). Packed quantized
    weights are parameters too, so this is the resident weight footprint."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for param in module.parameters():
        nbytes = param.numel() * param.element_size()
        key = (param.data_ptr(), nbytes)
        if key not in seen:
            seen.add(key)
            total += nbytes
    return total
