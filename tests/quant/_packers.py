"""Reference packers written from the published layouts, independently of ``asyncllm.quant``'s unpackers.

* ``pack_awq``: AutoAWQ ``WQLinear_GEMM.from_linear`` (4 bits; order map ``[0, 2, 4, 6, 1, 3, 5, 7]``).
* ``pack_gptq``: AutoGPTQ ``QuantLinear.pack`` (numpy uint32 shifts, ``zeros -= 1`` in the classic format).
* ``rtn``: round-to-nearest quantization of a float weight to unsigned codes, per group (optionally with
  act-order groups ``g_idx``), as AutoGPTQ's / AutoAWQ's min-max quantizers compute it.

Codes, zeros and scales use the model layout: codes ``[N, K]``, zeros / scales ``[N, K / G]``.
"""

from __future__ import annotations

import numpy as np
import torch

AWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]


def pack_awq(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM tensors (``qweight`` [K, N/8], ``qzeros`` [K/G, N/8], ``scales`` fp16 [K/G, N])."""
    w_bit, pack_num = 4, 8
    intweight = codes.t().contiguous().to(torch.int32)
    qweight = torch.zeros((intweight.shape[0], intweight.shape[1] // 32 * w_bit), dtype=torch.int32)
    for col in range(intweight.shape[1] // pack_num):
        for i in range(pack_num):
            qweight[:, col] |= intweight[:, col * pack_num + AWQ_ORDER_MAP[i]] << (i * w_bit)
    zeros_t = zeros.t().contiguous().to(torch.int32)
    qzeros = torch.zeros((zeros_t.shape[0], zeros_t.shape[1] // 32 * w_bit), dtype=torch.int32)
    for col in range(zeros_t.shape[1] // pack_num):
        for i in range(pack_num):
            qzeros[:, col] |= zeros_t[:, col * pack_num + AWQ_ORDER_MAP[i]] << (i * w_bit)
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales.t().contiguous().half()}


def pack_gptq(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
              *, v2: bool = False) -> dict[str, torch.Tensor]:
    """AutoGPTQ tensors (``qweight`` [K*b/32, N], ``qzeros`` [K/G, N*b/32], ``scales`` fp16 [K/G, N],
    ``g_idx`` int32 [K]); ``v2`` stores zero points as they are (GPTQModel ``gptq_v2``)."""
    intweight = codes.t().contiguous().numpy().astype(np.uint32)  # [K, N]
    per = 32 // bits
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = 0
    row = 0
    while row < qweight.shape[0]:
        for j in range(i, i + per):
            qweight[row] |= intweight[j] << (bits * (j - i))
        i += per
        row += 1
    zeros_t = zeros.t().contiguous().to(torch.int64)
    if not v2:
        zeros_t = zeros_t - 1
    zeros_np = zeros_t.numpy().astype(np.uint32)
    qzeros = np.zeros((zeros_np.shape[0], zeros_np.shape[1] // 32 * bits), dtype=np.uint32)
    i = 0
    col = 0
    while col < qzeros.shape[1]:
        for j in range(i, i + per):
            qzeros[:, col] |= zeros_np[:, j] << (bits * (j - i))
        i += per
        col += 1
    return {
        "qweight": torch.from_numpy(qweight.astype(np.int32)),
        "qzeros": torch.from_numpy(qzeros.astype(np.int32)),
        "scales": scales.t().contiguous().half(),
        "g_idx": g_idx.to(torch.int32),
    }


def act_order_g_idx(in_features: int, group_size: int, generator: torch.Generator) -> torch.Tensor:
    """A shuffled ``g_idx`` as GPTQ act-order produces: channel ``perm[j]`` gets group ``j // G``."""
    perm = torch.randperm(in_features, generator=generator)
    g_idx = torch.empty(in_features, dtype=torch.int64)
    g_idx[perm] = torch.arange(in_features) // group_size
    return g_idx


def rtn(weight: torch.Tensor, bits: int, group_size: int, *, symmetric: bool, g_idx: torch.Tensor | None = None,
        min_zero: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max round-to-nearest: (codes int64 [N, K], zeros int64 [N, K/G], scales fp16 [N, K/G]).

    Column ``k`` belongs to group ``g_idx[k]`` (default ``k // G``). Asymmetric: ``scale = (max - min) /
    maxq`` over a range stretched to include 0, ``zero = round(-min / scale)`` clamped to ``[min_zero,
    maxq]``; symmetric: ``scale = 2 * absmax / maxq``, ``zero = (maxq + 1) / 2`` (AutoGPTQ)."""
    n, k = weight.shape
    maxq = 2**bits - 1
    groups = g_idx if g_idx is not None else torch.arange(k) // group_size
    w = weight.float()
    scales = torch.empty(n, k // group_size, dtype=torch.float16)
    zeros = torch.empty(n, k // group_size, dtype=torch.int64)
    codes = torch.empty(n, k, dtype=torch.int64)
    for g in range(k // group_size):
        cols = (groups == g).nonzero().flatten()
        block = w[:, cols]
        xmin = block.min(1).values.clamp(max=0)
        xmax = block.max(1).values.clamp(min=0)
        if symmetric:
            xmax = torch.maximum(xmin.abs(), xmax)
            scale = (2 * xmax / maxq).clamp(min=1e-4).half()
            zero = torch.full((n,), (maxq + 1) // 2, dtype=torch.int64)
        else:
            scale = ((xmax - xmin) / maxq).clamp(min=1e-4).half()
            zero = torch.round(-xmin / scale.float()).clamp(min_zero, maxq).to(torch.int64)
        scales[:, g] = scale
        zeros[:, g] = zero
        codes[:, cols] = (torch.round(block / scale.float()[:, None]) + zero[:, None]).clamp(0, maxq).to(torch.int64)
    return codes, zeros, scales


def dequantize_reference(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                         g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """``(q - z[g_idx]) * s[g_idx]`` in float16, as AutoAWQ / AutoGPTQ dequantize (int minus int, then an
    int-by-fp16 product), in checkpoint column order."""
    k = codes.shape[1]
    groups = g_idx.long() if g_idx is not None else torch.arange(k) // (k // scales.shape[1])
    return (codes.to(torch.int32) - zeros[:, groups].to(torch.int32)) * scales[:, groups].half()
