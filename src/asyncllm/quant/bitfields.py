"""Little-endian bit fields packed into int32 words, the storage every GPTQ-family format shares.

A word ``w`` holds ``32 // bits`` fields; field ``i`` is ``(w >> (bits * i)) & (2**bits - 1)`` (low bits
first). ``unpack_int32(packed, bits, dim)`` expands ``dim`` so that element ``j * per_word + i`` is field
``i`` of word ``j``; the other dimension is unchanged. Only widths dividing 32 (1, 2, 4, 8) pack without
straddling words, and those are the only ones accepted here.
"""

from __future__ import annotations

import torch

WORD_BITS = 32


def fields_per_word(bits: int) -> int:
    """How many ``bits``-wide fields one int32 holds; raises ``ValueError`` unless ``bits`` divides 32."""
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"bits: int32 field packing needs a width dividing 32 (1, 2, 4, 8), got {bits}")
    return WORD_BITS // bits


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The uint8 fields of a 2-D int32 tensor, expanded along ``dim`` (0 or 1) by ``32 // bits``."""
    fields_per_word(bits)  # validates the width
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"expected a 2-D int32 tensor of packed {bits}-bit fields, got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    if dim not in (0, 1):
        raise ValueError(f"dim: must be 0 or 1, got {dim}")
    shifts = torch.arange(0, WORD_BITS, bits, dtype=torch.int32, device=packed.device)
    mask = (1 << bits) - 1
    if dim == 1:
        fields = (packed.unsqueeze(2) >> shifts) & mask  # [R, W, per_word]
        return fields.flatten(1).to(torch.uint8)
    fields = (packed.unsqueeze(1) >> shifts.unsqueeze(1)) & mask  # [W, per_word, C]
    return fields.flatten(0, 1).to(torch.uint8)

