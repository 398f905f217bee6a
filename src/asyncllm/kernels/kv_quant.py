"""The quantized KV cache's scheme, in torch: the specification every kernel's write and read follow.

Online, no calibration: each token's keys (and values) are quantized per KV head over its ``head_dim``
values, asymmetrically: ``zero`` is the row's minimum, ``scale = (max - min) / (2**bits - 1)``, and a
value ``x`` is stored as ``code = clamp(floor((x - zero) / scale + 0.5), 0, 2**bits - 1)`` (``0`` when
``scale`` is 0); it reads back as ``code * scale + zero``. ``scale`` and ``zero`` are rounded to the
scales' dtype (the compute dtype) first and the codes computed from the rounded pair, so a value in the
row's range reads back within ``scale / 2`` (plus the pair's own rounding where the scales' dtype is
narrower than float32).

Storage: int8 keeps one ``uint8`` code per value (``[..., head_dim]``); int4 packs two per byte, dimension
``i`` in the low nibble and ``i + head_dim / 2`` in the high one (``[..., head_dim // 2]``: both halves of a
row unpack with contiguous loads, which vectorise). The ``(scale, zero)``
pairs sit beside the codes as ``[..., 2]`` in the scales' dtype.

Keys and values each have their own width (``KVBits``): int8 / int4 caches use one width for both, and
``k8v4`` keeps keys in int8 and values in int4 (attention scores are more sensitive to key error than the
output is to value error).

4-bit keys are **anchored and grouped** (``key_scheme``): a key row of ``head_dim`` values spans a few
channels with large, steady offsets, which a single per-row range at 16 levels cannot resolve. So each
cache block keeps its first token's keys (the block's *anchor*, per KV head, in the compute dtype, written
when that token is), every token stores the residual ``key - anchor`` of its block, and the residual is
quantized per token in groups of ``KEY_GROUP`` consecutive dimensions (``gcd(KEY_GROUP, head_dim)``), each
group with its own ``(scale, zero)`` pair; it reads back as ``code * scale + zero + anchor``. The anchor
token's residual is 0, so it reads back exactly. Everything stays online and per block: no calibration, no
state beyond the block (prefix caching, sessions and recompute see a block whose contents depend on its
own tokens only). 8-bit keys and all values keep one pair per row (``group_size == head_dim``, no anchor).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

KV_CACHE_BITS = (8, 4)
KEY_GROUP = 16
"""Dimensions per ``(scale, zero)`` pair of an anchored 4-bit key row (fewer where ``head_dim`` is not a
multiple: ``gcd(KEY_GROUP, head_dim)``)."""


def check_bits(bits: int, name: str = "bits") -> None:
    if bits not in KV_CACHE_BITS:
        raise ValueError(f"{name}: a quantized KV cache has 8 or 4 bits, got {bits!r}")


class KVBits(NamedTuple):
    """The widths of a quantized cache's key codes and value codes (each 8 or 4)."""

    key: int
    value: int

    @classmethod
    def of(cls, bits: int | tuple[int, int]) -> KVBits:
        """``bits`` for both keys and values, or a ``(key_bits, value_bits)`` pair; checked."""
        pair = cls(bits, bits) if isinstance(bits, int) else cls(*bits)
        check_bits(pair.key, "key_bits")
        check_bits(pair.value, "value_bits")
        return pair

    @property
    def name(self) -> str:
        """``"int8"`` / ``"int4"`` when keys and values share a width, else ``"k8v4"`` style."""
        return f"int{self.key}" if self.key == self.value else f"k{self.key}v{self.value}"


class KeyScheme(NamedTuple):
    """How a cache's key rows are quantized: ``group_size`` dimensions per ``(scale, zero)`` pair
    (``head_dim``: one pair per row) and whether each block's first token is the ``anchored`` origin of its
    block's residuals (see the module docstring)."""

    group_size: int
    anchored: bool

    @property
    def pair_group(self) -> int | None:
        """``quantize_kv``'s ``group_size`` for these keys: ``None`` (one ``[..., 2]`` pair per row) unless
        anchored (``[..., groups, 2]``)."""
        return self.group_size if self.anchored else None

    def groups(self, head_dim: int) -> int:
        """``(scale, zero)`` pairs per key row."""
        return head_dim // self.group_size


def key_scheme(head_dim: int, key_bits: int) -> KeyScheme:
    """The scheme of ``key_bits`` keys of ``head_dim`` dimensions: 4-bit keys anchored, in groups of
    ``gcd(KEY_GROUP, head_dim)``; 8-bit keys one pair per row, no anchor."""
    check_bits(key_bits, "key_bits")
    if key_bits == 4:
        return KeyScheme(math.gcd(KEY_GROUP, head_dim), True)
    return KeyScheme(head_dim, False)


