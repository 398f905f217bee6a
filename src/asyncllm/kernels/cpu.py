"""CPU fast paths: the reference ops rewritten as fewer, fused torch calls, plus the native C kernels.

Each function has its ``*_reference`` counterpart's signature and meaning (tests compare them). They
assume what the runner guarantees: every KV slot holds a finite value (the pool starts zeroed and the
model writes finite values), so masked padding can be multiplied by zero instead of being cleared.

``cpu_ops(native=..., native_layer_max_rows=...)`` makes the bundle: float32 dense weights with at least as
many outputs as inputs are stored K-major (``prepare_weight``), which the small-batch split GEMV of
``linear_cpu`` wants; with ``native`` on, packed (weight-only quantized) linears run in C
(``native_quant``, else through the reference: dequantize, then ``F.linear``) and decode attention reads
the paged cache in C through a per-step plan (``plan_attention``); and decode steps run their fusable
layers as one flat pass each (``fused_decode``, ``kernels.cpu_fused``): one C call per layer for steps of
a few rows, a short sequence of torch calls otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from asyncllm.kernels.attention import (
    BlockReader,
    gather_context,
    gather_padded_contexts,
    masked_attention,
    visible_keys,
    window_valid,
)
from asyncllm.kernels.bundle import KernelOps, no_attention_plan, on_cache
from asyncllm.kernels.cpu_fused import CpuFusedDecode
from asyncllm.kernels.cpu_native import NativeKernels
from asyncllm.kernels.kv_cache import KVCache
from asyncllm.kernels.kv_write import write_kv_cache_reference
from asyncllm.kernels.metadata import AttentionMetadata, AttentionOptions, plain_options
from asyncllm.kernels.moe import moe_cpu
from asyncllm.kernels.native_attention import DecodeAttentionPlan
from asyncllm.kernels.native_quant import cpu_quant_linear
from asyncllm.kernels.quant_linear import quant_linear_reference
from asyncllm.kernels.rotary import rotate_half_tables

# Rows up to which a linear takes the split GEMV (measured on x86 with 2 threads: at 1-2 rows it streams the
# weights 15-35% faster than oneDNN's GEMV; from 4 rows on oneDNN's GEMM is as fast or faster).
SPLIT_GEMV_MAX_ROWS = 2


def _onednn_linear_available() -> bool:
    try:
        probe = torch.ones(1, 2)
        torch.ops.mkldnn._linear_pointwise(probe, torch.ones(3, 2), None, "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    return True


_ONEDNN_LINEAR = _onednn_linear_available()


def linear_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` for CPU decoding: the split GEMV at one or two rows, else oneDNN's fused linear (about
    1.7x faster than the default BLAS path for the small-batch fp32 shapes of decoding on x86); falls
    back to ``F.linear`` where neither serves."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or x.dim() != 2:
        return F.linear(x, weight, bias)
    if x.shape[0] <= SPLIT_GEMV_MAX_ROWS:
        out = split_gemv(x, weight, torch.get_num_threads())
        if out is not None:
            return out if bias is None else out.add_(bias)
    if not _ONEDNN_LINEAR:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


def split_gemv(x: torch.Tensor, weight: torch.Tensor, splits: int) -> torch.Tensor | None:
    """``x @ weight.T`` as ``splits`` independent slices, one ``bmm`` batch entry per thread; ``None`` when
    the split does not apply (one split, or a size it does not divide).

    oneDNN and MKL stream a small ``[N, K]`` matrix well below memory bandwidth when ``x`` has one or two
    rows. A K-major weight (stored ``[K, N]``, ``stride() == (1, N)``) splits along ``K`` and the partial
    products are summed; a row-major one splits along ``N`` and the slices are concatenated.
    """
    n, k = weight.shape
    rows = x.shape[0]
    k_major = weight.stride() == (1, n)
    if splits <= 1 or (k % splits if k_major else n % splits) or not (k_major or weight.is_contiguous()):
        return None
    if k_major:  # [s, rows, K/s] x [s, K/s, N] -> partial sums over K slices
        return torch.bmm(x.reshape(rows, splits, k // splits).transpose(0, 1),
                         weight.t().view(splits, k // splits, n)).sum(0)
    # [s, rows, K] x [s, K, N/s] -> N slices side by side
    out = torch.bmm(x.expand(splits, rows, k), weight.view(splits, n // splits, k).transpose(1, 2))
    return out.transpose(0, 1).reshape(rows, n)


def k_major_layout(weight: torch.Tensor) -> torch.Tensor:
    """The CPU bundle's ``prepare_weight``: a float32 ``[N, K]`` weight with ``N >= K`` (fused QKV, output,
    fused gate/up, LM head, embedding) copied into K-major storage (a transposed view of a contiguous
    ``[K, N]`` tensor), which its split GEMV divides along ``K``; others (the down projection, whose
    ``N``-split GEMV measured faster row-major) keep their layout. oneDNN's GEMM takes the strided weights at
    about the same speed for batched rows, and an embedding lookup reads ``hidden_size`` strided floats."""
    if weight.dtype != torch.float32 or weight.dim() != 2 or weight.device.type != "cpu":
        return weight
    n, k = weight.shape
    if n < k or weight.stride() == (1, n):
        return weight
    return weight.t().contiguous().t()


def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype != torch.float32:
        return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def add_rms_norm_cpu(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    summed = torch.add(x, residual)
    return rms_norm_cpu(summed, weight, eps), summed


def silu_and_mul_cpu(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]).mul_(x[..., half:])


def rotary_cpu(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x * [cos, cos] + [x2, x1] * [-sin, sin]`` over the rotated dims, one pass per tensor."""
    cos_full, sin_signed = (t.unsqueeze(1) for t in rotate_half_tables(cos_sin_cache, positions, q.dtype))
    half = cos_full.shape[-1] // 2

    def rotate(x: torch.Tensor) -> torch.Tensor:
        rot = x[..., : 2 * half]
        swapped = torch.cat((rot[..., half:], rot[..., :half]), dim=-1)
        out = torch.addcmul(rot * cos_full, swapped, sin_signed)
        if 2 * half == x.shape[-1]:
            return out
        return torch.cat((out, x[..., 2 * half :]), dim=-1)

    return rotate(q), rotate(k)


