"""Triton fused mixture-of-experts: ``moe_reference``'s meaning in two grouped-GEMM launches.

The ``T * K`` (token, expert) pairs are sorted by expert and each expert's run is padded to a multiple of
``BLOCK_M`` (``align_by_expert``), so every ``BLOCK_M`` rows of the sorted order belong to one expert. One
launch then computes every pair's ``[gate | up] = x[token] @ w_gate_up[e].T`` (one program per row block and
output tile, reading that block's expert's weight), SiLU-and-mul follows, and a second launch computes
``down = h @ w_down[e].T`` scaled by the pair's routing weight; the ``K`` pair rows of a token are summed
last. Padding rows carry the out-of-range pair id ``T * K`` and are masked; row blocks past the padded total
have no expert and return at once. The alignment runs as torch ops with shapes fixed by ``T``, ``K`` and
``E`` alone, so nothing synchronises with the host (CUDA-graph safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from asyncllm.kernels.moe import check_moe_shapes
from asyncllm.kernels.triton_activation import silu_and_mul_triton
from asyncllm.kernels.triton_launch import (
    MIN_DOT_DIM,
    check_dtype,
    dot_precision,
    interpreting,
    pow2_at_least,
    upcast_dot,
)


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sorted_pairs [P], block_expert [P // block_m])``: pair ids (``token * K + slot``) grouped by expert,
    each expert's run padded with the sentinel ``T * K`` to a multiple of ``block_m``; the expert of each row
    block, ``num_experts`` for blocks past the padded total. ``P = T*K + min(E, T*K) * (block_m - 1)``
    rounded up to ``block_m`` bounds the padded total whatever the routing."""
    flat = topk_ids.reshape(-1).long()
    pairs = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)
    experts = flat[order]
    rank = torch.arange(pairs, device=flat.device) - start[experts]
    capacity = -(-(pairs + min(num_experts, pairs) * (block_m - 1)) // block_m) * block_m
    sorted_pairs = torch.full((capacity,), pairs, dtype=torch.long, device=flat.device)
    sorted_pairs[(padded_end - padded)[experts] + rank] = order
    block_starts = torch.arange(0, capacity, block_m, device=flat.device)
    block_expert = torch.searchsorted(padded_end, block_starts, right=True).to(torch.int32)
    return sorted_pairs, block_expert


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, weight_ptr, pairs_ptr, block_expert_ptr,
    num_pairs, num_experts, N, K,
    stride_am, stride_be, stride_bn, stride_bk, stride_cm,
    ROWS_PER_A: tl.constexpr, MUL_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """``c[pair] = a[pair // ROWS_PER_A] @ b[expert].T`` (times ``weight[pair]`` when ``MUL_WEIGHT``) for the
    pairs of one row block, one ``BLOCK_N`` tile of outputs."""
    pid_m = tl.program_id(0)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert >= num_experts:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pairs_ptr + offs_m)
    row_ok = pair < num_pairs
    a_row = pair // ROWS_PER_A
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    b_base = b_ptr + expert * stride_be
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(a_ptr + a_row[:, None] * stride_am + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        b = tl.load(b_base + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if MUL_WEIGHT:
        acc = acc * tl.load(weight_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(c_ptr + pair[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


def _tile(size: int, cap: int) -> int:
    return min(pow2_at_least(size, MIN_DOT_DIM), cap)


def _grouped_gemm(
    a: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, sorted_pairs: torch.Tensor,
    block_expert: torch.Tensor, block_m: int, rows_per_a: int, routing: torch.Tensor | None,
) -> None:
    experts, n, k = weights.shape
    cap = 32 if interpreting() else 64
    block_n, block_k = _tile(n, cap), _tile(k, cap)
    grid = (block_expert.numel(), triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](
        a, weights, out, routing if routing is not None else out, sorted_pairs, block_expert,
        out.shape[0], experts, n, k,
        a.stride(0), weights.stride(0), weights.stride(1), weights.stride(2), out.stride(0),
        ROWS_PER_A=rows_per_a, MUL_WEIGHT=routing is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION=dot_precision(a.dtype), UPCAST=upcast_dot(a.dtype), num_warps=4,
    )


def moe_triton(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """``moe_reference``'s meaning (see the module docstring); ``x`` and both weights share one dtype."""
    check_moe_shapes(x, topk_weights, topk_ids, w_gate_up, w_down)
    check_dtype("x", x)
    if w_gate_up.dtype != x.dtype or w_down.dtype != x.dtype:
        raise ValueError(f"w_gate_up/w_down: dtype must equal x's {x.dtype}, got {w_gate_up.dtype}/{w_down.dtype}")
    tokens, top_k = topk_ids.shape
    if tokens == 0:
        return torch.zeros_like(x)
    x = x if x.stride(-1) == 1 else x.contiguous()
    w_gate_up, w_down = (w if w.stride(-1) == 1 else w.contiguous() for w in (w_gate_up, w_down))
    block_m = 16 if interpreting() or tokens * top_k <= 64 else 64
    sorted_pairs, block_expert = align_by_expert(topk_ids, w_gate_up.shape[0], block_m)
    pairs = tokens * top_k
    gate_up = torch.empty(pairs, w_gate_up.shape[1], dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w_gate_up, gate_up, sorted_pairs, block_expert, block_m, top_k, None)
    hidden = silu_and_mul_triton(gate_up)
    down = torch.empty(pairs, x.shape[1], dtype=torch.float32, device=x.device)
    routing = topk_weights.reshape(-1).contiguous()
    _grouped_gemm(hidden, w_down, down, sorted_pairs, block_expert, block_m, 1, routing)
    return down.view(tokens, top_k, -1).sum(1).to(x.dtype)
