"""Little-endian bit fields packed into int32 words, the storage every GPTQ-family format shares.

A word ``w`` holds ``32 // bits`` fields; field ``i`` is ``(w >> (bits * i)) & (2**bits - 1)`` (low bits
first). ``unpack_int32(packed, bits, dim)`` expands ``dim`` so that element ``j * per_word + i`` is field
``i`` of word ``j``; the other dimension is unchanged. ``pack_int32`` is its inverse (the last word padded
with zero fields). Only widths dividing 32 (1, 2, 4, 8) pack without
straddling words, and those are the only ones accepted here.
"""

from __future__ import annotations

import sys

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



def pack_int32(fields: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """A 2-D tensor of unsigned ``bits``-wide fields (any integer dtype, values in ``[0, 2**bits)``) packed
    into int32 words along ``dim`` (0 or 1): ``ceil(size * bits / 32)`` words, the last padded with zero
    fields. ``unpack_int32(pack_int32(f, bits, dim), bits, dim)`` gives ``f`` back (plus the padding)."""
    per_word = fields_per_word(bits)
    if fields.dim() != 2 or fields.dtype.is_floating_point or fields.dtype in (torch.bool, torch.complex64):
        raise ValueError(f"expected a 2-D integer tensor of {bits}-bit fields, got {fields.dtype} "
                         f"{tuple(fields.shape)}")
    if dim not in (0, 1):
        raise ValueError(f"dim: must be 0 or 1, got {dim}")
    if fields.numel() and (int(fields.min()) < 0 or int(fields.max()) >= 1 << bits):
        raise ValueError(f"fields: values outside [0, {1 << bits})")
    if dim == 0:
        return pack_int32(fields.t(), bits, 1).t().contiguous()
    rows, cols = (int(n) for n in fields.shape)
    words = -(-cols // per_word)
    if bits in (4, 8) and sys.byteorder == "little":  # whole bytes: build them and read them as int32 words
        padded = torch.zeros(rows, words * per_word, dtype=torch.uint8, device=fields.device)
        padded[:, :cols] = fields
        octets = padded[:, 0::2] | (padded[:, 1::2] << 4) if bits == 4 else padded
        return octets.reshape(-1).view(torch.int32).reshape(rows, words)
    padded = torch.zeros(rows, words * per_word, dtype=torch.int64, device=fields.device)
    padded[:, :cols] = fields
    shifts = torch.arange(0, WORD_BITS, bits, dtype=torch.int64, device=fields.device)
    packed = (padded.unflatten(1, (words, per_word)) << shifts).sum(dim=2)  # in [0, 2**32)
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)
