"""A decode-only forward for the Llama family on CPU: one flat loop over the layers' tensors.

A decode step (every sequence adds one token) on CPU costs little arithmetic per layer besides the four
weight-streaming matmuls, so per-call overhead decides the rest: ``nn.Module`` dispatch, and tables that
the per-layer ops would each rebuild (rotary cos/sin rows, the K/V gather rows, the ``-inf`` bias past
each sequence's end). ``LlamaCpuDecoder`` computes the same function as ``LlamaModel.forward`` with the
CPU kernel bundle, builds those tables once per step, rotates queries and keys in one pass, attends with
the native paged kernel (or two batched GEMMs over head-major gathered K/V), and calls each layer's
weights directly, splitting the one- and two-row GEMVs across threads (``DecodeProjection``); steps of
a few rows run each whole layer in C instead when the native kernels are built (``llama_native``).
Prefill and mixed steps keep the module path, where the overhead is spread over many tokens.

Invariants: the decoder holds references to the model's parameters taken when it is built, so weights
must be loaded in place (``load_weights`` does) and not replaced or moved afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from asyncllm.kernels import AttentionMetadata
from asyncllm.kernels.bundle import LinearOp
from asyncllm.kernels.native_attention import DecodeAttentionPlan, NativeDecodeAttention
from asyncllm.layers.embedding import LMHead
from asyncllm.layers.linear import Linear
from asyncllm.layers.weights import empty_k_major_parameter
from asyncllm.models.llama_native import LayerWeights, NativeDecodeLayers

if TYPE_CHECKING:
    from asyncllm.models.llama import LlamaModel

KVCache = tuple[torch.Tensor, torch.Tensor]


# Rows up to which a projection takes the split GEMV (measured on x86 with 2 threads: at 1-2 rows it
# streams the weights 15-35% faster than oneDNN's GEMV; from 4 rows on oneDNN's GEMM is as fast or faster).
SPLIT_GEMV_MAX_ROWS = 2
# Rows up to which a decode step runs each layer as one native C call (when built). Measured on x86 with
# 2 threads, forward + LM head against the torch path (native attention in both), medians: 23.1 vs 26.5 ms
# at 1 row, 32.8 vs 33.9 at 2, 35.7 vs 44.8 at 3, 34.4 vs 41.2 at 4; from 5 rows on the VM's noise
# hides any difference, and at 8 oneDNN's GEMM wins (55 vs 65 ms).
NATIVE_LAYER_MAX_ROWS = 4


@dataclass(frozen=True)
class DecodeProjection:
    """``x @ weight.T + bias`` for one of a layer's linears, with the small-batch GEMV split by hand.

    oneDNN and MKL stream a small ``[N, K]`` matrix well below memory bandwidth when ``x`` has one or two
    rows. Splitting the product into ``splits`` independent slices, one ``bmm`` batch entry per thread,
    gets closer: a K-major weight (stored ``[K, N]``, see ``use_k_major_weights``) splits along ``K`` and
    the partial products are summed; a row-major one splits along ``N`` and the slices are concatenated.
    ``splits == 1`` (one thread, or a size the split does not divide) always uses ``matmul``.
    """

    matmul: LinearOp
    weight: torch.Tensor  # [N, K] (a transposed view when stored K-major)
    bias: torch.Tensor | None
    splits: int
    k_major: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if self.splits == 1 or rows > SPLIT_GEMV_MAX_ROWS:
            return self.matmul(x, self.weight, self.bias)
        n, k = self.weight.shape
        s = self.splits
        if self.k_major:  # [s, rows, K/s] x [s, K/s, N] -> partial sums over K slices
            out = torch.bmm(x.reshape(rows, s, k // s).transpose(0, 1), self.weight.t().view(s, k // s, n)).sum(0)
        else:  # [s, rows, K] x [s, K, N/s] -> N slices side by side
            out = torch.bmm(x.expand(s, rows, k), self.weight.view(s, n // s, k).transpose(1, 2))
            out = out.transpose(0, 1).reshape(rows, n)
        return out if self.bias is None else out.add_(self.bias)


@dataclass(frozen=True)
class _Layer:
    input_norm: torch.Tensor
    qkv: DecodeProjection
    o: DecodeProjection
    post_norm: torch.Tensor
    gate_up: DecodeProjection
    down: DecodeProjection
    scale: float


@dataclass(frozen=True)
class _Gather:
    """Where attention copies each sequence's context from: ``rows[(b * Hk + h) * context + j]`` is the
    ``[D]`` row of token ``j`` of sequence ``b``, KV head ``h`` in the cache viewed as ``[slots * Hk, D]``,
    so one ``index_select`` lays the keys out as ``[B * Hk, context, D]`` for ``bmm``."""

    rows: torch.Tensor  # [B * Hk * context] int64
    keys: torch.Tensor  # [B * Hk * context, D] gather buffer, reused by every layer
    values: torch.Tensor  # same for values


@dataclass(frozen=True)
class _StepTables:
    """What every layer of one decode step shares: rotary factors, the context's layout, the mask.

    With the native kernel (``native`` set) attention reads the cache in place and the other fields
    of the layout are unused. Otherwise a single sequence whose blocks are consecutive in the pool (the
    usual case for one chat) needs no copy: ``gather`` is then ``None`` and its context is the cache slice
    ``first_slot : first_slot + context``, read through strided views (``first_slot`` is 0 and unused
    when ``gather`` is set).
    """

    cos: torch.Tensor  # [B, 1, D]: [cos | cos]
    sin: torch.Tensor  # [B, 1, D]: [-sin | sin]
    context: int  # rows read per sequence and head: the longest context, rounded up to whole blocks if ragged
    bias: torch.Tensor | None  # [B * Hk, 1, context]: 0 where the token exists, -inf past its end; None if none
    first_slot: int
    gather: _Gather | None
    native: DecodeAttentionPlan | None = None


def decode_projection(
    matmul: LinearOp, weight: torch.Tensor, bias: torch.Tensor | None, threads: int
) -> DecodeProjection:
    """A linear's weights as the decode loop calls them: split ``threads`` ways when the split dimension
    (``K`` for a K-major weight, ``N`` for a row-major one) divides evenly, else not split."""
    n, k = weight.shape
    k_major = weight.stride() == (1, n)
    divisible = k % threads == 0 if k_major else n % threads == 0
    splits = threads if threads > 1 and divisible else 1
    return DecodeProjection(matmul, weight, bias, splits, k_major)


def _layer_weights(layer: nn.Module) -> LayerWeights:
    attn, mlp = layer.self_attn, layer.mlp
    return LayerWeights(
        input_norm=layer.input_layernorm.weight,
        post_norm=layer.post_attention_layernorm.weight,
        qkv=attn.qkv_proj.weight,
        qkv_bias=attn.qkv_proj.bias,
        o=attn.o_proj.weight,
        o_bias=attn.o_proj.bias,
        gate_up=mlp.gate_up_proj.weight,
        gate_up_bias=mlp.gate_up_proj.bias,
        down=mlp.down_proj.weight,
        down_bias=mlp.down_proj.bias,
        scale=attn.attn.scale,
    )


def _linear(module: Linear, threads: int) -> DecodeProjection:
    return decode_projection(module.matmul, module.weight, module.bias, threads)


def use_k_major_weights(model: LlamaModel) -> None:
    """Store the token embedding and every layer's fused QKV, output and fused gate/up weights K-major
    (``[K, N]`` in memory, seen as the usual ``[N, K]`` through a transposed view) so that the decode
    loop can split their GEMVs along ``K``; the down projection stays row-major, which its ``N``-split
    GEMV prefers. A head tied to the embedding shares its layout; an untied head is laid out by its owner.

    Call on a freshly built model, before ``load_weights`` and before an LM head is tied to the
    embedding: the parameters are replaced by new, uninitialised ones (loading copies into the
    transposed view in place). Every other consumer sees the same ``[N, K]`` values; oneDNN's GEMM takes
    the strided weights at about the same speed for batched rows, and an embedding lookup reads
    ``hidden_size`` strided floats per token (microseconds).
    """
    model.embed_tokens.weight = _k_major_like(model.embed_tokens.weight)
    for layer in model.layers:
        for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj):
            linear.weight = _k_major_like(linear.weight)


def _k_major_like(param: nn.Parameter) -> nn.Parameter:
    rows, cols = param.shape
    return empty_k_major_parameter(rows, cols, dtype=param.dtype, device=param.device)


class LlamaCpuDecoder:
    """Decode steps of a ``LlamaModel`` (its layers, norms, rotary cache) without module dispatch.

    ``accepts`` says whether a step can take this path: decode-only, every slot written (no ``-1``), the
    KV caches and activations in the weights' dtype. ``forward`` then returns exactly what
    ``LlamaModel.forward`` returns for that step, up to float rounding in attention; ``logits`` is the
    LM head's function with the same small-batch GEMV split as the layers (for any step on CPU).

    Where the native CPU kernels can be built (loaded at the first decode step), attention reads the
    paged cache in place (``kernels.native_attention``), and steps of up to ``NATIVE_LAYER_MAX_ROWS``
    rows run each layer as one C call (``llama_native``); else torch ops over gathered K/V and the
    split GEMVs (``ASYNCLLM_NATIVE_KERNELS=0`` forces those).
    """

    def __init__(self, model: LlamaModel, lm_head: LMHead) -> None:
        layers = model.layers
        first = layers[0].self_attn
        qkv = first.qkv_proj
        self.num_heads: int = qkv.num_heads
        self.num_kv_heads: int = qkv.num_kv_heads
        self.head_dim: int = qkv.head_dim
        self.hidden_size: int = model.norm.weight.shape[0]
        self.eps: float = model.norm.eps
        self.embedding: torch.Tensor = model.embed_tokens.weight
        self.final_norm: torch.Tensor = model.norm.weight
        self.cos_sin_cache: torch.Tensor = model.rotary_emb.cos_sin_cache
        threads = torch.get_num_threads()
        self.layers: tuple[_Layer, ...] = tuple(
            _Layer(
                input_norm=layer.input_layernorm.weight,
                qkv=_linear(layer.self_attn.qkv_proj, threads),
                o=_linear(layer.self_attn.o_proj, threads),
                post_norm=layer.post_attention_layernorm.weight,
                gate_up=_linear(layer.mlp.gate_up_proj, threads),
                down=_linear(layer.mlp.down_proj, threads),
                scale=layer.self_attn.attn.scale,
            )
            for layer in layers
        )
        self.intermediate_size: int = layers[0].mlp.down_proj.input_size
        self.head = decode_projection(lm_head.matmul, lm_head.weight, None, threads)
        self._native_attention: NativeDecodeAttention | None = None
        self._native_layers: NativeDecodeLayers | None = None
        self._native_loaded = False
        self._layer_weights = tuple(_layer_weights(layer) for layer in layers)

    @staticmethod
    def supports(model: LlamaModel, lm_head: LMHead) -> bool:
        """Whether this model fits the flat loop: float32 weights (the CPU path's compute type; the module
        path upcasts norms of other dtypes), plain dense linears and head, one eps for every norm, and
        rotary over the whole head (the cache row is ``[cos | sin]`` of ``head_dim / 2`` each)."""
        layers = model.layers
        if not layers or any(param.dtype != torch.float32 for param in model.parameters()):
            return False
        if type(lm_head).forward is not LMHead.forward or lm_head.weight.dtype != torch.float32:
            return False
        head_dim = layers[0].self_attn.qkv_proj.head_dim
        eps = model.norm.eps
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if any(type(module).forward is not Linear.forward for module in linears):
                return False
            if layer.input_layernorm.eps != eps or layer.post_attention_layernorm.eps != eps:
                return False
        return model.rotary_emb.cos_sin_cache.shape[-1] == head_dim and head_dim % 2 == 0

    def accepts(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_caches: Sequence[KVCache]) -> bool:
        if not meta.is_decode_only or input_ids.device.type != "cpu":
            return False
        dtype = self.embedding.dtype
        if kv_caches[0][0].dtype != dtype or self.final_norm.dtype != dtype:
            return False
        return bool(meta.slot_mapping.min() >= 0)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: Sequence[KVCache],
    ) -> torch.Tensor:
        """``[B]`` token ids, one per sequence, at ``positions`` -> final hidden states ``[B, H]``."""
        batch = input_ids.shape[0]
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        groups, half = heads // kv_heads, head_dim // 2
        qk_width = (heads + kv_heads) * head_dim
        inter = self.intermediate_size
        tables = self._tables(positions, meta, kv_caches[0][0])
        slots = meta.slot_mapping

        residual = F.embedding(input_ids, self.embedding)
        native_layers = self.native_layers() if batch <= NATIVE_LAYER_MAX_ROWS else None
        if native_layers is not None and tables.native is not None:
            native_layers.run(residual, tables.cos, tables.sin, slots.long(), kv_caches, tables.native)
            return F.rms_norm(residual, (self.hidden_size,), self.final_norm, self.eps)
        mlp_out: torch.Tensor | None = None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches, strict=True):
            if mlp_out is not None:
                residual.add_(mlp_out)
            hidden = F.rms_norm(residual, (self.hidden_size,), layer.input_norm, self.eps)
            qkv = layer.qkv(hidden)
            # q and k are adjacent in the fused output: rotate both heads-at-once (neox rotate-half as a roll)
            qk = qkv[:, :qk_width].view(batch, heads + kv_heads, head_dim)
            rotated = torch.addcmul(qk * tables.cos, qk.roll(half, -1), tables.sin)
            values = qkv[:, qk_width:].view(batch, kv_heads, head_dim)
            k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, rotated[:, heads:])
            v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, values)
            attn = self._attend(rotated[:, :heads], k_cache, v_cache, tables, layer.scale, groups)
            residual.add_(layer.o(attn))
            hidden = F.rms_norm(residual, (self.hidden_size,), layer.post_norm, self.eps)
            gate_up = layer.gate_up(hidden)
            mlp_out = layer.down(F.silu(gate_up[:, :inter]).mul_(gate_up[:, inter:]))
        if mlp_out is not None:
            residual.add_(mlp_out)
        return F.rms_norm(residual, (self.hidden_size,), self.final_norm, self.eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, H]`` final hidden states -> ``[N, V]`` float32 logits (the LM head)."""
        return self.head(hidden)

    def native_attention(self) -> NativeDecodeAttention | None:
        """The native attention kernel, built or loaded on first call; ``None`` where unavailable."""
        self._load_native()
        return self._native_attention

    def native_layers(self) -> NativeDecodeLayers | None:
        """The layers bound to the native C layer, built or loaded on first call; ``None`` where
        unavailable (also whenever the native attention is)."""
        self._load_native()
        return self._native_layers

    def _load_native(self) -> None:
        if self._native_loaded:
            return
        self._native_loaded = True
        self._native_attention = NativeDecodeAttention.load()
        if self._native_attention is not None:
            self._native_layers = NativeDecodeLayers.load(
                self._layer_weights, hidden=self.hidden_size, heads=self.num_heads, kv_heads=self.num_kv_heads,
                head_dim=self.head_dim, inter=self.intermediate_size, eps=self.eps,
            )

    def _tables(self, positions: torch.Tensor, meta: AttentionMetadata, cache: torch.Tensor) -> _StepTables:
        half, kv_heads = self.head_dim // 2, self.num_kv_heads
        block_size = cache.shape[1]
        cos_sin = self.cos_sin_cache.index_select(0, positions).to(self.embedding.dtype)
        cos, sin = cos_sin[:, :half], cos_sin[:, half:]
        cos = torch.cat((cos, cos), dim=-1).unsqueeze(1)
        sin = torch.cat((-sin, sin), dim=-1).unsqueeze(1)
        kernel = self.native_attention() if cache.dtype == torch.float32 else None
        if kernel is not None:
            plan = kernel.plan(meta.block_tables, meta.seq_lens, cache.shape, num_heads=self.num_heads)
            return _StepTables(cos, sin, plan.max_len, bias=None, first_slot=0, gather=None, native=plan)
        # exact lengths from the tensor (on CPU, no sync): the host-side lengths may be upper bounds
        lengths = meta.seq_lens.tolist()
        longest = max(lengths)
        if len(lengths) == 1:
            blocks = meta.block_tables[0, : -(-longest // block_size)].tolist()
            if blocks == list(range(blocks[0], blocks[0] + len(blocks))):
                return _StepTables(cos, sin, longest, bias=None, first_slot=blocks[0] * block_size, gather=None)
        ragged = min(lengths) != longest
        context = -(-longest // block_size) * block_size if ragged else longest
        token = torch.arange(context)
        slots = meta.block_tables[:, token // block_size].long() * block_size + token % block_size  # [B, context]
        rows = (slots[:, None, :] * kv_heads + torch.arange(kv_heads)[None, :, None]).reshape(-1)
        bias = None
        if ragged:
            past_end = token[None, :] >= meta.seq_lens[:, None]
            bias = torch.zeros(len(lengths), 1, context, dtype=self.embedding.dtype).masked_fill_(
                past_end[:, None, :], float("-inf")
            ).repeat_interleave(kv_heads, dim=0)
        shape = (rows.shape[0], self.head_dim)
        return _StepTables(
            cos=cos,
            sin=sin,
            context=context,
            bias=bias,
            first_slot=0,
            gather=_Gather(
                rows=rows,
                keys=torch.empty(shape, dtype=self.embedding.dtype),
                values=torch.empty(shape, dtype=self.embedding.dtype),
            ),
        )

    def _attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        tables: _StepTables,
        scale: float,
        groups: int,
    ) -> torch.Tensor:
        """``q`` ``[B, Hq, D]`` over each sequence's cached context -> ``[B, Hq * D]``.

        The query heads that share a KV head are that head's query rows (GQA without repeating K/V): per
        (sequence, KV head) a ``[G, D] x [D, context]`` product, all of them in one ``bmm``.
        """
        if tables.native is not None:
            return tables.native.run(q, k_cache, v_cache, scale)
        batch = q.shape[0]
        kv_heads, head_dim, context = self.num_kv_heads, self.head_dim, tables.context
        pairs = batch * kv_heads
        gather = tables.gather
        if gather is None:  # one sequence in consecutive blocks: strided views of the cache, no copy
            first = tables.first_slot
            keys = k_cache.view(-1, kv_heads, head_dim)[first : first + context].permute(1, 0, 2)
            values = v_cache.view(-1, kv_heads, head_dim)[first : first + context].permute(1, 0, 2)
        else:
            keys = torch.index_select(k_cache.view(-1, head_dim), 0, gather.rows, out=gather.keys)
            values = torch.index_select(v_cache.view(-1, head_dim), 0, gather.rows, out=gather.values)
        queries = q.reshape(pairs, groups, head_dim)
        keys_t = keys.view(pairs, context, head_dim).transpose(1, 2)
        if tables.bias is None:
            scores = torch.bmm(queries, keys_t).mul_(scale)
        else:
            scores = torch.baddbmm(tables.bias, queries, keys_t, alpha=scale)
        probs = torch.softmax(scores, dim=-1)
        return torch.bmm(probs, values.view(pairs, context, head_dim)).view(batch, kv_heads * groups * head_dim)
