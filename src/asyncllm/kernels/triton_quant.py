"""Weight-only quantized linears in Triton (W4A16 / W8A16): ``y = x @ W.T + bias`` with ``W`` a ``PackedWeight``.

``W[n, k] = scales[n, g] * q[n, k] + biases[n, g]`` with ``g = k // group_size`` (see
``asyncllm.quant.packed``; scales and biases float32 or float16, read into fp32); ``q`` are 4-bit codes in
GGUF nibble runs (each run of 32 values is 16 bytes, byte ``i`` holding value ``i`` in its low nibble and
value ``i + 16`` in its high nibble) or 8-bit codes one per byte. Three paths, picked from the number of
rows ``M`` of ``x`` (``plan_quant_linear``):

- ``M <= GEMV_MAX_M`` (decode at small batch): ``gemv``, a split-K GEMV on CUDA cores. A program owns
  ``BLOCK_N`` output columns and one K split for up to ``GEMV_MAX_M`` rows of ``x``: it reads every packed
  byte of its tile once, unpacks the nibbles in registers, applies the group's scale and bias in fp32 and
  reuses the dequantized tile for each of its rows (one fp32 FMA per weight per row).
- ``GEMV_MAX_M < M <= GEMM_MAX_M``: ``gemm``, a tiled GEMM that dequantizes each ``[BLOCK_K, BLOCK_N]``
  weight tile in registers (fp32, then rounded to ``x.dtype``) and multiplies it on the tensor cores with
  ``tl.dot``, fp32 accumulation; split-K when the output tiles alone would leave the GPU underused.
- ``M > GEMM_MAX_M`` (prefill chunks): ``dequant``, the weight dequantized to ``x.dtype`` by
  ``dequantize_triton`` and multiplied by cuBLAS (``torch.nn.functional.linear``).

Thresholds. The GEMV's CUDA-core work grows by one FMA per weight per row on top of the unpacking that all
rows share (about four operations per weight), while the tensor-core GEMM pays the unpacking plus a
shared-memory layout change once per 16..64 rows and nothing per row: past a few rows the GEMV stops
hiding its arithmetic under the weight stream, so ``GEMV_MAX_M = 4``. The dequantize-then-cuBLAS path
writes and re-reads the whole weight in 16 bits (about 4.5 bytes per weight instead of 0.5), which only
pays once cuBLAS's faster tiles save more than that: estimated at about 300 rows on an H200. ``GEMM_MAX_M
= 256`` also keeps every default decode CUDA-graph batch size (up to 256) on the in-tile kernels, so no
``[N, K]`` temporary is allocated inside a captured graph. Both constants need measuring on a GPU.

Split-K partials go to an fp32 ``[splits, M, N]`` workspace and a second kernel sums them in split order,
adds the bias and casts: deterministic, run to run. Everything is sized from host-side shapes and dtypes:
no host synchronisation, no ``.item()``, so every path can be captured in a CUDA graph (the workspace and
the dequantized weight come from torch's caching allocator, i.e. the graph's pool).

Tiles never straddle a quantization group: ``block_k`` is the largest power of two dividing
``group_size`` (capped), so a tile holds one group per output row, except that 4-bit tiles cover at least
one 32-value run; with ``group_size % 32 == 16`` such a run's low nibbles (values ``0..15``) and high
nibbles (``16..31``) may sit in two groups, each looked up on its own (``SPLIT_RUN``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
import triton
import triton.language as tl

from asyncllm.kernels.triton_launch import (
    SUPPORTED_DTYPES,
    check_dtype,
    dot_precision,
    interpreting,
    pow2_at_least,
    upcast_dot,
)
from asyncllm.quant.packed import NIBBLE_RUN, PackedWeight

QuantPath = Literal["gemv", "gemm", "dequant"]
PATHS: tuple[QuantPath, ...] = ("gemv", "gemm", "dequant")

GEMV_MAX_M = 4
"""Largest row count served by the GEMV (also the most rows one GEMV program handles)."""
GEMM_MAX_M = 256
"""Largest row count served by the in-tile GEMM; above it the weight is dequantized for cuBLAS."""
MAX_SPLIT_K = 16
"""Most K splits of one launch."""
CPU_TARGET_PROGRAMS = 1
"""Programs to aim for in the CPU interpreter (each runs serially there): no split-K unless asked for."""


# -- planning -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantLaunch:
    """Tile and split sizes of one quantized-linear launch.

    ``block_k`` values of K per tile (a power of two; divides ``group_size`` or is one 32-value run);
    ``split_k`` splits of ``split_len`` values each (a multiple of ``block_k``; the last may be shorter,
    none is empty); ``block_m`` rows of ``x`` per program (GEMV: rows reusing one dequantized tile).
    """

    path: QuantPath
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    split_len: int
    num_warps: int
    num_stages: int


def tile_k(bits: int, group_size: int, cap: int) -> int:
    """The largest power of two dividing ``group_size``, at most ``cap``; at least one 32-value nibble run
    for 4-bit codes and 16 values for 8-bit (``tl.dot``'s smallest K)."""
    largest = group_size & -group_size
    return max(min(largest, cap), NIBBLE_RUN if bits == 4 else 16)


def plan_splits(tiles: int, k: int, block_k: int, target_programs: int,
                split_k: int | None = None) -> tuple[int, int]:
    """``(split_k, split_len)``: enough K splits for ``tiles * split_k`` to reach ``target_programs``
    (or ``split_k`` if given), at most one per K tile and ``MAX_SPLIT_K``; ``split_len`` a multiple of
    ``block_k``, no split empty."""
    k_tiles = max(k // block_k, 1)
    if split_k is None:
        split_k = -(-target_programs // max(tiles, 1))
    split_k = max(1, min(split_k, k_tiles, MAX_SPLIT_K))
    split_len = -(-k_tiles // split_k) * block_k
    return -(-k // split_len), split_len


@lru_cache(maxsize=16)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device, per_sm: int) -> int:
    if device.type == "cuda" and not interpreting():
        return per_sm * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return CPU_TARGET_PROGRAMS


def default_path(m: int) -> QuantPath:
    """The path for ``m`` rows (see the module docstring for the thresholds)."""
    if m <= GEMV_MAX_M:
        return "gemv"
    return "gemm" if m <= GEMM_MAX_M else "dequant"


def plan_quant_linear(m: int, n: int, k: int, bits: int, group_size: int, dtype: torch.dtype,
                      device: torch.device, path: QuantPath | None = None,
                      split_k: int | None = None) -> QuantLaunch:
    """The launch for ``x [m, k] @ W.T`` with ``W [n, k]`` stored in ``bits`` with groups of ``group_size``.

    Host-side only (shapes, dtype, the device's multiprocessor count). ``path`` / ``split_k`` override the
    defaults (the tests use them to run every path on every shape)."""
    if path is None:
        path = default_path(m)
    if path not in PATHS:
        raise ValueError(f"path: must be one of {PATHS}, got {path!r}")
    if split_k is not None and split_k <= 0:
        raise ValueError(f"split_k: must be positive, got {split_k}")
    gpu = device.type == "cuda" and not interpreting()
    if path == "gemv":
        block_k = tile_k(bits, group_size, 256 if bits == 4 else 128)
        tile_bytes = block_k * bits // 8
        block_n = max(16, min(128, 4096 // tile_bytes)) if gpu else 64
        block_n = min(block_n, pow2_at_least(n, 16))
        block_m = min(pow2_at_least(m), GEMV_MAX_M)
        tiles = -(-m // block_m) * -(-n // block_n)
        splits, split_len = plan_splits(tiles, k, block_k, _target_programs(device, 4), split_k)
        return QuantLaunch("gemv", block_m, block_n, block_k, splits, split_len, 4, 2)
    if path == "gemm":
        wide = dtype != torch.float32
        block_k = tile_k(bits, group_size, 128 if wide else 64)
        block_m = min(pow2_at_least(m, 16), 64)
        block_n = (128 if m > 64 and wide else 64) if gpu else 64
        block_n = min(block_n, pow2_at_least(n, 16))
        tiles = -(-m // block_m) * -(-n // block_n)
        splits, split_len = plan_splits(tiles, k, block_k, _target_programs(device, 2), split_k)
        warps = 8 if block_m * block_n >= 8192 else 4
        return QuantLaunch("gemm", block_m, block_n, block_k, splits, split_len, warps, 3 if wide else 2)
    block_n, block_k = dequant_tiles(n, bits, group_size, device)
    return QuantLaunch("dequant", 0, block_n, block_k, 1, k, 4, 1)


def dequant_tiles(n: int, bits: int, group_size: int, device: torch.device) -> tuple[int, int]:
    """``(block_n, block_k)`` of ``dequantize_triton``: one program per ``[block_n, block_k]`` tile."""
    gpu = device.type == "cuda" and not interpreting()
    return (32 if gpu else min(pow2_at_least(n, 16), 64)), tile_k(bits, group_size, 256 if bits == 4 else 128)


# -- device code ----------------------------------------------------------------------------------
@triton.jit
def _as_float(code):
    """Small non-negative int32 codes (``< 2**23``) as exact fp32: the code ORed into the mantissa of
    ``2**23``, minus ``2**23``. One bitwise op and one fp32 subtract instead of an int-to-float conversion,
    which NVIDIA GPUs issue at a quarter to an eighth of the fp32 rate."""
    return (code | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _value_offsets(offs_j, BITS: tl.constexpr):
    """K offset (from the tile start) of the value in the low nibble (4-bit) or the byte (8-bit) at byte
    ``offs_j`` of a tile; a high nibble's value sits 16 further along."""
    # Bytes come in runs of 16 holding 32 (4-bit) or 16 (8-bit) values: for 8 bits this is ``offs_j``.
    return (offs_j // 16) * (128 // BITS) + offs_j % 16


@triton.jit
def _group_params(s_rows, b_rows, mask_n, k0, GROUP: tl.constexpr):
    """Scale and bias ``[BLOCK_N]`` of the group holding K offset ``k0``, one per output row."""
    g = k0 // GROUP
    scale = tl.load(s_rows + g, mask=mask_n, other=0.0).to(tl.float32)  # stored as float32 or float16
    bias = tl.load(b_rows + g, mask=mask_n, other=0.0).to(tl.float32)
    return scale, bias


@triton.jit
def _store_output(acc, offs_m, offs_n, mask_m, mask_n, split, bias_ptr, out_ptr, part_ptr,
                  stride_om, stride_ps, N, HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr):
    """``acc [BLOCK_M, BLOCK_N]`` (fp32): with one split, plus the bias, cast and stored to ``out``;
    else stored to the split's ``[M, N]`` plane of the fp32 workspace."""
    mask = mask_m[:, None] & mask_n[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    if DIRECT:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        plane = part_ptr + split.to(tl.int64) * stride_ps
        tl.store(plane + rows * N + offs_n[None, :], acc, mask=mask)


@triton.jit
def _gemv_kernel(
    x_ptr, q_ptr, s_ptr, b_ptr, bias_ptr, out_ptr, part_ptr,
    M, N, K, split_len,
    stride_xm, stride_qn, stride_sn, stride_om, stride_ps,
    BITS: tl.constexpr, GROUP: tl.constexpr, SPLIT_RUN: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    TILE_BYTES: tl.constexpr = BLOCK_K * BITS // 8
    offs_m = pid_m * ROWS + tl.arange(0, ROWS)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_j = tl.arange(0, TILE_BYTES)
    offs_k = _value_offsets(offs_j, BITS)
    rows_n = offs_n.to(tl.int64)
    q_rows = q_ptr + rows_n[:, None] * stride_qn + offs_j[None, :]
    s_rows = s_ptr + rows_n * stride_sn
    b_rows = b_ptr + rows_n * stride_sn
    k_start = split * split_len
    k_end = tl.minimum(k_start + split_len, K)
    acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        # Each packed byte of the tile is read once; nibbles are unpacked and dequantized in registers.
        byte = tl.load(q_rows + (k0 * BITS) // 8, mask=mask_n[:, None], other=0).to(tl.int32)
        scale, bias = _group_params(s_rows, b_rows, mask_n, k0, GROUP)
        if BITS == 4:
            w_lo = _as_float(byte & 15) * scale[:, None] + bias[:, None]
            if SPLIT_RUN:
                scale, bias = _group_params(s_rows, b_rows, mask_n, k0 + 16, GROUP)
            w_hi = _as_float(byte >> 4) * scale[:, None] + bias[:, None]
        else:
            w_lo = _as_float(byte) * scale[:, None] + bias[:, None]
        for r in tl.static_range(ROWS):
            row = pid_m * ROWS + r
            x_mask = (offs_j * 0 + row) < M
            x_row = x_ptr + row.to(tl.int64) * stride_xm + k0 + offs_k
            x_lo = tl.load(x_row, mask=x_mask, other=0.0).to(tl.float32)
            if BITS == 4:
                x_hi = tl.load(x_row + 16, mask=x_mask, other=0.0).to(tl.float32)
                dot = tl.sum(w_lo * x_lo[None, :] + w_hi * x_hi[None, :], 1)
            else:
                dot = tl.sum(w_lo * x_lo[None, :], 1)
            if ROWS == 1:
                acc += dot[None, :]
            else:
                acc = tl.where(offs_m[:, None] == row, acc + dot[None, :], acc)
    _store_output(acc, offs_m, offs_n, offs_m < M, mask_n, split, bias_ptr, out_ptr, part_ptr,
                  stride_om, stride_ps, N, HAS_BIAS, DIRECT)


@triton.jit
def _dot_acc(x_tile, w_tile, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + x_tile @ w_tile`` with the fp32 weight tile rounded to the activations' dtype first, as the
    tensor cores see it (widened back to fp32 under the interpreter, which mishandles bf16 dots)."""
    w_tile = w_tile.to(x_tile.dtype)
    if UPCAST:
        x_tile = x_tile.to(tl.float32)
        w_tile = w_tile.to(tl.float32)
    return tl.dot(x_tile, w_tile, acc, input_precision=PRECISION)


@triton.jit
def _gemm_kernel(
    x_ptr, q_ptr, s_ptr, b_ptr, bias_ptr, out_ptr, part_ptr,
    M, N, K, split_len,
    stride_xm, stride_qn, stride_sn, stride_om, stride_ps,
    BITS: tl.constexpr, GROUP: tl.constexpr, SPLIT_RUN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # Axis 0 runs over row blocks so that programs sharing a weight tile are scheduled together (L2 reuse).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    TILE_BYTES: tl.constexpr = BLOCK_K * BITS // 8
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_j = tl.arange(0, TILE_BYTES)
    offs_k = _value_offsets(offs_j, BITS)
    rows_n = offs_n.to(tl.int64)
    # The weight tile is loaded transposed, [TILE_BYTES, BLOCK_N], ready to be the right operand.
    q_cols = q_ptr + rows_n[None, :] * stride_qn + offs_j[:, None]
    s_rows = s_ptr + rows_n * stride_sn
    b_rows = b_ptr + rows_n * stride_sn
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    k_start = split * split_len
    k_end = tl.minimum(k_start + split_len, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        byte = tl.load(q_cols + (k0 * BITS) // 8, mask=mask_n[None, :], other=0).to(tl.int32)
        scale, bias = _group_params(s_rows, b_rows, mask_n, k0, GROUP)
        x_tile = tl.load(x_rows + k0, mask=mask_m[:, None], other=0.0)
        if BITS == 4:
            # Low nibbles hold the first 16 values of each run, high nibbles the next 16: two half-K dots
            # with the matching columns of x, so the tile never needs re-interleaving.
            w_tile = _as_float(byte & 15) * scale[None, :] + bias[None, :]
            acc = _dot_acc(x_tile, w_tile, acc, PRECISION, UPCAST)
            if SPLIT_RUN:
                scale, bias = _group_params(s_rows, b_rows, mask_n, k0 + 16, GROUP)
            w_tile = _as_float(byte >> 4) * scale[None, :] + bias[None, :]
            x_tile = tl.load(x_rows + k0 + 16, mask=mask_m[:, None], other=0.0)
            acc = _dot_acc(x_tile, w_tile, acc, PRECISION, UPCAST)
        else:
            w_tile = _as_float(byte) * scale[None, :] + bias[None, :]
            acc = _dot_acc(x_tile, w_tile, acc, PRECISION, UPCAST)
    _store_output(acc, offs_m, offs_n, mask_m, mask_n, split, bias_ptr, out_ptr, part_ptr,
                  stride_om, stride_ps, N, HAS_BIAS, DIRECT)


@triton.jit
def _reduce_splits_kernel(part_ptr, bias_ptr, out_ptr, N, splits, stride_ps, stride_om,
                          HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """``out[m, n] = sum over splits, in order, of part[s, m, n] (+ bias[n])``, cast to ``out``'s dtype."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros([BLOCK], tl.float32)
    parts = part_ptr + row * N + offs
    for _ in range(0, splits):
        acc += tl.load(parts, mask=mask, other=0.0)
        parts += stride_ps
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_kernel(
    q_ptr, s_ptr, b_ptr, out_ptr, N,
    stride_qn, stride_sn, stride_on,
    BITS: tl.constexpr, GROUP: tl.constexpr, SPLIT_RUN: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    k0 = tl.program_id(1) * BLOCK_K
    TILE_BYTES: tl.constexpr = BLOCK_K * BITS // 8
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_j = tl.arange(0, TILE_BYTES)
    offs_k = _value_offsets(offs_j, BITS)
    rows_n = offs_n.to(tl.int64)
    s_rows = s_ptr + rows_n * stride_sn
    b_rows = b_ptr + rows_n * stride_sn
    mask = mask_n[:, None]
    byte = tl.load(q_ptr + rows_n[:, None] * stride_qn + (k0 * BITS) // 8 + offs_j[None, :], mask=mask,
                   other=0).to(tl.int32)
    out_rows = out_ptr + rows_n[:, None] * stride_on + k0 + offs_k[None, :]
    scale, bias = _group_params(s_rows, b_rows, mask_n, k0, GROUP)
    if BITS == 4:
        w = _as_float(byte & 15) * scale[:, None] + bias[:, None]
        tl.store(out_rows, w.to(out_ptr.dtype.element_ty), mask=mask)
        if SPLIT_RUN:
            scale, bias = _group_params(s_rows, b_rows, mask_n, k0 + 16, GROUP)
        w = _as_float(byte >> 4) * scale[:, None] + bias[:, None]
        tl.store(out_rows + 16, w.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        w = _as_float(byte) * scale[:, None] + bias[:, None]
        tl.store(out_rows, w.to(out_ptr.dtype.element_ty), mask=mask)


# -- host wrappers --------------------------------------------------------------------------------
def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _check_device(name: str, tensor: torch.Tensor) -> None:
    if tensor.device.type != "cuda" and not interpreting():
        raise ValueError(f"{name}: Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 on CPU), "
                         f"got one on {tensor.device}")


def _check_weight(weight: object) -> PackedWeight:
    if not isinstance(weight, PackedWeight):
        raise ValueError(f"weight: expected a PackedWeight, got {type(weight).__name__}")
    _check_device("weight", weight.qweight)
    return weight


def _split_run(weight: PackedWeight) -> bool:
    return weight.bits == 4 and weight.group_size % NIBBLE_RUN != 0


def dequantize_triton(weight: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``weight.dequantize(dtype)`` on the device: the ``[N, K]`` weight, computed in fp32 then cast.

    One program per ``[block_n, block_k]`` tile; no host synchronisation."""
    weight = _check_weight(weight)
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype: must be float32, float16 or bfloat16, got {dtype}")
    n, k = weight.shape
    qweight = weight.qweight
    out = torch.empty((n, k), dtype=dtype, device=qweight.device)
    if n == 0 or k == 0:
        return out
    block_n, block_k = dequant_tiles(n, weight.bits, weight.group_size, qweight.device)
    qweight, scales, biases = _unit_stride(qweight), _unit_stride(weight.scales), _unit_stride(weight.biases)
    _dequant_kernel[(triton.cdiv(n, block_n), k // block_k)](
        qweight, scales, biases, out, n,
        qweight.stride(0), scales.stride(0), out.stride(0),
        BITS=weight.bits, GROUP=weight.group_size, SPLIT_RUN=_split_run(weight),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return out


def _check_linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None) -> None:
    check_dtype("x", x)
    if x.dim() != 2:
        raise ValueError(f"x: expected [M, K], got shape {tuple(x.shape)}")
    if x.shape[1] != weight.in_features:
        raise ValueError(f"x: K={x.shape[1]} differs from the weight's in_features {weight.in_features}")
    if x.device != weight.qweight.device:
        raise ValueError(f"x: on {x.device}, the weight on {weight.qweight.device}")
    if bias is not None:
        check_dtype("bias", bias)
        if tuple(bias.shape) != (weight.out_features,):
            raise ValueError(f"bias: expected shape ({weight.out_features},), got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias: on {bias.device}, x on {x.device}")


def quant_linear_triton(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None, *,
                        path: QuantPath | None = None, split_k: int | None = None) -> torch.Tensor:
    """``x @ weight.dequantize().T + bias`` as ``[M, N]`` in ``x.dtype`` (fp32, fp16 or bf16).

    ``x`` is ``[M, K]`` (any row stride) on the weight's device; ``bias`` ``[N]`` or ``None``. Products
    accumulate in fp32; the GEMM rounds each dequantized weight to ``x.dtype`` before the tensor-core dot
    and the ``dequant`` path hands cuBLAS the weight in ``x.dtype``, so 16-bit activations see 16-bit
    weights there (fp32 activations see the exact fp32 weights on every path). ``path`` and ``split_k``
    override the choice ``plan_quant_linear`` makes from ``M``. CUDA-graph safe: no host synchronisation."""
    weight = _check_weight(weight)
    _check_linear(x, weight, bias)
    m, n, k = x.shape[0], weight.out_features, weight.in_features
    launch = plan_quant_linear(m, n, k, weight.bits, weight.group_size, x.dtype, x.device, path, split_k)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(bias.to(x.dtype).expand(m, n)) if bias is not None else out.zero_()
    if launch.path == "dequant":
        w = dequantize_triton(weight, x.dtype)
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
    x = _unit_stride(x)
    qweight, scales, biases = _unit_stride(weight.qweight), _unit_stride(weight.scales), _unit_stride(weight.biases)
    bias_arg = _unit_stride(bias) if bias is not None else out
    direct = launch.split_k == 1
    part = out if direct else torch.empty((launch.split_k, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, launch.block_m), triton.cdiv(n, launch.block_n), launch.split_k)
    args = (x, qweight, scales, biases, bias_arg, out, part, m, n, k, launch.split_len,
            x.stride(0), qweight.stride(0), scales.stride(0), out.stride(0), m * n)
    common = dict(BITS=weight.bits, GROUP=weight.group_size, SPLIT_RUN=_split_run(weight),
                  BLOCK_N=launch.block_n, BLOCK_K=launch.block_k, HAS_BIAS=bias is not None, DIRECT=direct,
                  num_warps=launch.num_warps, num_stages=launch.num_stages)
    if launch.path == "gemv":
        _gemv_kernel[grid](*args, ROWS=launch.block_m, **common)
    else:
        _gemm_kernel[grid](*args, BLOCK_M=launch.block_m, PRECISION=dot_precision(x.dtype),
                           UPCAST=upcast_dot(x.dtype), **common)
    if not direct:
        block = min(pow2_at_least(n, 128), 1024)
        _reduce_splits_kernel[(m, triton.cdiv(n, block))](
            part, bias_arg, out, n, launch.split_k, m * n, out.stride(0),
            HAS_BIAS=bias is not None, BLOCK=block, num_warps=4,
        )
    return out
