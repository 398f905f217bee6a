"""Paged attention over block tables: decode (one new token per sequence) and varlen prefill/extend."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from asyncllm.kernels.kv_cache import KVCache
from asyncllm.kernels.metadata import AttentionMetadata, AttentionOptions, plain_options

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
    options: AttentionOptions | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole cached context.

    ``q`` is ``[T, Hq, D]`` (rows laid out per ``meta``); caches are ``[num_blocks, block_size, Hk, D]``
    and already hold the new tokens. Query row ``j`` of a sequence with context ``L`` and ``n`` new tokens
    sits at position ``L - n + j`` and sees keys ``0 ..= L - n + j``. Heads are grouped: query head ``h``
    reads KV head ``h // (Hq // Hk)``. Softmax runs in float32. Returns ``[T, Hq, D]`` in ``q.dtype``.
    ``options`` (``AttentionOptions``) narrows what each query sees to a sliding window and soft-caps the
    scores; ``None`` is plain causal attention.
    """
    return _attend(q, plain_blocks(k_cache, v_cache), k_cache.shape[1], meta, scale, options)


def paged_attention_cache_reference(q: torch.Tensor, cache: KVCache, meta: AttentionMetadata,
                                    scale: float, options: AttentionOptions | None = None) -> torch.Tensor:
    """``paged_attention_reference`` over a ``KVCache``, plain or quantized (each sequence's blocks read
    back through ``KVCache.read_blocks``)."""
    return _attend(q, cache.read_blocks, cache.block_size, meta, scale, options)


def visible_keys(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int) -> torch.Tensor:
    """``[..., n, L]`` bool: key at ``key_pos`` ``[L]`` visible to the query at ``query_pos`` ``[..., n]``
    (causal, and within ``window`` keys when it is positive)."""
    q_pos, k_pos = query_pos[..., :, None], key_pos[None, :]
    visible = k_pos <= q_pos
    if window > 0:
        visible &= k_pos > q_pos - window
    return visible


def masked_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor,
                     scale: float, softcap: float | None) -> torch.Tensor:
    """``softmax(cap(q k^T * scale) masked by visible) v`` over ``[..., n, D]`` queries and ``[..., L, D]``
    keys and values (``cap``: ``softcap * tanh(s / softcap)``, or nothing); SDPA where nothing is capped."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, scale=scale)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), values)


def _attend(q: torch.Tensor, read: BlockReader, block_size: int, meta: AttentionMetadata,
            scale: float, options: AttentionOptions | None = None) -> torch.Tensor:
    options = None if plain_options(options) else options
    if meta.is_decode_only:
        return _decode_batched(q, read, block_size, meta, scale, options)
    out = torch.empty_like(q)
    starts = meta.query_start_loc.tolist() if q.device.type == "cpu" else None
    offset = 0
    for i, (n, length) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)):
        begin = starts[i] if starts is not None else offset
        offset = begin + n
        keys, values = gather_context(read, block_size, meta.block_tables[i], length)
        out[begin : begin + n] = _causal_attention(q[begin : begin + n], keys, values, scale, options)
    return out


def _causal_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                      options: AttentionOptions | None = None) -> torch.Tensor:
    """``q`` ``[n, Hq, D]`` are the last ``n`` positions of a context of ``keys``/``values`` ``[L, Hk, D]``."""
    n, length = q.shape[0], keys.shape[0]
    window = 0 if options is None else options.sliding_window
    mask = visible_keys(torch.arange(length - n, length, device=q.device), torch.arange(length, device=q.device),
                        window)
    groups = q.shape[1] // keys.shape[1]
    qh = q.transpose(0, 1).float()
    kh = keys.transpose(0, 1).float().repeat_interleave(groups, dim=0)
    vh = values.transpose(0, 1).float().repeat_interleave(groups, dim=0)
    out = masked_attention(qh, kh, vh, mask, scale, None if options is None else options.softcap)
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


def window_valid(valid: torch.Tensor, meta: AttentionMetadata, options: AttentionOptions | None) -> torch.Tensor:
    """``valid`` ``[B, P]`` of ``gather_padded_contexts`` further limited to each sequence's last
    ``options.window`` keys (a decode step's query sits at position ``seq_len - 1``)."""
    if options is None or not options.window:
        return valid
    first = (meta.seq_lens.to(valid.device) - options.window)[:, None]
    return valid & (torch.arange(valid.shape[1], device=valid.device)[None, :] >= first)


def _decode_batched(
    q: torch.Tensor, read: BlockReader, block_size: int, meta: AttentionMetadata, scale: float,
    options: AttentionOptions | None = None,
) -> torch.Tensor:
    """One query per sequence: gather every context padded to the longest, mask the padding."""
    batch, num_heads, head_dim = q.shape
    keys, values, valid = gather_padded_contexts(read, block_size, meta)
    valid = window_valid(valid, meta, options)
    # padding slots may hold anything (even NaN); zero them so masked weights multiply finite values
    invalid = ~valid[:, None, :, None]
    keys = keys.masked_fill(invalid, 0).float()
    values = values.masked_fill(invalid, 0).float()
    # the query heads sharing a KV head are that head's query rows: GQA without repeating K/V
    queries = q.reshape(batch, keys.shape[1], -1, head_dim).float()
    out = masked_attention(queries, keys, values, valid[:, None, None, :], scale,
                           None if options is None else options.softcap)
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)
