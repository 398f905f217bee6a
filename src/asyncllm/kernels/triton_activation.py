"""Triton SiLU-and-mul: ``silu(gate) * up`` over a fused ``[gate | up]`` projection, fp32 math."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from asyncllm.kernels.triton_launch import check_dtype, pow2_at_least

MAX_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, INTER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < INTER
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + INTER + offs, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """``silu_and_mul_reference``: ``x`` ``[..., 2 * I]`` as ``[gate | up]`` gives ``[..., I]``."""
    check_dtype("x", x)
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"x: last dimension must be even ([gate | up]), got shape {tuple(x.shape)}")
    inter = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if rows.shape[0] == 0 or inter == 0:
        return out
    block = min(pow2_at_least(inter), MAX_BLOCK)
    _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(inter, block))](
        rows, out, rows.stride(0), inter, INTER=inter, BLOCK=block, num_warps=4,
    )
    return out
