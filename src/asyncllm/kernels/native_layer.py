"""Decode steps of a few rows through a pre-norm decoder layer written in C (``csrc/decode_layer.c``): the
CPU bundle's ``fused_decode`` capability, one call per layer instead of ~25 torch ops.

At a few rows a layer streams its four weight matrices (~14 MB for SmolLM2-135M) and does a few hundred
floats of other arithmetic; as torch ops, the split GEMVs run near the memory bandwidth but the ~20 small
ops between them (norms, rotary, KV writes, attention, SiLU, residual adds) spend ~5-7 ms per token in
dispatch. The C layer runs everything in one OpenMP region: each thread streams one contiguous column
range of every weight row, and attention reads the paged cache in place through the step's
``DecodeAttentionPlan`` (the one ``paged_attention`` uses).

Invariants: the bound pointers are the model's parameters when the binding is made (weights load and are
laid out before the first decode step, and never move afterwards); a bound layer stores QKV, output and
gate/up weights K-major and the down projection row-major, all float32 and contiguous in that layout
(``_fits``; another layout leaves the layer unbound, so it runs as modules); the C code trusts every index
it gets, so ``begin`` and ``run`` check each step's tables and tensors first.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from asyncllm.kernels.bundle import FusedLayerWeights
from asyncllm.kernels.kv_cache import KVCache
from asyncllm.kernels.metadata import AttentionMetadata
from asyncllm.kernels.native_attention import DecodeAttentionPlan

MAX_HEAD_DIM = 512  # the C rotary keeps one head in a stack buffer of this many floats
_ARGTYPES = (
    [ctypes.c_void_p] * 4 + [ctypes.c_float] + [ctypes.c_void_p] * 15 + [ctypes.c_int64] * 9
    + [ctypes.c_float, ctypes.c_int32]
)


def _fits(weights: FusedLayerWeights) -> bool:
    """Whether the C layer can read this layer as it is stored (see the module invariants)."""
    k_major = (weights.qkv, weights.o, weights.gate_up)
    tensors = [*k_major, weights.down, weights.input_norm, weights.post_norm]
    biases = [b for b in (weights.qkv_bias, weights.o_bias, weights.gate_up_bias, weights.down_bias) if b is not None]
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors + biases):
        return False
    if not all(w.t().is_contiguous() for w in k_major) or not weights.down.is_contiguous():
        return False
    head_dim = weights.head_dim
    if head_dim % 2 or head_dim > MAX_HEAD_DIM or weights.num_heads % weights.num_kv_heads:
        return False
    hidden = weights.input_norm.shape[0]
    if weights.qkv.shape != ((weights.num_heads + 2 * weights.num_kv_heads) * head_dim, hidden):
        return False
    return all(b.is_contiguous() for b in biases) and weights.post_norm.is_contiguous() and \
        weights.input_norm.is_contiguous()


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


@dataclass(frozen=True)
class _BoundLayer:
    weights: FusedLayerWeights
    args: tuple[int | float | None, ...]  # norms, eps and projections in the C argument order
    hidden: int
    inter: int


class NativeDecodeLayers:
    """The fusable layers of one model bound to the C layer (``FusedDecodeBinding``)."""

    def __init__(self, function: Callable[..., None], layers: Sequence[FusedLayerWeights | None],
                 max_rows: int) -> None:
        self._function = function
        self.max_rows = max_rows
        # each layer's pointers, fixed for the binding's life (the weights never move), so a step does not
        # re-read ~300 data pointers
        self.layers: tuple[_BoundLayer | None, ...] = tuple(
            None if w is None or not _fits(w) else _BoundLayer(
                weights=w,
                args=(w.input_norm.data_ptr(), w.post_norm.data_ptr(), w.eps,
                      w.qkv.data_ptr(), _pointer(w.qkv_bias), w.o.data_ptr(), _pointer(w.o_bias),
                      w.gate_up.data_ptr(), _pointer(w.gate_up_bias), w.down.data_ptr(), _pointer(w.down_bias)),
                hidden=int(w.input_norm.shape[0]),
                inter=int(w.down.shape[1]),
            )
            for w in layers
        )

    @property
    def num_bound(self) -> int:
        return sum(layer is not None for layer in self.layers)

    def begin(
        self, positions: torch.Tensor, cos_sin_cache: torch.Tensor, meta: AttentionMetadata, cache: KVCache
    ) -> NativeDecodeStep | None:
        """The step's shared tables, or ``None`` when it does not fit: more rows than ``max_rows``, no native
        attention plan, a padded row (slot ``-1``), or a cache other than a plain contiguous float32 one."""
        rows = int(positions.shape[0])
        plan = meta.plan
        if not 0 < rows <= self.max_rows or not isinstance(plan, DecodeAttentionPlan) or plan.num_heads <= 0:
            return None
        if cache.is_quantized or cache.dtype != torch.float32 or not cache.key.is_contiguous():
            return None
        slots = meta.slot_mapping
        if slots.device.type != "cpu" or slots.shape != (rows,) or int(slots.min()) < 0:
            return None
        if int(slots.max()) >= cache.num_blocks * cache.block_size:
            raise ValueError(f"slot_mapping: must lie in [0, {cache.num_blocks * cache.block_size})")
        half = cos_sin_cache.shape[-1] // 2
        cos_sin = cos_sin_cache.index_select(0, positions).float()
        cos, sin = cos_sin[:, :half], cos_sin[:, half:]
        return NativeDecodeStep(
            self, plan, torch.cat((cos, cos), dim=-1).contiguous(), torch.cat((-sin, sin), dim=-1).contiguous(),
            slots.long().contiguous(),
        )


class NativeDecodeStep:
    """One decode step over the bound layers (``FusedDecodeStep``): shared rotary rows, slots and scratch."""

    def __init__(self, binding: NativeDecodeLayers, plan: DecodeAttentionPlan, cos: torch.Tensor,
                 sin: torch.Tensor, slots: torch.Tensor) -> None:
        self._binding = binding
        self._plan = plan
        self._cos, self._sin, self._slots = cos, sin, slots
        self._rows = int(slots.shape[0])
        if plan.seq_lens.shape[0] != self._rows:
            raise ValueError(f"plan: laid out for {plan.seq_lens.shape[0]} rows, this step has {self._rows}")
        self._work: torch.Tensor | None = None

    def covers(self, layer: int) -> bool:
        bound = self._binding.layers[layer]
        return bound is not None and bound.weights.num_heads == self._plan.num_heads and \
            self._cos.shape[1] == bound.weights.head_dim

    def run(self, layer: int, residual: torch.Tensor, cache: KVCache) -> None:
        bound = self._binding.layers[layer]
        if bound is None:
            raise ValueError(f"layer: {layer} is not bound to the native layer")
        w, rows, plan = bound.weights, self._rows, self._plan
        if residual.shape != (rows, bound.hidden) or residual.dtype != torch.float32 or not residual.is_contiguous():
            raise ValueError(f"residual: expected contiguous float32 [{rows}, {bound.hidden}], got "
                             f"{residual.dtype} {tuple(residual.shape)}")
        if tuple(cache.shape) != plan.cache_shape or cache.dtype != torch.float32 or not cache.key.is_contiguous() \
                or not cache.value.is_contiguous() or cache.is_quantized:
            raise ValueError(f"cache: expected a plain contiguous float32 cache of shape {plan.cache_shape}")
        qkv_width = (w.num_heads + 2 * w.num_kv_heads) * w.head_dim
        size = rows * (bound.hidden + qkv_width + w.num_heads * w.head_dim + 3 * bound.inter) \
            + rows * w.num_heads * plan.max_len
        if self._work is None or self._work.numel() < size:
            self._work = torch.empty(size, dtype=torch.float32)
        _num_blocks, block_size, _, _ = plan.cache_shape
        self._binding._function(
            residual.data_ptr(), self._work.data_ptr(), *bound.args,
            self._cos.data_ptr(), self._sin.data_ptr(), self._slots.data_ptr(),
            cache.key.data_ptr(), cache.value.data_ptr(),
            plan.block_tables.data_ptr(), plan.seq_lens.data_ptr(), plan.block_tables.shape[1], block_size,
            plan.max_len, rows, bound.hidden, w.num_heads, w.num_kv_heads, w.head_dim, bound.inter,
            w.scale, plan.threads,
        )


def bind_layer_function(library: ctypes.CDLL) -> Callable[..., None]:
    """The C entry point with its argument types declared."""
    function = library.asyncllm_decode_layer
    function.restype = None
    function.argtypes = _ARGTYPES
    return function