def write_kv_cpu(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache.view(num_slots, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(num_slots, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention_cpu(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
    options: AttentionOptions | None = None,
) -> torch.Tensor:
    """``paged_attention_cache_cpu`` over plain cache tensors."""
    return paged_attention_cache_cpu(q, KVCache(k_cache, v_cache), meta, scale, options)


def paged_attention_cache_cpu(q: torch.Tensor, cache: KVCache, meta: AttentionMetadata, scale: float,
                              options: AttentionOptions | None = None) -> torch.Tensor:
    """With a native plan on ``meta`` (decode steps of float32 queries), the C kernel reads the cache in place,
    codes and all; otherwise batched torch ops over the gathered blocks (a quantized cache's dequantized).
    ``options``: a sliding window and soft-capping (``AttentionOptions``), honoured by both."""
    options = None if plain_options(options) else options
    if isinstance(meta.plan, DecodeAttentionPlan) and q.dtype == torch.float32:
        return meta.plan.run(q, cache, scale, options).view(q.shape)
    return _attend(q, cache.read_blocks, cache.block_size, meta, scale, options)


def _attend(q: torch.Tensor, read: BlockReader, block_size: int, meta: AttentionMetadata,
            scale: float, options: AttentionOptions | None = None) -> torch.Tensor:
    if meta.is_decode_only:
        return _decode(q, read, block_size, meta, scale, options)
    out = torch.empty_like(q)
    tables = meta.block_tables
    begin = 0
    for i, (n, length) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)):
        keys, values = (t.transpose(0, 1) for t in gather_context(read, block_size, tables[i], length))
        # 4-D [1, H, L, D]: torch's CPU flash kernel takes it (3-D inputs fall back to the math path, measured
        # 13x slower on a 256-token GQA prefill)
        queries = q[begin : begin + n].transpose(0, 1).unsqueeze(0)
        keys, values = keys.unsqueeze(0), values.unsqueeze(0)
        if options is not None:
            mask = visible_keys(torch.arange(length - n, length), torch.arange(length), options.sliding_window)
            groups = queries.shape[1] // keys.shape[1]
            res = masked_attention(queries, keys.repeat_interleave(groups, dim=1),
                                   values.repeat_interleave(groups, dim=1), mask, scale, options.softcap)
        elif n == length:
            res = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scale, enable_gqa=True)
        else:
            mask = torch.ones(n, length, dtype=torch.bool).tril_(length - n)
            res = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
        out[begin : begin + n] = res[0].transpose(0, 1)
        begin += n
    return out


def _decode(q: torch.Tensor, read: BlockReader, block_size: int, meta: AttentionMetadata, scale: float,
            options: AttentionOptions | None = None) -> torch.Tensor:
    """Batched decode: one gather of whole blocks per sequence; padding is masked (weight exactly 0), and
    every slot is finite (the runner's guarantee), so it needs no clearing."""
    batch, num_heads, head_dim = q.shape
    keys, values, valid = gather_padded_contexts(read, block_size, meta)
    queries = q.view(batch, keys.shape[1], -1, head_dim)
    if options is not None:
        valid = window_valid(valid, meta, options)
        out = masked_attention(queries, keys, values, valid[:, None, None, :], scale, options.softcap)
        return out.reshape(batch, num_heads, head_dim)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=valid[:, None, None, :], scale=scale)
    return out.reshape(batch, num_heads, head_dim)


def cpu_ops(*, native: bool = True, native_layer_max_rows: int = 4, fused_layers: bool = True) -> KernelOps:
    """The CPU bundle; ``native`` adds the C kernels' capabilities, ``fused_layers`` the flat decode pass of
    fusable layers (see the module docstring). With both off, every step runs as modules."""
    write_kv, paged_attention = on_cache("cpu", write_kv_cpu, paged_attention_cpu,
                                         write_quantized=write_kv_cache_reference,
                                         attend_quantized=paged_attention_cache_cpu)
    kernels = NativeKernels(native_layer_max_rows) if native else None
    quantized = cpu_quant_linear if native else quant_linear_reference
    fused = CpuFusedDecode(kernels, linear_cpu, paged_attention_cache_cpu, quantized) if fused_layers else None
    return KernelOps(
        name="cpu+native" if native else "cpu",
        rms_norm=rms_norm_cpu,
        add_rms_norm=add_rms_norm_cpu,
        rotary=rotary_cpu,
        silu_and_mul=silu_and_mul_cpu,
        write_kv=write_kv,
        paged_attention=paged_attention,
        linear=linear_cpu,
        quantized_linear=quantized,
        prepare_weight=k_major_layout,
        plan_attention=kernels.plan_attention if kernels is not None else no_attention_plan,
        moe=moe_cpu,
        fused_decode=fused,
    )


CPU_OPS = cpu_ops()
"""The default CPU bundle (native kernels on, where they build)."""
