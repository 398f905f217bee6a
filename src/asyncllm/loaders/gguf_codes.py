"""GGML block-quantized tensors as exact ``QuantCodes`` (codes one per byte, per-group affine parameters).

Block layouts (``d``, ``m``, ``dmin`` are IEEE half floats; see ``gguf_dequant`` for the value formulas,
which ``QuantCodes.dequantize`` reproduces bit for bit, float32 arithmetic in the same order):

======  ======  ===========  ========================================================================
type    group   code bits    codes / parameters
======  ======  ===========  ========================================================================
Q8_0    32      8            ``q + 128`` (int8 stored unsigned), scale ``d``, zero 128
Q4_0    32      4            nibbles, scale ``d``, zero 8
Q4_1    32      4            nibbles, scale ``d``, min ``m``
Q4_K    32      4            per 32-value sub-block: scale ``d·sc``, min ``−dmin·mn`` (6-bit sc, mn)
Q5_K    32      5            as Q4_K, the fifth bit of sub-block ``j`` in bit ``j`` of the 32 ``qh`` bytes
Q6_K    16      6            per 16-value sub-block: scale ``d·sc`` (int8 sc), zero 32
======  ======  ===========  ========================================================================

Nibble order inside a 32-value run (Q4_0, Q4_1): value ``j < 16`` is the low nibble of byte ``j``, value
``j + 16`` its high nibble. In Q4_K / Q5_K, bytes ``32i .. 32i + 31`` hold sub-block ``2i`` in their low
nibbles and ``2i + 1`` in their high nibbles.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from asyncllm.quant.layer_quant import LayerQuant
from asyncllm.quant.packed import QuantCodes

_Decoded = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""Per block: codes ``[n, B]`` uint8, scales / zeros / mins ``[n, B / G]`` float32."""


def _halves(blocks: torch.Tensor, start: int, count: int) -> torch.Tensor:
    return blocks[:, start:start + 2 * count].contiguous().view(torch.float16).float()


def _nibble_runs(packed: torch.Tensor) -> torch.Tensor:
    """``[n, 16 k]`` bytes -> ``[n, 32 k]`` codes: each 16 bytes give their 16 low, then 16 high nibbles."""
    runs = packed.unflatten(1, (-1, 16))
    return torch.cat((runs & 0x0F, runs >> 4), dim=2).flatten(1)


def _constant(blocks: torch.Tensor, groups: int, value: float) -> torch.Tensor:
    return torch.full((blocks.shape[0], groups), value, dtype=torch.float32, device=blocks.device)


