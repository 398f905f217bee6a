"""Weight-only quantized linears on CPU in C (``csrc/quant_linear.c`` over ``csrc/quant_gemv.h``).

``quant_linear_native(x, weight, bias)`` computes ``x @ weight.dequantize().T + bias`` for float32 ``x``
``[M, K]`` and a ``PackedWeight`` (4-bit nibble runs or 8-bit codes, any group size) in one of two ways:

* up to ``GEMV_MAX_ROWS`` rows, ``gemv``, without materialising the float weight. Scheme (llama.cpp's
  ``Q8_0`` / ``Q8_1`` activations): each activation row is quantized to int8 per block of 32 values
  (``d = max|x| / 127``, ``xhat = d * round(x / d)``); codes times int8 activations are exact integer dot
  products (AVX-512 VNNI ``vpdpbusd``, AVX-VNNI, or AVX2 ``vpmaddubsw``; portable C elsewhere); each block's
  sum is scaled by ``d * scales[n, g]`` in float and the biases meet the group sums of ``xhat``. The result
  is ``xhat @ w.T + bias`` up to fp32 rounding, so its error is bounded by the activations' int8 rounding:
  ``|y - x @ w.T| <= sum_blocks (d_b / 2) * sum_{k in b} |w[n, k]|``. (Pairing the biases with the exact
  sums of ``x`` instead leaves an error that scales with the codes' unsigned part ``|scales * q|``:
  measured 2-3x larger on Q4_0-, Q4_1-, AWQ-, Q8_0- and Q6_K-style weights, whose zero points sit mid-range.)
* beyond, ``dequantized``: slabs of the weight dequantized in C into a reused buffer, each multiplied by
  torch's GEMM: ``x @ w.T`` in fp32, no activation rounding.

``cpu_quant_linear`` is the one to call: the native kernel where it is built and ``x`` is float32, else the
torch reference ``F.linear(x, weight.dequantize(x.dtype), bias)`` (7-34x slower than the dense fp32 path
at one row on the SmolLM2 shapes below, as it dequantizes every call).

Measurements (``benchmarks/quant_linear_cpu.py``; x86 Sapphire Rapids VM, 2 threads, shared with other
jobs, so candidates alternate and each figure is the median over rounds of a round's fastest call, with
``OMP_WAIT_POLICY=PASSIVE``). Weights cache-resident (one copy); dense is ``kernels.cpu.linear_cpu`` on the
dequantized weight in the CPU bundle's layout, in µs; the other rows are ratios to it (below 1 is faster).
``f32act`` was a float-activation variant (codes dequantized in registers, fp32 FMA: exact), ``i4pack``
torch's ``_weight_int4pack_mm_for_cpu`` (4-bit only, repacked; with fp32 activations it is slow, so it
was not run on the 8B shapes). Group size 32 throughout (the common GGUF case):

    M:                                     1        2        4        8       16       32       64      128
    q/o 576x576 q4            dense     40.0     42.3     55.7     67.1     86.5      124      281      319
                              gemv      0.90     0.89     0.96     1.19     1.53     1.89     1.43     1.74
                              tiled     2.65     2.37     2.79     2.54     2.27     2.09     1.30     1.20
                              f32act    0.94     0.98     1.02     1.63     2.22     3.20     2.59     3.08
                              i4pack    10.6     21.0     33.6     65.2    100.7    134.1    111.5    150.9
    k/v 192x576 q4            dense     36.8     39.0     54.2     42.0     48.9     64.0      141      172
                              gemv      0.95     1.00     0.80     1.04     1.30     1.50     1.27     1.76
                              tiled     1.88     2.04     1.84     2.05     1.94     1.70     1.15     1.12
                              f32act    0.56     0.53     0.42     1.02     1.35     1.98     1.87     2.81
    gate+up 3072x576 q4       dense      233      276      283      490      706     1127     2109     3966
                              gemv      0.31     0.36     0.53     0.57     0.80     0.87     1.02     0.73
                              tiled     2.25     2.03     2.24     1.61     1.56     1.06     0.68     0.61
                              f32act    0.74     0.84     0.70     1.03     1.41     1.60     1.25     1.29
                              i4pack    11.7     19.7     35.6     42.8     56.2     68.4     63.1     63.1
    down 576x1536 q4          dense     81.4     66.1      199      184      233      397      596      945
                              gemv      0.53     0.72     0.43     0.52     0.70     1.07     0.96     1.20
                              tiled     3.00     3.12     1.42     1.53     2.05     1.96     1.16     1.13
                              f32act    0.97     1.01     0.56     0.72     1.35     2.22     2.09     2.82
    lm_head 49152x576 q8      dense     3640     5390     7518     8381    12736    19524    32476    63843
                              gemv      0.36     0.21     0.27     0.51     0.67     0.82     1.10     1.09
                              tiled     2.21     1.43     1.52     1.68     1.44     1.13     1.04     0.74
                              f32act    0.64     0.34     0.43     0.83     1.06     1.48     1.93     2.12
    8B gate/up 14336x4096 q4  dense     7758    13236    18423    29406    34870    59441    76641   126921
                              gemv      0.23     0.24     0.21     0.23     0.29     0.41     0.56     0.56
                              tiled     2.24     1.27     1.11     0.95     1.27     1.06     0.72     0.56
                              f32act    0.65     0.44     0.36     0.50     0.67     1.02     1.28     2.36
    8B down 4096x14336 q4     dense     6679     6682    10523    13770    16746    25698    32286   105634
                              gemv      0.21     0.25     0.32     0.62     0.91     1.27     1.36     1.08
                              tiled     2.42     2.58     2.19     2.14     1.96     1.69     1.79     1.37
                              f32act    0.46     0.57     0.54     1.08     1.88     2.24     6.64     6.75

(i4pack on the k/v and down shapes: 5.6-130x, like the rows shown.) Weights streamed from memory instead
(``--pool-mib 1024``: every candidate cycles through 1 GiB of copies), gemv / dense at M = 1, 2, 4:
q/o 0.58 0.48 0.44, k/v 0.66 0.75 0.55, gate+up 0.36 0.27 0.26, down 0.52 0.43 0.35, lm_head 0.54 0.35
0.35, 8B gate/up 0.35 0.23 0.21, 8B down 0.28 0.37 0.36 (f32act: 0.31-0.77, and 1.5-2.3x gemv's time on
the 8B shapes).

Hence the int8-activation kernel: the float-activation one was slower wherever the arithmetic shows (its
one lead, k/v at up to 4 rows, is call overhead: that candidate skipped the Python checks). And
``GEMV_MAX_ROWS = 32``: gemv is the faster path on every shape up to 32 rows; at 128 rows the dequantized
tiles win on all five SmolLM2 shapes (and on four of five at 64) while gemv keeps up on the 8B ones (tie
on gate/up, 1.08 vs 1.37 of dense on down); the tiles also give exact fp32 results for prefill. On the
smallest matrices gemv merely matches dense at one row because a call costs ~18 µs of which ~13 are Python
and ctypes; the fused decode layer calls ``quant_gemv.h`` from C without them.

Scales and biases stored as float16 (what ``pack`` keeps where exact, e.g. GGUF ``Q4_0`` / ``Q4_1`` /
``Q8_0``) are converted exactly as they are read (``vcvtph2ps``); the results equal those of the same values
in float32. Weights streamed from memory at M = 1 (2 threads, shared VM, alternating medians over 512 MiB
pools; SmolLM2 shapes, group 32), fp16 / fp32 parameters: q/o 0.98, k/v 1.00, gate+up 0.98, down 0.97,
lm_head (8-bit) 1.02: within noise on this machine, although a weight is 5/6 (8-bit: 9/10) of the bytes.

Invariants: the C code trusts every size and pointer it gets, so every call checks dtypes, shapes, devices
and layouts first (``ValueError`` naming the argument); the weight's tensors must be contiguous CPU tensors
(``PackedWeight`` itself checks their dtypes and shapes: scales and biases both float32 or both float16, the
kernels convert float16 ones exactly as they read them); the kernel reads ``x``, the weight and the bias,
and writes only its output (a fresh tensor, or ``add_to``) and its own scratch.
"""

