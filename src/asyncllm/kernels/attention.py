"""Paged attention over block tables: decode (one new token per sequence) and varlen prefill/extend."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from asyncllm.kernels.kv_cache import KVCache
from asyncllm.kernels.metadata import AttentionMetadata

BlockReader = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``(block ids [n]) -> (keys, values)``, each ``[n, block_size, Hk, D]`` in the compute dtype."""


def plain_blocks(k_cache: torch.Tensor, v_cache: torch.Tensor) -> BlockReader:
    """The ``BlockReader`` of plain cache tensors ``[num_blocks, block_size, Hk, D]``."""

    def read(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = blocks.long()
        return k_cache.index_select(0, ids), v_cache.index_select(0, ids)

    return read


def gather_context(read: BlockReader, block_size: int, block_table: torch.Tensor,
                   length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's cached keys and values, contiguous ``[length, Hk, D]`` each."""
    num_blocks = -(-length // block_size)
    keys, values = read(block_table[:num_blocks])
    return keys.flatten(0, 1)[:length], values.flatten(0, 1)[:length]


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole cached context.

    ``q`` is ``[T, Hq, D]`` (rows laid out per ``meta``); caches are ``[num_blocks, block_size, Hk, D]``
    and already hold the new tokens. Query row ``j`` of a sequence with context ``L`` and ``n`` new tokens
    sits at position ``L - n + j`` and sees keys ``0 ..= L - n + j``. Heads are grouped: query head ``h``
    reads KV head ``h // (Hq // Hk)``. Softmax runs in float32. Returns ``[T, Hq, D]`` in ``q.dtype``.
    """
    return _attend(q, plain_blocks(k_cache, v_cache), k_cache.shape[1], meta, scale)


def paged_attention_cache_reference(q: torch.Tensor, cache: KVCache, meta: AttentionMetadata,
                                    scale: float) -> torch.Tensor:
    """``paged_attention_reference`` over a ``KVCache``, plain or quantized (each sequence's blocks read
    back through ``KVCache.read_blocks``)."""
    return _attend(q, cache.read_blocks, cache.block_size, meta, scale)


def _attend(q: torch.Tensor, read: BlockReader, block_size: int, meta: AttentionMetadata,
            scale: float) -> torch.Tensor:
    if meta.is_decode_only:
        return _decode_batched(q, read, block_size, meta, scale)
    out = torch.empty_like(q)
    starts = meta.query_start_loc.tolist() if q.device.type == "cpu" else None
    offset = 0
    for i, (n, length) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)):
        begin = starts[i] if starts is not None else offset
        offset = begin + n
        keys, values = gather_context(read, block_size, meta.block_tables[i], length)
        out[begin : begin + n] = _causal_attention(q[begin : begin + n], keys, values, scale)
    return out


def _causal_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """``q`` ``[n, Hq, D]`` are the last ``n`` positions of a context of ``keys``/``values`` ``[L, Hk, D]``."""
    n, length = q.shape[0], keys.shape[0]
    q_pos = torch.arange(length - n, length, device=q.device)[:, None]
    mask = torch.arange(length, device=q.device)[None, :] <= q_pos
    groups = q.shape[1] // keys.shape[1]
    qh = q.transpose(0, 1).float()
    kh = keys.transpose(0, 1).float().repeat_interleave(groups, dim=0)
    vh = values.transpose(0, 1).float().repeat_interleave(groups, dim=0)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out.transpose(0, 1).to(q.dtype)


def gather_padded_contexts(
    read: BlockReader, block_size: int, meta: AttentionMetadata
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every sequence's whole blocks up to the longest context: keys and values ``[B, Hk, P, D]`` (``P``
    the padded length) and ``valid`` ``[B, P]``, true where the slot holds one of the sequence's tokens."""
    batch = meta.block_tables.shape[0]
    num_blocks = -(-meta.max_seq_len // block_size)
    padded = num_blocks * block_size
    keys, values = read(meta.block_tables[:, :num_blocks].reshape(-1))
    num_kv_heads, head_dim = keys.shape[2:]
    keys = keys.view(batch, padded, num_kv_heads, head_dim).transpose(1, 2)
    values = values.view(batch, padded, num_kv_heads, head_dim).transpose(1, 2)
    valid = torch.arange(padded, device=keys.device)[None, :] < meta.seq_lens[:, None].to(keys.device)
    return keys, values, valid


def _decode_batched(
    q: torch.Tensor, read: BlockReader, block_size: int, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """One query per sequence: gather every context padded to the longest, mask the padding."""
    batch, num_heads, head_dim = q.shape
    keys, values, valid = gather_padded_contexts(read, block_size, meta)
    # padding slots may hold anything (even NaN); zero them so masked weights multiply finite values
    invalid = ~valid[:, None, :, None]
    keys = keys.masked_fill(invalid, 0).float()
    values = values.masked_fill(invalid, 0).float()
    # the query heads sharing a KV head are that head's query rows: GQA without repeating K/V
    queries = q.reshape(batch, keys.shape[1], -1, head_dim).float()
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=valid[:, None, None, :], scale=scale)
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)
