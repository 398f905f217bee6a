"""Paged-KV bookkeeping for model tests, independent of the engine: block tables, slots, metadata.

Blocks are handed out from a seeded, shuffled free list, so a sequence's blocks are non-contiguous
and out of order (unless a test asks for consecutive ones). Caches start filled with large random
values, so a read of a slot that was never written shows up as a wrong result rather than as a
plausible zero.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from asyncllm.kernels import AttentionMetadata, KVCache
from asyncllm.kernels.kv_quant import KVBits, code_width, key_scheme


@dataclass
class PagedSequence:
    """One sequence's block table and how many of its tokens are already in the cache."""

    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0


class BlockPool:
    """Hands out block ids in a seeded random order (or, with ``consecutive``, as 0, 1, 2, ...);
    ``reserve`` grows a table to cover ``length`` tokens."""

    def __init__(self, num_blocks: int, block_size: int, seed: int = 0, *, consecutive: bool = False) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks))
        if consecutive:
            self._free.reverse()  # popped from the end
        else:
            random.Random(seed).shuffle(self._free)

    def reserve(self, seq: PagedSequence, length: int) -> None:
        while len(seq.block_table) * self.block_size < length:
            if not self._free:
                raise ValueError(f"num_blocks: pool of {self.num_blocks} blocks exhausted")
            seq.block_table.append(self._free.pop())


def make_kv_caches(
    num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, *, seed: int = 0,
    bits: int | tuple[int, int] | None = None,
) -> list[KVCache]:
    """Per-layer caches, keys and values each ``[num_blocks, block_size, Hk, D]`` float32 of garbage; with
    ``bits`` (8 / 4 for both, or ``(key_bits, value_bits)``), quantized caches of random codes and float32
    ``(scale, zero)`` pairs (4-bit keys: grouped pairs and random block anchors, ``kv_quant.key_scheme``)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    if bits is None:
        return [
            KVCache(torch.randn(shape, generator=gen) * 100, torch.randn(shape, generator=gen) * 100)
            for _ in range(num_layers)
        ]
    widths = KVBits.of(bits)
    key_codes = (*shape[:3], code_width(head_dim, widths.key))
    value_codes = (*shape[:3], code_width(head_dim, widths.value))
    pairs = (*shape[:3], 2)
    scheme = key_scheme(head_dim, widths.key)
    key_pairs = (*shape[:3], scheme.groups(head_dim), 2) if scheme.anchored else pairs

    def anchors() -> torch.Tensor | None:
        return torch.randn(num_blocks, num_kv_heads, head_dim, generator=gen) * 10 if scheme.anchored else None

    return [
        KVCache(torch.randint(0, 256, key_codes, generator=gen, dtype=torch.uint8),
                torch.randint(0, 256, value_codes, generator=gen, dtype=torch.uint8),
                torch.randn(key_pairs, generator=gen) * 10, torch.randn(pairs, generator=gen) * 10,
                key_bits=widths.key, value_bits=widths.value, key_anchors=anchors())
        for _ in range(num_layers)
    ]


def build_step(
    pool: BlockPool, batch: Sequence[tuple[PagedSequence, int]]
) -> tuple[torch.Tensor, AttentionMetadata]:
    """Positions ``[T]`` and metadata for one step in which each ``(seq, n)`` adds ``n`` new tokens.

    Reserves the blocks the new tokens need and advances ``seq.num_cached`` by ``n``.
    """
    block_size = pool.block_size
    positions: list[int] = []
    slots: list[int] = []
    query_lens: list[int] = []
    seq_lens: list[int] = []
    for seq, n in batch:
        start, end = seq.num_cached, seq.num_cached + n
        pool.reserve(seq, end)
        for pos in range(start, end):
            positions.append(pos)
            slots.append(seq.block_table[pos // block_size] * block_size + pos % block_size)
        query_lens.append(n)
        seq_lens.append(end)
        seq.num_cached = end
    width = max(len(seq.block_table) for seq, _ in batch)
    tables = torch.zeros(len(batch), width, dtype=torch.int32)
    for i, (seq, _) in enumerate(batch):
        tables[i, : len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.int32)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=tables,
        query_lens_cpu=tuple(query_lens),
        seq_lens_cpu=tuple(seq_lens),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
    )
    return torch.tensor(positions, dtype=torch.int64), meta