def code_width(head_dim: int, bits: int) -> int:
    """Bytes of one head's row of codes."""
    check_bits(bits)
    if bits == 4 and head_dim % 2:
        raise ValueError(f"head_dim: int4 packs two values per byte, so it must be even, got {head_dim}")
    return head_dim if bits == 8 else head_dim // 2


def quantize_kv(x: torch.Tensor, bits: int, scale_dtype: torch.dtype,
                group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` ``[..., head_dim]`` row by row: returns ``(codes uint8 [..., code_width], scales)``
    (see the module docstring). ``group_size`` ``None`` (or ``head_dim``): one pair per row, scales
    ``[..., 2]``; else a pair per ``group_size`` consecutive dimensions, scales ``[..., head_dim //
    group_size, 2]`` (``[..., 1, 2]`` where ``group_size == head_dim``)."""
    check_bits(bits)
    head_dim = x.shape[-1]
    grouped = group_size is not None
    if grouped and (group_size is None or group_size <= 0 or head_dim % group_size):
        raise ValueError(f"group_size: must divide head_dim={head_dim}, got {group_size}")
    qmax = float(2**bits - 1)
    rows = x.float()
    if grouped:
        rows = rows.unflatten(-1, (head_dim // int(group_size or head_dim), -1))
    low = rows.amin(-1, keepdim=True)
    high = rows.amax(-1, keepdim=True)
    scale = ((high - low) / qmax).to(scale_dtype).float()
    zero = low.to(scale_dtype).float()
    positive = scale > 0
    codes = torch.where(positive, torch.floor((rows - zero) / torch.where(positive, scale, 1.0) + 0.5), 0.0)
    codes = codes.clamp_(0.0, qmax).to(torch.uint8)
    if grouped:
        codes = codes.flatten(-2)
    if bits == 4:
        half = codes.shape[-1] // 2
        codes = codes[..., :half] | (codes[..., half:] << 4)
    return codes, torch.cat((scale, zero), dim=-1).to(scale_dtype)


def unpack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes as one ``uint8`` per value: ``[..., head_dim]``."""
    check_bits(bits)
    if bits == 8:
        return codes
    return torch.cat((codes & 15, codes >> 4), dim=-1)


def dequantize_kv(codes: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """``code * scale + zero`` computed in float32, returned in ``dtype``: ``[..., head_dim]``. ``scales``
    ``[..., 2]`` (a pair per row) or ``[..., groups, 2]`` (a pair per ``head_dim // groups`` dimensions)."""
    values = unpack_codes(codes, bits).float()
    pairs = scales.float()
    if pairs.dim() == values.dim() + 1:
        grouped = values.unflatten(-1, (pairs.shape[-2], -1))
        return (grouped * pairs[..., 0:1] + pairs[..., 1:2]).flatten(-2).to(dtype)
    return (values * pairs[..., 0:1] + pairs[..., 1:2]).to(dtype)


def quantization_error_bound(x: torch.Tensor, bits: int, scale_dtype: torch.dtype,
                             group_size: int | None = None) -> torch.Tensor:
    """An upper bound of ``|dequantize(quantize(x)) - x|`` for each row of ``x`` (``[..., 1]``; with
    ``group_size``, for each value: ``[..., head_dim]``): half a step, plus, where ``scale_dtype`` is
    narrower than float32, what rounding the ``(scale, zero)`` pair can add (the grid's ends may move by one
    rounding of the zero and ``2**bits - 1`` roundings of the scale, in relative terms, or by the dtype's
    subnormal spacing for ranges too small for its normal numbers)."""
    rows = x.float()
    head_dim = rows.shape[-1]
    grouped = group_size is not None
    if grouped:
        rows = rows.unflatten(-1, (head_dim // int(group_size or head_dim), -1))
    low = rows.amin(-1, keepdim=True)
    high = rows.amax(-1, keepdim=True)
    qmax = float(2**bits - 1)
    step = (high - low) / qmax
    info = torch.finfo(scale_dtype)
    eps = info.eps if scale_dtype != torch.float32 else 0.0
    # relative rounding of the pair, and the absolute spacing of subnormals (a tiny scale in float16)
    slack = eps * (low.abs() + qmax * step) + (qmax + 1) * info.tiny * info.eps
    bound = 0.5 * step * (1 + eps) + slack + 1e-6 * rows.abs().amax(-1, keepdim=True)
    return bound.expand_as(rows).flatten(-2) if grouped else bound
