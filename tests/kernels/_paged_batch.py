"""Random paged-attention batches in shuffled cache blocks, shared by the attention kernel tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from asyncllm.kernels.metadata import AttentionMetadata

# Filler for cache rows no sequence owns: finite where the reference's padded gather reads them
# (block 0, the tail of a sequence's last block), NaN in blocks nobody owns.
FILLER = 50.0


@dataclass(frozen=True)
class PagedBatch:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    meta: AttentionMetadata
    scale: float


def build_batch(
    seqs: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
    dtype: torch.dtype, device: torch.device, seed: int,
) -> PagedBatch:
    """Sequences ``(context L, new tokens n)`` in shuffled cache blocks; block 0 is never allocated."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-length // block_size) for length, _ in seqs]
    num_blocks = sum(needed) + 3
    free = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    k_cache[0] = v_cache[0] = FILLER
    tables = torch.zeros(len(seqs), max(needed) + 1, dtype=torch.int32)
    queries, slots = [], []
    for i, (length, new) in enumerate(seqs):
        blocks = [free.pop() for _ in range(needed[i])]
        tables[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        k_cache[blocks] = v_cache[blocks] = FILLER
        keys = torch.randn(length, num_kv_heads, head_dim, generator=gen).to(dtype)
        values = torch.randn(length, num_kv_heads, head_dim, generator=gen).to(dtype)
        for t in range(length):
            k_cache[blocks[t // block_size], t % block_size] = keys[t]
            v_cache[blocks[t // block_size], t % block_size] = values[t]
        slots += [blocks[t // block_size] * block_size + t % block_size for t in range(length - new, length)]
        queries.append(torch.randn(new, num_heads, head_dim, generator=gen).to(dtype))
    query_lens = tuple(new for _, new in seqs)
    seq_lens = tuple(length for length, _ in seqs)
    starts = [0]
    for new in query_lens:
        starts.append(starts[-1] + new)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
    )
    return PagedBatch(torch.cat(queries).to(device), k_cache.to(device), v_cache.to(device), meta,
                      head_dim**-0.5)


