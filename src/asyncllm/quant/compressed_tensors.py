"""compressed-tensors (llm-compressor) integer weight-only checkpoints to the exact form.

The format quantizes to signed integers ``q`` in ``[-2**(b-1), 2**(b-1))`` with ``w = (q - zp) * scale``
(``zp`` 0 when symmetric) and stores ``q + 2**(b-1)``; the exact form keeps those unsigned codes and
``zeros = zp + 2**(b-1)``. Per linear (``K`` inputs, ``N`` outputs, ``b`` 4 or 8):

* ``pack-quantized``: ``weight_packed`` int32 ``[N, ceil(K * b / 32)]``, the unsigned codes packed along
  ``K`` low bits first (``pack_to_int32``); ``weight_shape`` int ``[2]`` = ``(N, K)``; ``weight_scale``
  ``[N, K / G]`` (``[N, 1]`` channel-wise); asymmetric: ``weight_zero_point`` int32
  ``[ceil(N * b / 32), K / G]``, the unsigned zero points packed along ``N`` (older releases stored
  int8 ``[N, K / G]`` signed zero points unpacked; both are read);
* ``naive-quantized`` / ``int-quantized``: ``weight`` int8 ``[N, K]`` holding ``q`` itself, ``weight_scale``
  as above, asymmetric: ``weight_zero_point`` int8 ``[N, K / G]`` (signed);
* ``actorder: "group"`` adds ``weight_g_idx`` int ``[K]``, as GPTQ's ``g_idx`` (see ``act_order``).
"""

from __future__ import annotations

import torch

from asyncllm.quant.act_order import PermutedCodes, permute_inputs
from asyncllm.quant.bitfields import unpack_int32
from asyncllm.quant.packed import QuantCodes

_SIGNED_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


def _offset(bits: int) -> int:
    return 1 << (bits - 1)


def _groups(weight_scale: torch.Tensor, n: int, k: int) -> int:
    if weight_scale.dim() != 2 or not weight_scale.is_floating_point() or int(weight_scale.shape[0]) != n:
        raise ValueError(f"weight_scale: expected float [{n}, K/G], got {weight_scale.dtype} "
                         f"{tuple(weight_scale.shape)}")
    groups = int(weight_scale.shape[1])
    if not groups or k % groups:
        raise ValueError(f"weight_scale: {groups} groups do not divide K={k}")
    return groups


def _zeros(weight_zero_point: torch.Tensor | None, bits: int, n: int, groups: int,
           device: torch.device) -> torch.Tensor:
    """The unsigned zero points ``[N, K / G]`` as float32."""
    if weight_zero_point is None:
        return torch.full((n, groups), float(_offset(bits)), device=device)
    zp = weight_zero_point
    packed_rows = -(-n * bits // 32)
    if zp.dtype == torch.int32 and tuple(zp.shape) == (packed_rows, groups):
        return unpack_int32(zp, bits, dim=0)[:n].float().contiguous()
    if zp.dtype in _SIGNED_DTYPES and tuple(zp.shape) == (n, groups):
        return _signed_to_unsigned(zp, bits, "weight_zero_point").float()
    raise ValueError(f"weight_zero_point: expected int32 [{packed_rows}, {groups}] (packed) or int8 "
                     f"[{n}, {groups}], got {zp.dtype} {tuple(zp.shape)}")


def _signed_to_unsigned(values: torch.Tensor, bits: int, name: str) -> torch.Tensor:
    shifted = values.to(torch.int32) + _offset(bits)
    if shifted.numel() and (int(shifted.min()) < 0 or int(shifted.max()) >= 1 << bits):
        raise ValueError(f"{name}: values outside the signed {bits}-bit range")
    return shifted.to(torch.uint8)


def _finish(codes: torch.Tensor, weight_scale: torch.Tensor, zeros: torch.Tensor, bits: int, groups: int,
            g_idx: torch.Tensor | None, act_order: bool) -> PermutedCodes:
    k = int(codes.shape[1])
    exact = QuantCodes(codes, weight_scale.float().contiguous(), zeros, torch.zeros_like(zeros), bits=bits,
                       group_size=k // groups)
    return permute_inputs(exact, g_idx, act_order=act_order)


def unpack_pack_quantized(weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_shape: torch.Tensor,
                          weight_zero_point: torch.Tensor | None = None, weight_g_idx: torch.Tensor | None = None,
                          *, bits: int, act_order: bool = False) -> PermutedCodes:
    """One ``pack-quantized`` linear (see the module docstring); ``weight_zero_point`` ``None`` means
    symmetric. Raises ``ValueError`` on inconsistent shapes or dtypes."""
    if weight_shape.numel() != 2 or weight_shape.dtype.is_floating_point:
        raise ValueError(f"weight_shape: expected 2 integers, got {weight_shape.dtype} {tuple(weight_shape.shape)}")
    n, k = (int(v) for v in weight_shape.reshape(-1).tolist())
    if weight_packed.dtype != torch.int32 or tuple(weight_packed.shape) != (n, -(-k * bits // 32)):
        raise ValueError(f"weight_packed: expected int32 [{n}, {-(-k * bits // 32)}], got {weight_packed.dtype} "
                         f"{tuple(weight_packed.shape)}")
    groups = _groups(weight_scale, n, k)
    codes = unpack_int32(weight_packed, bits, dim=1)[:, :k].contiguous()
    zeros = _zeros(weight_zero_point, bits, n, groups, codes.device)
    return _finish(codes, weight_scale, zeros, bits, groups, weight_g_idx, act_order)


def unpack_naive_quantized(weight: torch.Tensor, weight_scale: torch.Tensor,
                           weight_zero_point: torch.Tensor | None = None, weight_g_idx: torch.Tensor | None = None,
                           *, bits: int, act_order: bool = False) -> PermutedCodes:
    """One ``naive-quantized`` / ``int-quantized`` linear: ``weight`` holds the signed codes one per int8."""
    if weight.dtype not in _SIGNED_DTYPES or weight.dim() != 2:
        raise ValueError(f"weight: expected signed integer [N, K], got {weight.dtype} {tuple(weight.shape)}")
    n, k = (int(v) for v in weight.shape)
    groups = _groups(weight_scale, n, k)
    codes = _signed_to_unsigned(weight, bits, "weight")
    zeros = _zeros(weight_zero_point, bits, n, groups, codes.device)
    return _finish(codes, weight_scale, zeros, bits, groups, weight_g_idx, act_order)
