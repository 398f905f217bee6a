"""AutoGPTQ / GPTQModel / optimum ``QuantLinear`` checkpoints to the exact form.

Layout of a linear with ``K`` inputs, ``N`` outputs, ``b``-bit codes (4 or 8) and ``K / G`` groups:

* ``qweight`` int32 ``[K * b / 32, N]``: packed along ``K``, low bits first: word ``r`` of column ``n``
  holds inputs ``r * 32/b .. (r + 1) * 32/b - 1`` of output ``n``, input ``r * 32/b + i`` in bits
  ``b*i .. b*i + b - 1``;
* ``qzeros`` int32 ``[K / G, N * b / 32]``: packed along ``N`` the same way. ``checkpoint_format "gptq"``
  stores ``z - 1`` (AutoGPTQ's convention; a zero point of 0 is stored as ``2**b - 1`` and read back as 0,
  as AutoGPTQ's reference dequantization does), ``"gptq_v2"`` stores ``z``;
* ``scales`` float16 ``[K / G, N]``;
* ``g_idx`` int32 ``[K]``: the group of each input channel (``k // G`` without act-order).

``w[n, k] = s[g_idx[k], n] * (q[k, n] - z[g_idx[k], n])``. With act-order the columns are permuted so
each group is contiguous (see ``act_order``).
"""

from __future__ import annotations

import torch

from asyncllm.quant.act_order import PermutedCodes, permute_inputs
from asyncllm.quant.bitfields import fields_per_word, unpack_int32
from asyncllm.quant.packed import QuantCodes

GPTQ_ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}
"""What to add to a stored zero point, per ``checkpoint_format``."""


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                *, bits: int, storage: str = "gptq", act_order: bool = False) -> PermutedCodes:
    """The exact codes of one GPTQ linear (see the module docstring). ``g_idx`` may be ``None`` (groups
    ``k // G``); a non-trivial one requires ``act_order`` and yields ``input_perm``. Raises ``ValueError``
    on inconsistent shapes or dtypes."""
    per_word = fields_per_word(bits)
    if storage not in GPTQ_ZERO_OFFSET:
        raise ValueError(f"storage: expected one of {list(GPTQ_ZERO_OFFSET)}, got {storage!r}")
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"qweight: expected int32 [K*{bits}/32, N], got {qweight.dtype} {tuple(qweight.shape)}")
    k, n = int(qweight.shape[0]) * per_word, int(qweight.shape[1])
    if scales.dim() != 2 or not scales.is_floating_point() or int(scales.shape[1]) != n or not scales.shape[0]:
        raise ValueError(f"scales: expected float [K/G, {n}], got {scales.dtype} {tuple(scales.shape)}")
    groups = int(scales.shape[0])
    if k % groups:
        raise ValueError(f"scales: {groups} groups do not divide K={k}")
    if n % per_word or tuple(qzeros.shape) != (groups, n // per_word):
        raise ValueError(f"qzeros: expected int32 [{groups}, {n}*{bits}/32], got {qzeros.dtype} "
                         f"{tuple(qzeros.shape)}")
    codes = unpack_int32(qweight, bits, dim=0).t().contiguous()
    zeros = (unpack_int32(qzeros, bits, dim=1).to(torch.int32) + GPTQ_ZERO_OFFSET[storage]) & ((1 << bits) - 1)
    zeros = zeros.t().float().contiguous()
    exact = QuantCodes(codes, scales.t().float().contiguous(), zeros, torch.zeros_like(zeros), bits=bits,
                       group_size=k // groups)
    return permute_inputs(exact, g_idx, act_order=act_order)
