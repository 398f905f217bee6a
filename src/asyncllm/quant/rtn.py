"""Round-to-nearest (RTN) weight quantization: min-max codes per group, the way AutoGPTQ's ``Quantizer`` and
llm-compressor (compressed-tensors' ``calculate_qparams``) compute them without calibration data.

For each group of ``group_size`` consecutive input features of one output row, with ``maxq = 2**bits - 1``
and the group's range widened to contain 0 (``low = min(min(w), 0)``, ``high = max(max(w), 0)``):

- asymmetric: ``scale = (high - low) / maxq``, ``zero = round(-low / scale)``;
- symmetric: ``scale = 2 * max(-low, high) / maxq``, ``zero = 2**(bits - 1)`` (the unsigned form of
  compressed-tensors' signed codes with zero point 0; AutoGPTQ's ``sym=True`` gives the same scale and zero
  for every group holding a negative value);
- a group of zeros gets ``low, high = -1, 1`` (as AutoGPTQ), so its codes are the zero point exactly;

then ``code = clamp(round(w / scale) + zero, 0, maxq)`` with ``round`` half to even (``torch.round``), and
``w ~ scale * (code - zero)``. Every element lies within half a scale of its dequantized value. The result
is the format-neutral ``QuantCodes`` the loaders emit (``mins`` 0), so it loads through a model's
``load_weights`` as ``<prefix>.codes`` / ``code_scales`` / ``code_zeros`` / ``code_mins``.

Everything runs in float32 on the weight's device, in a few vectorised ops (no host synchronisation apart
from the finiteness check). The benchmarks use it to quantize random dense weights on the GPU.
"""

from __future__ import annotations

import torch

from asyncllm.quant.packed import QuantCodes


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool = False, *,
                 scale_dtype: torch.dtype | None = None) -> QuantCodes:
    """``weight`` (a floating ``[N, K]`` tensor on any device) as ``bits``-bit min-max round-to-nearest codes
    in groups of ``group_size`` input features (``None``: one group per row, channel-wise), asymmetric unless
    ``symmetric`` (see the module docstring for the exact formulas).

    ``bits`` must be in 1..8 and ``group_size`` a positive multiple of 16 dividing ``K`` (with ``None``, ``K``
    itself must be one, as ``QuantCodes`` requires); anything else, a tensor that is not 2-D floating, or a
    non-finite weight raises ``ValueError``.

    ``scale_dtype`` (e.g. ``torch.float16``, the dtype a checkpoint stores scales in): each scale is rounded to
    it (and kept at least its smallest normal value) before the zero points and codes are computed, so the
    codes are the nearest ones for the scales that will be stored and the result converts to that dtype
    without rounding."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits: must be an integer in [1, 8], got {bits!r}")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight: expected a 2-D floating tensor, got {weight.dtype} {tuple(weight.shape)}")
    rows, cols = (int(n) for n in weight.shape)
    group = cols if group_size is None else group_size
    if isinstance(group, bool) or not isinstance(group, int) or not 0 < group <= cols or group % 16 or cols % group:
        what = "channel-wise (None) needs K" if group_size is None else f"{group_size!r} must be"
        raise ValueError(f"group_size: {what} a positive multiple of 16 dividing K={cols}")
    values = weight.detach().float()
    if not bool(torch.isfinite(values).all()):
        raise ValueError("weight: holds NaN or infinite values")

    maxq = float((1 << bits) - 1)
    grouped = values.reshape(rows, cols // group, group)
    low = grouped.amin(dim=-1).clamp(max=0.0)
    high = grouped.amax(dim=-1).clamp(min=0.0)
    empty = (low == 0) & (high == 0)
    low = torch.where(empty, -1.0, low)
    high = torch.where(empty, 1.0, high)
    scales = 2.0 * torch.maximum(-low, high) / maxq if symmetric else (high - low) / maxq
    if scale_dtype is not None:
        scales = scales.clamp(min=torch.finfo(scale_dtype).tiny).to(scale_dtype).float()
    offset = float(1 << (bits - 1))
    zeros = torch.full_like(scales, offset) if symmetric else torch.round(-low / scales).clamp(0.0, maxq)
    codes = torch.clamp(torch.round(grouped / scales.unsqueeze(-1)) + zeros.unsqueeze(-1), 0.0, maxq)
    return QuantCodes(
        codes.to(torch.uint8).reshape(rows, cols),
        scales.contiguous(),
        zeros.contiguous(),
        torch.zeros_like(scales),
        bits=bits,
        group_size=group,
    )
