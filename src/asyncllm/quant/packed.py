"""The two forms every weight-only quantized matrix takes, whatever format it was stored in.

``QuantCodes`` is the exact, format-neutral form the loaders produce (one integer code per byte):
``w[n, k] = scales[n, g] * (codes[n, k] - zeros[n, g]) + mins[n, g]`` with ``g = k // group_size``,
computed in float32. Every supported format fits it without rounding: AWQ / GPTQ / compressed-tensors
(``zeros`` the integer zero point, ``mins`` 0), GGUF ``Q4_0`` / ``Q8_0`` / ``Q6_K`` (``zeros`` 8 / 128 / 32
on unsigned codes), ``Q4_1`` / ``Q4_K`` / ``Q5_K`` (``zeros`` 0, ``mins`` the block minimum).

``PackedWeight`` is the form kernels read, made once after loading (``pack``): codes of up to 4 bits two
per byte, wider codes one per byte, and the affine parameters folded to ``w = scales * q + biases``
(``biases = mins - scales * zeros``, computed in float32). ``scales`` and ``biases`` are stored as float16
when both convert to it exactly (every GGUF ``Q4_0`` / ``Q4_1`` / ``Q8_0`` block: ``d`` and ``m`` are float16
and ``-8 * d``, ``-128 * d`` scale by powers of two), else float32: for 4-bit codes in groups of 32 that is
1 bit of parameters per weight instead of 2 (5 bits per weight against 6), and CPU decode streams every
byte. Kernels read either and compute in float32, so the values are the same either way. The nibble order
follows GGUF's 4-bit blocks so a SIMD unpack is two instructions: along each row, every run of 32 values is
16 bytes whose byte ``i`` holds value ``i`` in its low nibble and value ``i + 16`` in its high nibble.

Invariants (checked by the constructors): 2-D ``[N, K]`` codes, ``group_size`` divides ``K`` and is a
multiple of 16; 4-bit storage needs ``K % 32 == 0``; scales/zeros/mins are float32 ``[N, K // G]`` on the
codes' device, a ``PackedWeight``'s scales/biases ``[N, K // G]`` on its codes' device, both float32 or both
float16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STORAGE_BITS = (4, 8)
"""Bits per stored code: 4 (two per byte) for codes below 16, else 8."""
NIBBLE_RUN = 32
"""Values per nibble run in 4-bit storage (see the module docstring)."""


PARAM_DTYPES = (torch.float32, torch.float16)
"""The dtypes of a ``PackedWeight``'s scales and biases (both the same)."""


def _check_groups(name: str, tensor: torch.Tensor, rows: int, groups: int, device: torch.device,
                  dtype: torch.dtype = torch.float32) -> None:
    if tensor.dtype != dtype or tuple(tensor.shape) != (rows, groups) or tensor.device != device:
        raise ValueError(f"{name}: expected {dtype} [{rows}, {groups}] on {device}, got {tensor.dtype} "
                         f"{tuple(tensor.shape)} on {tensor.device}")


@dataclass(frozen=True)
class QuantCodes:
    """A weight ``[N, K]`` as integer codes and per-group affine parameters (see the module docstring).

    ``bits`` is the code width the format declared (codes lie in ``[0, 2**bits)``); ``zeros`` may hold any
    float (integers in every format so far)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    mins: torch.Tensor
    bits: int
    group_size: int

    def __post_init__(self) -> None:
        if self.codes.dtype != torch.uint8 or self.codes.dim() != 2:
            raise ValueError(f"codes: expected a 2-D uint8 tensor, got {self.codes.dtype} {tuple(self.codes.shape)}")
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits: must be in [1, 8], got {self.bits}")
        rows, cols = self.codes.shape
        if self.group_size <= 0 or self.group_size % 16 or cols % self.group_size:
            raise ValueError(f"group_size: {self.group_size} must be a positive multiple of 16 dividing K={cols}")
        for name in ("scales", "zeros", "mins"):
            _check_groups(name, getattr(self, name), rows, cols // self.group_size, self.codes.device)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def dequantize(self) -> torch.Tensor:
        """The float32 ``[N, K]`` weight, exactly as the module docstring's formula computes it."""
        g = self.group_size
        codes = self.codes.float().unflatten(1, (-1, g))
        values = (codes - self.zeros.unsqueeze(-1)) * self.scales.unsqueeze(-1) + self.mins.unsqueeze(-1)
        return values.flatten(1)

    def with_group_size(self, group_size: int) -> QuantCodes:
        """The same weight with groups of ``group_size`` (a divisor of the current one): the parameters of
        each group are repeated, so ``dequantize`` is unchanged."""
        if group_size == self.group_size:
            return self
        if group_size <= 0 or self.group_size % group_size:
            raise ValueError(f"group_size: {group_size} does not divide the current {self.group_size}")
        repeat = self.group_size // group_size
        scales, zeros, mins = (t.repeat_interleave(repeat, dim=1) for t in (self.scales, self.zeros, self.mins))
        return QuantCodes(self.codes, scales, zeros, mins, bits=self.bits, group_size=group_size)


