"""Float64 references shared by the KV-cache kernel tests: a batch's cache quantized by the scheme, what its
codes stand for, and attention over a cache sequence by sequence (with a sliding window and soft-capping)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from asyncllm.kernels import AttentionOptions
from asyncllm.kernels.cpu import paged_attention_cache_cpu
from asyncllm.kernels.kv_cache import KVCache
from asyncllm.kernels.kv_quant import KVBits, key_scheme, quantize_kv

from ._paged_batch import PagedBatch


def quantized_batch(batch: PagedBatch, bits: int | tuple[int, int]) -> KVCache:
    """The batch's cache quantized by the scheme (scales in the batch's dtype): ``bits`` for keys and
    values, or a ``(key_bits, value_bits)`` pair; 4-bit keys anchored on each block's first slot and grouped
    (``kv_quant.key_scheme``)."""
    widths = KVBits.of(bits)
    scheme = key_scheme(batch.k_cache.shape[-1], widths.key)
    keys, anchors = batch.k_cache, None
    if scheme.anchored:
        anchors = batch.k_cache[:, 0].to(batch.q.dtype).clone()
        keys = batch.k_cache.float() - anchors[:, None].float()
    k_codes, k_scales = quantize_kv(keys, widths.key, batch.q.dtype, scheme.pair_group)
    v_codes, v_scales = quantize_kv(batch.v_cache, widths.value, batch.q.dtype)
    return KVCache(k_codes, v_codes, k_scales, v_scales, key_bits=widths.key, value_bits=widths.value,
                   key_anchors=anchors)


def _values(codes: torch.Tensor, scales: torch.Tensor, bits: int,
            anchors: torch.Tensor | None = None) -> torch.Tensor:
    """float64 ``code * scale + zero`` (``+ anchor`` of the code's block where ``anchors`` ``[blocks, Hk, D]``
    is given, codes ``[blocks, block_size, Hk, width]``), the codes unpacked here (int4: the low nibbles are
    the first half); ``scales`` ``[..., 2]`` one pair per row or ``[..., groups, 2]`` one per group."""
    if bits == 4:
        codes = torch.cat((codes & 15, codes >> 4), dim=-1)
    pairs = scales.double()
    values = codes.double()
    if pairs.dim() == values.dim() + 1:  # groups of consecutive dimensions
        groups = pairs.shape[-2]
        per_dim = pairs.repeat_interleave(values.shape[-1] // groups, dim=-2)
        out = values * per_dim[..., 0] + per_dim[..., 1]
    else:
        out = values * pairs[..., :1] + pairs[..., 1:]
    if anchors is not None:
        out = out + anchors.double()[:, None]
    return out


def expected_attention(batch: PagedBatch, cache: KVCache, options: AttentionOptions | None = None) -> torch.Tensor:
    """float64 attention sequence by sequence over what ``cache`` stores: query at position ``p`` sees keys
    ``p - window < k <= p``, scores ``cap * tanh(s / cap)`` (``options`` ``None``: plain causal attention)."""
    options = options or AttentionOptions()
    bits = cache.bits
    if bits is None:
        keys_all, values_all = cache.key.double().flatten(0, 1), cache.value.double().flatten(0, 1)
    else:
        assert cache.key_scales is not None and cache.value_scales is not None
        keys_all = _values(cache.key, cache.key_scales, bits.key, cache.key_anchors).flatten(0, 1)
        values_all = _values(cache.value, cache.value_scales, bits.value).flatten(0, 1)
    meta, block_size = batch.meta, cache.block_size
    groups = batch.q.shape[1] // cache.num_kv_heads
    out, begin = [], 0
    for i, (n, length) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)):
        token = torch.arange(length)
        slots = meta.block_tables[i].cpu()[token // block_size].long() * block_size + token % block_size
        keys = keys_all[slots].repeat_interleave(groups, dim=1)
        values = values_all[slots].repeat_interleave(groups, dim=1)
        q = batch.q[begin : begin + n].cpu().double()
        scores = torch.einsum("nhd,lhd->hnl", q, keys) * batch.scale
        if options.softcap is not None:
            scores = torch.tanh(scores / options.softcap) * options.softcap
        positions = (length - n + torch.arange(n))[:, None]
        visible = token[None, :] <= positions
        if options.window:
            visible &= token[None, :] > positions - options.window
        scores = scores.masked_fill(~visible[None], float("-inf"))
        out.append(torch.einsum("hnl,lhd->nhd", scores.softmax(-1), values))
        begin += n
    return torch.cat(out)


def check_native_decode(kernel: Any, batch: PagedBatch, cache: KVCache, options: AttentionOptions | None,
                        threads: int, tol: float) -> None:
    """A native decode plan over ``cache`` (run directly, and through the CPU bundle's entry point with the
    plan attached) against ``expected_attention`` within ``tol``."""
    meta = batch.meta
    shape = (cache.num_blocks, cache.block_size, cache.num_kv_heads, cache.head_dim)
    plan = kernel.plan(meta.block_tables, meta.seq_lens, shape, num_heads=batch.q.shape[1], threads=threads,
                       bits=cache.bits)
    expected = expected_attention(batch, cache, options)
    for got in (plan.run(batch.q, cache, batch.scale, options).view(batch.q.shape),
                paged_attention_cache_cpu(batch.q, cache, dataclasses.replace(meta, plan=plan), batch.scale, options)):
        torch.testing.assert_close(got.double().cpu(), expected, atol=tol, rtol=tol)
