"""RMSNorm, optionally fused with the residual add that precedes it in a pre-norm decoder."""

from __future__ import annotations

from typing import overload

import torch
from torch import nn

from asyncllm.kernels import KernelOps
from asyncllm.layers.weights import ShardId, empty_parameter, load_unsharded


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x**2) + eps)`` over the last dim, through ``ops.rms_norm``.

    With ``residual`` given, computes ``s = x + residual`` and returns ``(rms_norm(s), s)`` through the fused
    ``ops.add_rms_norm``: ``s`` is the residual stream the next block adds onto. Fast kernels may reuse the
    storage of ``x`` and ``residual`` for the results, so callers must not read either input afterwards.
    """

    shard_ids: tuple[ShardId, ...] = (None,)

    def __init__(
        self, hidden_size: int, eps: float, ops: KernelOps, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        if eps <= 0:
            raise ValueError(f"eps: must be positive, got {eps}")
        self.eps = eps
        self.ops = ops
        self.weight = empty_parameter(hidden_size, dtype=dtype, device=device)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        load_unsharded(param, loaded, shard_id)

    @overload
    def forward(self, x: torch.Tensor, residual: None = None) -> torch.Tensor: ...

    @overload
    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