def storage_bits(bits: int) -> int:
    """The stored width of ``bits``-bit codes."""
    return 4 if bits <= 4 else 8


@dataclass(frozen=True)
class PackedWeight:
    """A quantized ``[N, K]`` weight as kernels read it (see the module docstring).

    ``qweight`` is uint8 ``[N, K * bits // 8]`` for storage ``bits`` 4 or 8; ``scales`` / ``biases``
    ``[N, K // group_size]``, both float32 or both float16; ``w[n, k] = scales[n, g] * q[n, k] + biases[n, g]``
    in float32."""

    qweight: torch.Tensor
    scales: torch.Tensor
    biases: torch.Tensor
    bits: int
    group_size: int
    in_features: int

    def __post_init__(self) -> None:
        if self.bits not in STORAGE_BITS:
            raise ValueError(f"bits: storage width must be one of {STORAGE_BITS}, got {self.bits}")
        k = self.in_features
        if self.qweight.dtype != torch.uint8 or self.qweight.dim() != 2 or self.qweight.shape[1] * 8 != k * self.bits:
            raise ValueError(f"qweight: expected uint8 [N, {k * self.bits // 8}], got {self.qweight.dtype} "
                             f"{tuple(self.qweight.shape)}")
        if self.bits == 4 and k % NIBBLE_RUN:
            raise ValueError(f"in_features: 4-bit storage needs a multiple of {NIBBLE_RUN}, got {k}")
        if self.group_size <= 0 or self.group_size % 16 or k % self.group_size:
            raise ValueError(f"group_size: {self.group_size} must be a positive multiple of 16 dividing K={k}")
        rows = int(self.qweight.shape[0])
        dtype = self.scales.dtype
        if dtype not in PARAM_DTYPES:
            raise ValueError(f"scales: expected float32 or float16, got {dtype}")
        if self.biases.dtype != dtype:
            raise ValueError(f"biases: expected the scales' dtype {dtype}, got {self.biases.dtype}")
        for name in ("scales", "biases"):
            _check_groups(name, getattr(self, name), rows, k // self.group_size, self.qweight.device, dtype)

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.biases))

    def codes(self) -> torch.Tensor:
        """The uint8 ``[N, K]`` codes, one per byte."""
        if self.bits == 8:
            return self.qweight
        runs = self.qweight.unflatten(1, (-1, NIBBLE_RUN // 2))
        return torch.cat((runs & 0x0F, runs >> 4), dim=2).flatten(1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``[N, K]`` weight (computed in float32, then cast): the reference every kernel is tested on."""
        codes = self.codes().float().unflatten(1, (-1, self.group_size))
        values = codes * self.scales.float().unsqueeze(-1) + self.biases.float().unsqueeze(-1)
        return values.flatten(1).to(dtype)

    def rows(self, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``index`` (any shape of int64) dequantized: ``[*index.shape, K]`` (an embedding lookup)."""
        flat = index.reshape(-1)
        picked = PackedWeight(self.qweight.index_select(0, flat), self.scales.index_select(0, flat),
                              self.biases.index_select(0, flat), self.bits, self.group_size, self.in_features)
        return picked.dequantize(dtype).reshape(*index.shape, self.in_features)


def _exact_in_half(tensor: torch.Tensor) -> bool:
    """Whether every element of a float32 tensor is finite and a float16 value."""
    return bool(torch.isfinite(tensor).all()) and bool((tensor.half().float() == tensor).all())


def pack(codes: QuantCodes) -> PackedWeight:
    """``codes`` in kernel storage: 4-bit nibble runs when ``codes.bits <= 4``, else one byte per code; scales
    and biases as float16 when both convert to it exactly, else float32 (``dequantize`` is the same)."""
    bits = storage_bits(codes.bits)
    cols = codes.shape[1]
    scales = codes.scales.contiguous()
    biases = (codes.mins - codes.scales * codes.zeros).contiguous()
    if _exact_in_half(scales) and _exact_in_half(biases):
        scales, biases = scales.half(), biases.half()
    if bits == 8:
        return PackedWeight(codes.codes.contiguous(), scales, biases, 8, codes.group_size, cols)
    if cols % NIBBLE_RUN:
        raise ValueError(f"in_features: 4-bit storage needs a multiple of {NIBBLE_RUN}, got {cols}")
    if codes.codes.numel() and int(codes.codes.max()) > 15:
        raise ValueError(f"codes: values above 15 declared as {codes.bits}-bit")
    runs = codes.codes.unflatten(1, (-1, NIBBLE_RUN))
    half = NIBBLE_RUN // 2
    qweight = (runs[:, :, :half] | (runs[:, :, half:] << 4)).flatten(1).contiguous()
    return PackedWeight(qweight, scales, biases, 4, codes.group_size, cols)