def _q8_0(blocks: torch.Tensor) -> _Decoded:
    codes = (blocks[:, 2:].view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
    return codes, _halves(blocks, 0, 1), _constant(blocks, 1, 128.0), _constant(blocks, 1, 0.0)


def _q4_0(blocks: torch.Tensor) -> _Decoded:
    return _nibble_runs(blocks[:, 2:]), _halves(blocks, 0, 1), _constant(blocks, 1, 8.0), _constant(blocks, 1, 0.0)


def _q4_1(blocks: torch.Tensor) -> _Decoded:
    dm = _halves(blocks, 0, 2)
    return _nibble_runs(blocks[:, 4:]), dm[:, 0:1].contiguous(), _constant(blocks, 1, 0.0), dm[:, 1:2].contiguous()


def _k_scales_mins(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: the eight 6-bit scales and mins packed in bytes 4..15, as float32 ``[n, 8]``."""
    packed = blocks[:, 4:16]
    low, mid, high = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([low & 0x3F, (high & 0x0F) | ((low >> 6) << 4)], dim=1).float()
    mins = torch.cat([mid & 0x3F, (high >> 4) | ((mid >> 6) << 4)], dim=1).float()
    return scales, mins


def _k_affine(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dm = _halves(blocks, 0, 2)
    scales, mins = _k_scales_mins(blocks)
    return dm[:, 0:1] * scales, _constant(blocks, 8, 0.0), -(dm[:, 1:2] * mins)


def _q4_k(blocks: torch.Tensor) -> _Decoded:
    n = blocks.shape[0]
    qs = blocks[:, 16:144].reshape(n, 4, 1, 32)
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(n, 256)
    return (codes, *_k_affine(blocks))


def _q5_k(blocks: torch.Tensor) -> _Decoded:
    n = blocks.shape[0]
    qh = blocks[:, 16:48].reshape(n, 1, 32)
    qs = blocks[:, 48:176].reshape(n, 4, 1, 32)
    low = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(n, 8, 32)
    shifts = torch.arange(8, dtype=torch.uint8, device=blocks.device).reshape(1, 8, 1)
    high = (qh >> shifts) & 0x01
    return ((low | (high << 4)).reshape(n, 256), *_k_affine(blocks))


_Q6_K_HIGH_SHIFTS = (0, 2, 4, 6)


def _q6_k(blocks: torch.Tensor) -> _Decoded:
    n = blocks.shape[0]
    ql = blocks[:, :128].reshape(n, 2, 1, 2, 32)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
    low = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(n, 2, 4, 32)
    shifts = torch.tensor(_Q6_K_HIGH_SHIFTS, dtype=torch.uint8, device=blocks.device).reshape(1, 1, 4, 1)
    high = (qh >> shifts) & 0x03
    codes = (low | (high << 4)).reshape(n, 256)
    scales = blocks[:, 192:208].view(torch.int8).float() * _halves(blocks, 208, 1)
    return codes, scales, _constant(blocks, 16, 32.0), _constant(blocks, 16, 0.0)


_CODE_DECODERS: dict[GGMLQuantizationType, tuple[int, int, Callable[[torch.Tensor], _Decoded]]] = {
    GGMLQuantizationType.Q8_0: (8, 32, _q8_0),
    GGMLQuantizationType.Q4_0: (4, 32, _q4_0),
    GGMLQuantizationType.Q4_1: (4, 32, _q4_1),
    GGMLQuantizationType.Q4_K: (4, 32, _q4_k),
    GGMLQuantizationType.Q5_K: (5, 32, _q5_k),
    GGMLQuantizationType.Q6_K: (6, 16, _q6_k),
}

QUANTIZED_TYPES: frozenset[GGMLQuantizationType] = frozenset(_CODE_DECODERS)


def layer_quant(ggml_type: GGMLQuantizationType) -> LayerQuant:
    """The code width and group size a block type's codes have (``ValueError`` for other types)."""
    entry = _CODE_DECODERS.get(ggml_type)
    if entry is None:
        raise ValueError(f"GGML type {ggml_type.name} is not a supported block-quantized type")
    return LayerQuant(bits=entry[0], group_size=entry[1])


def quant_codes(raw: torch.Tensor, ggml_type: GGMLQuantizationType, rows: int, cols: int) -> QuantCodes:
    """The ``[rows, cols]`` tensor stored in ``raw`` (contiguous ``uint8`` bytes of its blocks, row after
    row) as ``QuantCodes``; ``ValueError`` for float or unsupported types and sizes that do not fit."""
    entry = _CODE_DECODERS.get(ggml_type)
    if entry is None:
        raise ValueError(f"GGML type {ggml_type.name} is not a supported block-quantized type")
    bits, group, decode = entry
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    if raw.dtype != torch.uint8 or raw.dim() != 1:
        raise ValueError(f"raw: expected a 1-D uint8 tensor, got {raw.dtype} with shape {tuple(raw.shape)}")
    if cols % block_size or raw.numel() != rows * cols // block_size * type_size:
        raise ValueError(f"raw: {raw.numel()} bytes do not hold a [{rows}, {cols}] {ggml_type.name} tensor")
    codes, scales, zeros, mins = decode(raw.reshape(-1, type_size))
    groups = cols // group
    return QuantCodes(codes.reshape(rows, cols).contiguous(), scales.reshape(rows, groups).contiguous(),
                      zeros.reshape(rows, groups).contiguous(), mins.reshape(rows, groups).contiguous(),
                      bits=bits, group_size=group)
