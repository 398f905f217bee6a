"""The reference weight-only quantized linear: dequantize the packed weight, then ``F.linear``.

Every backend's quantized linear (the CPU native kernel, the Triton kernels) has this signature and is
tested against this function (or an even plainer float64 matmul of ``PackedWeight.dequantize()``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from asyncllm.quant.packed import PackedWeight


def quant_linear_reference(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` for ``x`` ``[..., K]`` with ``W`` the dequantized ``[N, K]`` weight, in ``x.dtype``."""
    if x.shape[-1] != weight.in_features:
        raise ValueError(f"x: last dim must be the weight's {weight.in_features} input features, got {x.shape[-1]}")
    return F.linear(x, weight.dequantize(x.dtype), bias)
