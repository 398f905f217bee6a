"""Triton RMSNorm and fused residual-add + RMSNorm, one program per row, fp32 statistics.

Both write fresh outputs and leave their inputs untouched, like the references: a model may still read
``x`` or ``residual`` after the call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from asyncllm.kernels.triton_launch import check_dtype, pow2_at_least

MAX_HIDDEN = 65536


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, sum_ptr,
    stride_x, stride_r, stride_o, stride_s,
    eps,
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        # Normalise the sum as stored, rounded to its dtype, exactly as the reference does.
        summed = x.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_s + offs, summed, mask=mask)
        x = summed.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, 0) / HIDDEN + eps)
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (x * rstd * weight).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, hidden]`` with unit stride along ``hidden`` (a view when possible)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _check_weight(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    if x.dim() == 0:
        raise ValueError("x: expected at least one dimension")
    check_dtype("x", x)
    check_dtype("weight", weight)
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight: expected shape ({x.shape[-1]},), got {tuple(weight.shape)}")
    if not 0 < x.shape[-1] <= MAX_HIDDEN:
        raise ValueError(f"x: hidden size must be in [1, {MAX_HIDDEN}], got {x.shape[-1]}")
    if eps < 0:
        raise ValueError(f"eps: must be non-negative, got {eps}")


def _launch(x2: torch.Tensor, r2: torch.Tensor | None, weight: torch.Tensor, out2: torch.Tensor,
            sum2: torch.Tensor | None, eps: float) -> None:
    hidden = x2.shape[1]
    if x2.shape[0] == 0:
        return
    block = pow2_at_least(hidden)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r2 if r2 is not None else x2, weight.contiguous(), out2, sum2 if sum2 is not None else out2,
        x2.stride(0), r2.stride(0) if r2 is not None else 0, out2.stride(0),
        sum2.stride(0) if sum2 is not None else 0, eps,
        HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=r2 is not None,
        num_warps=4 if block <= 2048 else (8 if block <= 8192 else 16),
    )


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``rms_norm_reference``: ``x / sqrt(mean(x**2) + eps) * weight`` over the last dim, in ``x.dtype``."""
    _check_weight(x, weight, eps)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(_rows(x), None, weight, out.view(-1, x.shape[-1]), None, eps)
    return out


def add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``add_rms_norm_reference``: ``(rms_norm(x + residual), x + residual)`` in one pass over the row.

    Both results take the promoted dtype of ``x`` and ``residual``, as ``x + residual`` would.
    """
    if residual.shape != x.shape:
        raise ValueError(f"residual: shape {tuple(residual.shape)} differs from x {tuple(x.shape)}")
    check_dtype("residual", residual)
    _check_weight(x, weight, eps)
    dtype = torch.promote_types(x.dtype, residual.dtype)
    normed = torch.empty(x.shape, dtype=dtype, device=x.device)
    summed = torch.empty(x.shape, dtype=dtype, device=x.device)
    hidden = x.shape[-1]
    _launch(_rows(x), _rows(residual), weight, normed.view(-1, hidden),
            summed.view(-1, hidden), eps)
    return normed, summed
