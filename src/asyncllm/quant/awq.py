"""AutoAWQ ``WQLinear_GEMM`` checkpoints (``version: "gemm"``) to ``QuantCodes``.

Layout of a linear with ``K`` inputs, ``N`` outputs and groups of ``G`` inputs (4 bits):

* ``qweight`` int32 ``[K, N / 8]``: row ``k`` packs the codes of input ``k``; word ``c`` covers output
  columns ``8c .. 8c + 7`` and its nibble ``i`` (bits ``4i .. 4i + 3``) holds column ``8c + AWQ_ORDER[i]``
  (AutoAWQ packs with the order map ``[0, 2, 4, 6, 1, 3, 5, 7]``; ``AWQ_REVERSE_ORDER`` is its inverse);
* ``qzeros`` int32 ``[K / G, N / 8]``: the integer zero points, packed the same way;
* ``scales`` float16 ``[K / G, N]``.

``w[n, k] = (q[k, n] - z[k // G, n]) * s[k // G, n]``, which ``QuantCodes`` reproduces with ``mins = 0``.
"""

from __future__ import annotations

import torch

from asyncllm.quant.bitfields import fields_per_word, unpack_int32
from asyncllm.quant.packed import QuantCodes

AWQ_BITS = 4
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""Nibble ``i`` of a packed word holds column ``AWQ_ORDER[i]`` of its 8-column block."""
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
"""Column ``j`` of an 8-column block is nibble ``AWQ_REVERSE_ORDER[j]`` of its word."""


def _unpack_columns(packed: torch.Tensor) -> torch.Tensor:
    """``[R, C / 8]`` int32 in AWQ order -> uint8 ``[R, C]`` in column order."""
    fields = unpack_int32(packed, AWQ_BITS, dim=1).unflatten(1, (-1, fields_per_word(AWQ_BITS)))
    reverse = torch.tensor(AWQ_REVERSE_ORDER, device=packed.device)
    return fields.index_select(2, reverse).flatten(1)


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> QuantCodes:
    """The exact codes of one AWQ GEMM linear (see the module docstring); the group size is ``K`` divided by
    the number of scale rows. Raises ``ValueError`` on inconsistent shapes or dtypes."""
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"qweight: expected int32 [K, N/8], got {qweight.dtype} {tuple(qweight.shape)}")
    k, n = int(qweight.shape[0]), int(qweight.shape[1]) * fields_per_word(AWQ_BITS)
    if scales.dim() != 2 or not scales.is_floating_point() or int(scales.shape[1]) != n or not scales.shape[0]:
        raise ValueError(f"scales: expected float [K/G, {n}], got {scales.dtype} {tuple(scales.shape)}")
    groups = int(scales.shape[0])
    if k % groups:
        raise ValueError(f"scales: {groups} groups do not divide K={k}")
    if tuple(qzeros.shape) != (groups, n // fields_per_word(AWQ_BITS)):
        raise ValueError(f"qzeros: expected int32 [{groups}, {n // 8}], got {qzeros.dtype} {tuple(qzeros.shape)}")
    codes = _unpack_columns(qweight).t().contiguous()
    zeros = _unpack_columns(qzeros).t().float().contiguous()
    return QuantCodes(codes, scales.t().float().contiguous(), zeros, torch.zeros_like(zeros), bits=AWQ_BITS,
                      group_size=k // groups)
