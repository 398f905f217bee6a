"""Decode steps of a few rows (up to four) through a Llama decoder layer written in C
(``kernels/csrc/decode_layer.c``): one call per layer instead of ~25 torch ops.

At a few rows a layer streams its four weight matrices (~14 MB for SmolLM2-135M) and does a few
hundred floats of other arithmetic; as torch ops, the split GEMVs run near the memory bandwidth but the
~20 small ops between them (norms, rotary, KV writes, attention, SiLU, residual adds) spend ~5-7 ms per
token in dispatch. The C layer runs everything in one OpenMP region: each thread streams one contiguous
column range of every weight row, attention reads the paged cache in place.

Invariants: the bound pointers are the model's parameters when the binding is built (weights load in
place and are never replaced, as for ``LlamaCpuDecoder``); QKV, output and gate/up weights are stored
K-major and the down projection row-major (``use_k_major_weights``), all float32 and contiguous in that
layout; ``load`` returns ``None`` otherwise, and where the C library cannot be built.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from asyncllm.kernels.native_attention import DecodeAttentionPlan
from asyncllm.kernels.native_build import load_native_library

_SOURCE = "decode_layer.c"
MAX_HEAD_DIM = 512  # the C rotary keeps one head in a stack buffer of this many floats
_ARGTYPES = (
    [ctypes.c_void_p] * 4 + [ctypes.c_float] + [ctypes.c_void_p] * 15 + [ctypes.c_int64] * 9
    + [ctypes.c_float, ctypes.c_int32]
)


@dataclass(frozen=True)
class LayerWeights:
    """One layer's parameters as the C layer reads them (see the module invariants)."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: torch.Tensor  # [N, K] view of K-major storage
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor  # [N, K] row-major
    down_bias: torch.Tensor | None
    scale: float


def _fits(weights: LayerWeights, hidden: int) -> bool:
    k_major = (weights.qkv, weights.o, weights.gate_up)
    tensors = [*k_major, weights.down, weights.input_norm, weights.post_norm]
    biases = [b for b in (weights.qkv_bias, weights.o_bias, weights.gate_up_bias, weights.down_bias) if b is not None]
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors + biases):
        return False
    if not all(w.t().is_contiguous() for w in k_major) or not weights.down.is_contiguous():
        return False
    if not all(b.is_contiguous() for b in biases) or weights.input_norm.shape != (hidden,):
        return False
    return weights.post_norm.is_contiguous() and weights.input_norm.is_contiguous()


class NativeDecodeLayers:
    """Every layer of a decoder bound to the C layer; ``run`` advances the residual stream through all."""

    def __init__(
        self, library: ctypes.CDLL, layers: Sequence[LayerWeights], *, hidden: int, heads: int, kv_heads: int,
        head_dim: int, inter: int, eps: float,
    ) -> None:
        function = library.asyncllm_decode_layer
        function.restype = None
        function.argtypes = _ARGTYPES
        self._function = function
        self.layers = tuple(layers)
        self.hidden, self.heads, self.kv_heads, self.head_dim, self.inter = hidden, heads, kv_heads, head_dim, inter
        self.eps = eps
        # each layer's norm weights, eps and projections, in the C argument order; fixed for the binding's
        # life (the weights never move), so a step does not re-read ~300 data pointers
        self._weight_args = tuple(
            (
                layer.input_norm.data_ptr(), layer.post_norm.data_ptr(), eps,
                layer.qkv.data_ptr(), _pointer(layer.qkv_bias), layer.o.data_ptr(), _pointer(layer.o_bias),
                layer.gate_up.data_ptr(), _pointer(layer.gate_up_bias),
                layer.down.data_ptr(), _pointer(layer.down_bias),
            )
            for layer in self.layers
        )

    @classmethod
    def load(
        cls, layers: Sequence[LayerWeights], *, hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int,
        eps: float,
    ) -> NativeDecodeLayers | None:
        """The binding, or ``None`` when a layer's weights are not laid out for the C layer, the head is
        too wide for it, or the library cannot be built here."""
        if not layers or head_dim % 2 or head_dim > MAX_HEAD_DIM or heads % kv_heads:
            return None
        if not all(_fits(layer, hidden) for layer in layers):
            return None
        library = load_native_library(_SOURCE)
        if library is None:
            return None
        return cls(library, layers, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim, inter=inter,
                   eps=eps)

    def run(
        self, residual: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
        kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]], plan: DecodeAttentionPlan,
    ) -> None:
        """Advance ``residual`` ``[rows, hidden]`` (contiguous float32, updated in place) through every
        layer: writes this step's K/V at ``slots`` (int64, one per row, inside the cache) and attends over
        ``plan``'s layout. ``cos``/``sin`` hold ``[rows, head_dim]`` contiguous floats (rotate-half)."""
        rows = residual.shape[0]
        if residual.shape != (rows, self.hidden) or residual.dtype != torch.float32 or not residual.is_contiguous():
            raise ValueError(f"residual: expected contiguous float32 [rows, {self.hidden}], got "
                             f"{residual.dtype} {tuple(residual.shape)}")
        if plan.seq_lens.shape[0] != rows or plan.num_heads != self.heads:
            raise ValueError(f"plan: laid out for {plan.seq_lens.shape[0]} rows and {plan.num_heads} heads, "
                             f"this step has {rows} rows and {self.heads} heads")
        for name, table in (("cos", cos), ("sin", sin)):
            if table.numel() != rows * self.head_dim or table.dtype != torch.float32 or not table.is_contiguous():
                raise ValueError(f"{name}: expected {rows} x {self.head_dim} contiguous float32 values")
        num_blocks, block_size, _, _ = plan.cache_shape
        if slots.shape != (rows,) or slots.dtype != torch.int64 or not slots.is_contiguous():
            raise ValueError(f"slots: expected a contiguous int64 tensor of {rows} slots")
        if int(slots.min()) < 0 or int(slots.max()) >= num_blocks * block_size:
            raise ValueError(f"slots: must lie in [0, {num_blocks * block_size})")
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"kv_caches: expected {len(self.layers)} (k, v) pairs, got {len(kv_caches)}")
        for k_cache, v_cache in kv_caches:
            for cache in (k_cache, v_cache):
                if cache.shape != plan.cache_shape or cache.dtype != torch.float32 or not cache.is_contiguous():
                    raise ValueError(f"kv_caches: expected contiguous float32 caches of shape {plan.cache_shape}")
        qkv_width = (self.heads + 2 * self.kv_heads) * self.head_dim
        work = torch.empty(rows * (self.hidden + qkv_width + self.heads * self.head_dim + 3 * self.inter)
                           + rows * self.heads * plan.max_len, dtype=torch.float32)
        step_args = (cos.data_ptr(), sin.data_ptr(), slots.data_ptr())
        table_args = (plan.block_tables.data_ptr(), plan.seq_lens.data_ptr(), plan.block_tables.shape[1],
                      block_size, plan.max_len, rows, self.hidden, self.heads, self.kv_heads, self.head_dim,
                      self.inter)
        residual_ptr, work_ptr = residual.data_ptr(), work.data_ptr()
        for layer, weight_args, (k_cache, v_cache) in zip(self.layers, self._weight_args, kv_caches, strict=True):
            self._function(
                residual_ptr, work_ptr, *weight_args, *step_args, k_cache.data_ptr(), v_cache.data_ptr(),
                *table_args, layer.scale, plan.threads,
            )


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()
