"""Whole sequences through a model outside the engine: perplexity evaluation and quantization calibration.

``OfflineBatch.of(lengths)`` lays out ``B`` fresh sequences (no cached prefix) as one flat prefill step,
the way the runner lays out a step: sequence ``i`` holds rows ``starts[i]:starts[i+1]`` of the ``[T]``
batch at positions ``0..lengths[i]-1``, and its keys and values go to its own consecutive run of blocks
of a scratch cache (``scratch_caches``) that holds exactly this batch. Every attention path (the torch
reference, the CPU and Triton bundles) reads such a step as it reads an engine prefill, so a pass built on
it computes what the engine computes for the same tokens.

Invariants: every length is positive; ``meta.slot_mapping`` covers ``T`` distinct slots below
``num_blocks * block_size``; the batch's tensors live on ``device``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from asyncllm.config import ModelConfig
from asyncllm.kernels import AttentionMetadata, KVCache


@dataclass(frozen=True)
class OfflineBatch:
    """One prefill step over fresh sequences of ``lengths`` tokens (see the module docstring)."""

    lengths: tuple[int, ...]
    positions: torch.Tensor
    meta: AttentionMetadata
    block_size: int
    num_blocks: int

    @classmethod
    def of(cls, lengths: Sequence[int], *, block_size: int = 16, device: torch.device | str = "cpu") -> OfflineBatch:
        """The layout for sequences of ``lengths`` tokens (each positive), blocks of ``block_size`` tokens."""
        lengths = tuple(int(n) for n in lengths)
        if not lengths or min(lengths) <= 0:
            raise ValueError(f"lengths: expected one or more positive lengths, got {lengths}")
        if block_size <= 0:
            raise ValueError(f"block_size: must be positive, got {block_size}")
        device = torch.device(device)
        blocks_per_seq = [-(-n // block_size) for n in lengths]
        width = max(blocks_per_seq)
        tables = torch.zeros(len(lengths), width, dtype=torch.int32)
        positions: list[torch.Tensor] = []
        slots: list[torch.Tensor] = []
        first_block = 0
        for i, (n, blocks) in enumerate(zip(lengths, blocks_per_seq, strict=True)):
            tables[i, :blocks] = torch.arange(first_block, first_block + blocks, dtype=torch.int32)
            pos = torch.arange(n, dtype=torch.int64)
            positions.append(pos)
            slots.append(first_block * block_size + pos)
            first_block += blocks
        starts = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        starts[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slots).to(device),
            query_start_loc=starts.to(device),
            seq_lens=torch.tensor(lengths, dtype=torch.int32, device=device),
            block_tables=tables.to(device),
            query_lens_cpu=lengths,
            seq_lens_cpu=lengths,
            max_query_len=max(lengths),
            max_seq_len=max(lengths),
        )
        return cls(lengths, torch.cat(positions).to(device), meta, block_size, first_block)

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def starts(self) -> tuple[int, ...]:
        """Row offsets: sequence ``i`` holds rows ``starts[i]:starts[i + 1]``."""
        offsets = [0]
        for n in self.lengths:
            offsets.append(offsets[-1] + n)
        return tuple(offsets)

    def scratch_caches(self, config: ModelConfig, num_layers: int, *, dtype: torch.dtype,
                       device: torch.device | str, bits: int | tuple[int, int] | None = None) -> list[KVCache]:
        """``num_layers`` zeroed caches holding exactly this batch (one per layer run in the same pass; a
        layer-at-a-time pass may reuse one); ``bits`` 8 / 4, or a ``(key_bits, value_bits)`` pair, makes them
        quantized caches."""
        return [
            KVCache.allocate(self.num_blocks, self.block_size, config.num_key_value_heads, config.head_dim,
                             dtype=dtype, device=torch.device(device), bits=bits)
            for _ in range(num_layers)
        ]
