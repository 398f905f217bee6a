"""The gated SiLU of Llama-family MLPs."""

from __future__ import annotations

import torch
from torch import nn

from asyncllm.kernels import KernelOps


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` for an input laid out ``[..., gate | up]`` (``[..., 2 I]`` -> ``[..., I]``)."""

    def __init__(self, ops: KernelOps) -> None:
        super().__init__()
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2:
            raise ValueError(f"x: last dim must be even ([gate | up]), got {x.shape[-1]}")
        return self.ops.silu_and_mul(x)
