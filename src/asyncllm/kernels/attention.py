"""Paged attention over block tables: decode (one new token per sequence) and varlen prefill/extend."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from asyncllm.kernels.metadata import AttentionMetadata


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Contiguous ``[length, Hk, D]`` view of one sequence's cached keys or values."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    blocks = cache.index_select(0, block_table[:num_blocks].long())
    return blocks.reshape(num_blocks * block_size, *cache.shape[2:])[:length]


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
    if meta.is_decode_only:
        return _decode_batched(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    starts = meta.query_start_loc.tolist() if q.device.type == "cpu" else None
    offset = 0
    for i, (n, length) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)):
        begin = starts[i] if starts is not None else offset
        offset = begin + n
        table = meta.block_tables[i]
        keys = _gather_context(k_cache, table, length)
        values = _gather_context(v_cache, table, length)
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
    k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every sequence's whole blocks up to the longest context: keys and values ``[B, Hk, P, D]`` (``P``
    the padded length) and ``valid`` ``[B, P]``, true where the slot holds one of the sequence's tokens."""
    batch = meta.block_tables.shape[0]
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    num_blocks = -(-meta.max_seq_len // block_size)
    padded = num_blocks * block_size
    flat = meta.block_tables[:, :num_blocks].reshape(-1).long()
    keys = k_cache.index_select(0, flat).view(batch, padded, num_kv_heads, head_dim).transpose(1, 2)
    values = v_cache.index_select(0, flat).view(batch, padded, num_kv_heads, head_dim).transpose(1, 2)
    valid = torch.arange(padded, device=k_cache.device)[None, :] < meta.seq_lens[:, None].to(k_cache.device)
    return keys, values, valid


def _decode_batched(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """One query per sequence: gather every context padded to the longest, mask the padding."""
    batch, num_heads, head_dim = q.shape
    keys, values, valid = gather_padded_contexts(k_cache, v_cache, meta)
    # padding slots may hold anything (even NaN); zero them so masked weights multiply finite values
    invalid = ~valid[:, None, :, None]
    keys = keys.masked_fill(invalid, 0).float()
    values = values.masked_fill(invalid, 0).float()
    # the query heads sharing a KV head are that head's query rows: GQA without repeating K/V
    queries = q.reshape(batch, keys.shape[1], -1, head_dim).float()
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=valid[:, None, None, :], scale=scale)
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)
