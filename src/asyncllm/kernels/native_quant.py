"""Weight-only quantized linears on CPU in C (``csrc/quant_linear.c`` over ``csrc/quant_gemv.h``).

``quant_linear_native(x, weight, bias)`` computes ``x @ weight.dequantize().T + bias`` for float32 ``x``
``[M, K]`` and a ``PackedWeight`` (4-bit nibble runs or 8-bit codes, any group size) without materialising
the float weight. Scheme (llama.cpp's ``Q8_0`` activations): each activation row is quantized to int8 per
block of 32 values (``d = max|x| / 127``), codes times activations are exact integer dot products (AVX-512
VNNI ``vpdpbusd``, AVX-VNNI, or AVX2 ``vpmaddubsw``; portable C elsewhere), each block's sum is scaled by
``d * scales[n, g]`` in float, and the biases meet the exact float sums of ``x`` over each group. Hence the
only error beyond fp32 rounding is the activations' int8 rounding:
``|y - x @ w.T| <= sum_blocks (d_b / 2) * sum_{k in b} |scales[n, g(k)] * q[n, k]|``.

``cpu_quant_linear`` is the one to call: the native kernel where it is built and ``x`` is float32, else the
torch reference ``F.linear(x, weight.dequantize(x.dtype), bias)``.

Invariants: the C code trusts every size and pointer it gets, so ``quant_linear_native`` checks dtypes,
shapes, devices and layouts first (``ValueError`` naming the argument); the weight's tensors must be
contiguous CPU tensors (``PackedWeight`` checks their dtypes and shapes); the kernel only reads ``x`` and
the weight, and writes a fresh output.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
import torch.nn.functional as F

from asyncllm.kernels.native_build import load_native_library
from asyncllm.quant.packed import PackedWeight

_SOURCE = "quant_linear.c"
_ARGTYPES = (
    [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    + [ctypes.c_void_p] * 3 + [ctypes.c_int32, ctypes.c_int64, ctypes.c_int64]
    + [ctypes.c_void_p] * 2 + [ctypes.c_int32]
)

_loaded: dict[str, Callable[..., int] | None] = {}


def load_quant_library() -> ctypes.CDLL | None:
    """The compiled ``quant_linear.c``, building it on first use; ``None`` where native kernels are off or
    cannot be built here (``native_build`` logs why)."""
    return load_native_library(_SOURCE)


def _function() -> Callable[..., int] | None:
    """The bound C entry point, loaded once per process."""
    if _SOURCE not in _loaded:
        library = load_quant_library()
        function = None
        if library is not None:
            function = library.asyncllm_quant_linear
            function.restype = ctypes.c_int
            function.argtypes = _ARGTYPES
        _loaded[_SOURCE] = function
    return _loaded[_SOURCE]


def native_quant_available() -> bool:
    """Whether ``quant_linear_native`` can run here."""
    return _function() is not None


def _check(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None) -> None:
    if not isinstance(weight, PackedWeight):
        raise ValueError(f"weight: expected a PackedWeight, got {type(weight).__name__}")
    n, k = weight.shape
    for name in ("qweight", "scales", "biases"):
        tensor = getattr(weight, name)
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError(f"weight: {name} must be a contiguous CPU tensor, got {tuple(tensor.shape)} with "
                             f"strides {tensor.stride()} on {tensor.device}")
    if x.dtype != torch.float32 or x.dim() != 2 or x.device.type != "cpu" or x.shape[1] != k:
        raise ValueError(f"x: expected float32 [M, {k}] on CPU, got {x.dtype} {tuple(x.shape)} on {x.device}")
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (n,) or bias.device.type != "cpu"):
        raise ValueError(f"bias: expected float32 [{n}] on CPU, got {bias.dtype} {tuple(bias.shape)} on "
                         f"{bias.device}")


def quant_linear_native(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.dequantize().T (+ bias)`` for float32 ``x`` ``[M, K]`` -> float32 ``[M, N]``, in C (see
    the module docstring for the scheme and its error bound); any ``M``, using ``torch.get_num_threads()``
    threads. Raises ``ValueError`` for inputs it cannot take and ``RuntimeError`` where the native kernel
    is not built (``cpu_quant_linear`` falls back instead)."""
    _check(x, weight, bias)
    function = _function()
    if function is None:
        raise RuntimeError(f"the native kernel {_SOURCE} is not available here")
    n, k = weight.shape
    rows = int(x.shape[0])
    out = torch.empty(rows, n, dtype=torch.float32)
    if rows == 0 or n == 0:
        return out
    if x.stride(1) != 1 or x.stride(0) < k:
        x = x.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    status = function(
        x.data_ptr(), x.stride(0), rows, k, weight.qweight.data_ptr(), weight.scales.data_ptr(),
        weight.biases.data_ptr(), weight.bits, weight.group_size, n,
        None if bias is None else bias.data_ptr(), out.data_ptr(), torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError(f"{_SOURCE}: could not allocate the activation scratch for {rows} x {k}")
    return out


def cpu_quant_linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight.dequantize(x.dtype), bias)`` for ``x`` ``[..., K]``: the native kernel for float32
    CPU inputs where it is built, else the torch reference (which the native kernel is tested against)."""
    if x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() >= 1 and native_quant_available():
        flat = x.reshape(-1, x.shape[-1])
        return quant_linear_native(flat, weight, bias).reshape(*x.shape[:-1], weight.out_features)
    return F.linear(x, weight.dequantize(x.dtype), bias)