from __future__ import annotations

import ctypes
import functools
import threading

import torch
import torch.nn.functional as F

from asyncllm.kernels.native_build import load_native_library
from asyncllm.quant.packed import PackedWeight

_SOURCE = "quant_linear.c"
_ARGTYPES = (
    [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    + [ctypes.c_void_p] * 3 + [ctypes.c_int32, ctypes.c_int32, ctypes.c_int64, ctypes.c_int64]
    + [ctypes.c_void_p] * 2 + [ctypes.c_int32, ctypes.c_int32]
)


def load_quant_library() -> ctypes.CDLL | None:
    """The compiled ``quant_linear.c``, building it on first use; ``None`` where native kernels cannot be
    built here (``native_build`` logs why)."""
    return load_native_library(_SOURCE)


def _check(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None, add_to: torch.Tensor | None) -> None:
    """Raise ``ValueError`` naming the first argument the C code cannot take as it is."""
    if type(weight) is PackedWeight:  # the common case first, in few attribute reads (~1 us of a ~20 us call)
        q, s, b = weight.qweight, weight.scales, weight.biases
        if (add_to is None and x.dtype == torch.float32 and x.is_cpu and x.dim() == 2
                and x.shape[1] == weight.in_features and q.is_cpu and s.is_cpu and b.is_cpu
                and q.is_contiguous() and s.is_contiguous() and b.is_contiguous()
                and (bias is None or (bias.dtype == torch.float32 and bias.is_cpu and bias.dim() == 1
                                      and bias.shape[0] == q.shape[0]))):
            return
    _explain(x, weight, bias, add_to)


def _explain(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None, add_to: torch.Tensor | None) -> None:
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
    rows = int(x.shape[0])
    if add_to is not None and (add_to.dtype != torch.float32 or tuple(add_to.shape) != (rows, n)
                               or add_to.device.type != "cpu" or not add_to.is_contiguous()):
        raise ValueError(f"add_to: expected a contiguous float32 [{rows}, {n}] CPU tensor, got {add_to.dtype} "
                         f"{tuple(add_to.shape)} with strides {add_to.stride()} on {add_to.device}")


_DEQUANT_ARGTYPES = (
    [ctypes.c_void_p] * 3 + [ctypes.c_int32] * 2 + [ctypes.c_int64] * 4 + [ctypes.c_void_p, ctypes.c_int32]
)

GEMV_MAX_ROWS = 32
"""Rows up to which ``NativeQuantLinear`` runs the int8-activation kernel (``gemv``); more rows take the
dequantized tiles (``dequantized``). See the module docstring for the measurements behind it."""
TILE_BYTES = 8 << 20
"""Float32 bytes of one dequantized weight slab on the many-row path."""


class NativeQuantLinear:
    """A loaded ``quant_linear.c`` library's entry points, argument types declared; calling it runs
    ``quant_linear_native``'s contract on that library (tests load builds for other instruction sets)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        function = library.asyncllm_quant_linear
        function.restype = ctypes.c_int
        function.argtypes = _ARGTYPES
        self._function = function
        dequantize = library.asyncllm_quant_dequantize
        dequantize.restype = None
        dequantize.argtypes = _DEQUANT_ARGTYPES
        self._dequantize = dequantize
        self._local = threading.local()  # each thread's slab buffer, reused across calls

    def _slab_buffer(self, numel: int) -> torch.Tensor:
        buffer: torch.Tensor | None = getattr(self._local, "buffer", None)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=torch.float32)
            self._local.buffer = buffer
        return buffer[:numel]

    def __call__(self, x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None, *,
                 add_to: torch.Tensor | None = None) -> torch.Tensor:
        """The int8-activation kernel up to ``GEMV_MAX_ROWS`` rows, dequantized tiles beyond."""
        if x.dim() == 2 and x.shape[0] > GEMV_MAX_ROWS:
            return self.dequantized(x, weight, bias, add_to=add_to)
        return self.gemv(x, weight, bias, add_to=add_to)

    def gemv(self, x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None, *,
             add_to: torch.Tensor | None = None) -> torch.Tensor:
        """The int8-activation kernel at any row count: ``xhat @ w.T (+ bias)`` up to fp32 rounding."""
        _check(x, weight, bias, add_to)
        n, k = weight.shape
        rows = int(x.shape[0])
        out = torch.empty(rows, n, dtype=torch.float32) if add_to is None else add_to
        if rows == 0 or n == 0:
            return out
        if x.stride(1) != 1 or x.stride(0) < k:
            x = x.contiguous()
        if bias is not None:
            bias = bias.contiguous()
        status = self._function(
            x.data_ptr(), x.stride(0), rows, k, weight.qweight.data_ptr(), weight.scales.data_ptr(),
            weight.biases.data_ptr(), int(weight.scales.dtype == torch.float16), weight.bits, weight.group_size, n,
            None if bias is None else bias.data_ptr(), out.data_ptr(), int(add_to is not None),
            torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError(f"{_SOURCE}: could not allocate the activation scratch for {rows} x {k}")
        return out

    def dequantized(self, x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None, *,
                    add_to: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ w.T (+ bias)`` in float32 at any row count: slabs of at most ``TILE_BYTES`` of the weight
        dequantized in C (as ``PackedWeight.dequantize``, up to one rounding of its multiply-add) into a
        buffer the calling thread reuses, each multiplied by torch's GEMM; no activation rounding."""
        _check(x, weight, bias, add_to)
        n, k = weight.shape
        rows = int(x.shape[0])
        if rows == 0 or n == 0:
            return torch.empty(rows, n, dtype=torch.float32) if add_to is None else add_to
        slab = min(n, max(16, TILE_BYTES // (4 * k) // 16 * 16))
        buffer = self._slab_buffer(slab * k).view(slab, k)
        threads = torch.get_num_threads()

        def product(lo: int, hi: int) -> torch.Tensor:
            self._dequantize(weight.qweight.data_ptr(), weight.scales.data_ptr(), weight.biases.data_ptr(),
                             int(weight.scales.dtype == torch.float16), weight.bits, k, weight.group_size, lo, hi,
                             buffer.data_ptr(), threads)
            return F.linear(x, buffer[: hi - lo], None if bias is None else bias[lo:hi])

        if slab >= n:
            out = product(0, n)
        else:
            out = torch.empty(rows, n, dtype=torch.float32)
            for lo in range(0, n, slab):
                out[:, lo:min(n, lo + slab)] = product(lo, min(n, lo + slab))
        return out if add_to is None else add_to.add_(out)


@functools.cache
def native_quant_linear() -> NativeQuantLinear | None:
    """The native kernel, loaded once per process (the library is immutable once built); ``None`` where it
    cannot be built."""
    library = load_quant_library()
    return None if library is None else NativeQuantLinear(library)


def quant_linear_native(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None, *,
                        add_to: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.dequantize().T (+ bias)`` for float32 ``x`` ``[M, K]`` -> float32 ``[M, N]``, in C (see
    the module docstring for the scheme and its error bound); any ``M``, on ``torch.get_num_threads()``
    threads. With ``add_to`` (contiguous float32 ``[M, N]``) the result is added into it in place and it is
    returned. Raises ``ValueError`` naming the argument it cannot take, ``RuntimeError`` where the native
    kernel is not built (``cpu_quant_linear`` falls back instead)."""
    kernel = native_quant_linear()
    if kernel is None:
        _check(x, weight, bias, add_to)
        raise RuntimeError(f"the native kernel {_SOURCE} is not available here")
    return kernel(x, weight, bias, add_to=add_to)


def cpu_quant_linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight.dequantize(x.dtype), bias)`` for ``x`` ``[..., K]``: the native kernel for float32
    CPU inputs where it is built, else that torch reference (which the native kernel is tested against)."""
    kernel = native_quant_linear()
    if kernel is None or x.dtype != torch.float32 or not x.is_cpu or x.dim() < 1:
        return F.linear(x, weight.dequantize(x.dtype), bias)
    if x.dim() == 2:
        return kernel(x, weight, bias)
    return kernel(x.reshape(-1, x.shape[-1]), weight, bias).reshape(*x.shape[:-1], weight.out_features)
