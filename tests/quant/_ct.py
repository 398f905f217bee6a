"""compressed-tensors' own quantization and compression, for the tests and the checkpoint writers."""

from __future__ import annotations

import torch
from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.utils import calculate_qparams

COMPRESSORS = {"pack-quantized": PackedQuantizationCompressor, "naive-quantized": NaiveQuantizationCompressor}


def scheme(bits: int, group_size: int | None, symmetric: bool) -> QuantizationScheme:
    """A weight-only integer scheme: ``group_size`` ``None`` is the channel strategy."""
    if group_size is None:
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="channel")
    else:
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group",
                                group_size=group_size)
    return QuantizationScheme(targets=["Linear"], weights=args)


def compress(weight: torch.Tensor, ct_scheme: QuantizationScheme, fmt: str = "pack-quantized"
             ) -> dict[str, torch.Tensor]:
    """``weight`` [N, K] min-max quantized (the package's ``calculate_qparams``) and compressed by the
    package's compressor for ``fmt``: the per-module state dict a checkpoint stores."""
    args = ct_scheme.weights
    groups = weight.unflatten(1, (-1, args.group_size)) if args.strategy == "group" else weight.unsqueeze(1)
    scale, zero_point = calculate_qparams(groups.amin(2), groups.amax(2), args)
    state = {"weight": weight, "weight_scale": scale.to(weight.dtype)}
    if not args.symmetric:
        state["weight_zero_point"] = zero_point.to(torch.int8)
    return dict(COMPRESSORS[fmt].compress(state, ct_scheme))


def decompress(state: dict[str, torch.Tensor], ct_scheme: QuantizationScheme, fmt: str = "pack-quantized"
               ) -> torch.Tensor:
    """The package's own dequantized weight (in the scale's dtype)."""
    return COMPRESSORS[fmt].decompress(dict(state), ct_scheme)["weight"]
