"""GGML storage types decoded to float tensors: the float types directly, the block-quantized ones
through their exact codes (``gguf_codes``).

Block types are decoded to ``QuantCodes`` and dequantized with ``QuantCodes.dequantize``, which computes
in float32 exactly as ``ggml``'s reference ``dequantize_row_*`` functions do (the tests compare with
``gguf.quants.dequantize`` bit for bit). The decoders are vectorised torch code: they run on whichever
device holds the bytes and use all of torch's intra-op threads (on a 2-core CPU about three times faster
than ``gguf.quants.dequantize``, numpy on one thread).
"""

from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from asyncllm.loaders.gguf_codes import QUANTIZED_TYPES, quant_codes

FLOAT_TYPES: dict[GGMLQuantizationType, torch.dtype] = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}

SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(FLOAT_TYPES) | QUANTIZED_TYPES


def dequantize(raw: torch.Tensor, ggml_type: GGMLQuantizationType, dtype: torch.dtype) -> torch.Tensor:
    """Decode ``raw`` (contiguous ``uint8`` bytes of whole blocks) to a flat tensor of ``dtype``.

    Float storage already in ``dtype`` is returned as a view of ``raw`` (no copy); every other result is
    a new tensor. Unsupported storage types raise ``ValueError`` naming the type.
    """
    if raw.dtype != torch.uint8 or raw.dim() != 1:
        raise ValueError(f"raw: expected a 1-D uint8 tensor, got {raw.dtype} with shape {tuple(raw.shape)}")
    float_dtype = FLOAT_TYPES.get(ggml_type)
    if float_dtype is not None:
        return raw.view(float_dtype).to(dtype)
    if ggml_type not in QUANTIZED_TYPES:
        raise ValueError(
            f"GGML type {ggml_type.name} is not supported; "
            f"supported: {sorted(t.name for t in SUPPORTED_TYPES)}"
        )
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    if raw.numel() % type_size:
        raise ValueError(f"raw: {raw.numel()} bytes is not a whole number of {ggml_type.name} blocks")
    values = quant_codes(raw, ggml_type, raw.numel() // type_size, block_size).dequantize().reshape(-1)
    return values if dtype == torch.float32 else values.to(dtype)
