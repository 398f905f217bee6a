"""The CPU bundle's ``fused_decode`` capability: fusable layers of a decode step as one flat pass each.

Two implementations read the same ``FusedLayerWeights``:

- the native C layer (``native_layer.NativeDecodeStep``), one call per layer, for steps of up to
  ``native_layer_max_rows`` rows when the native kernels are built;
- ``TorchDecodeStep``, the same layer as a short sequence of torch calls on the layer's tensors, for every
  other decode step. At a few dozen rows a step is still a few weight-streaming matmuls per layer, and the
  ~15 small ops the modules add around them (residual adds, per-layer rotary tables, KV-write checks,
  module dispatch) cost ~10 % of a batch-32 step on 2 cores (measured side by side against this pass).
  It builds the rotary rows once per step, rotates q and k in one ``addcmul``, writes K/V with two
  ``index_copy_`` (a quantized cache: its codes and scales) and attends through the step's native plan (or
  the batched torch decode attention).

Both need every slot written (no padding row) and float32 caches (plain, or int8 / int4 with float32
scales); any other step runs as modules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from asyncllm.kernels.bundle import FusedDecodeStep, FusedLayerWeights, LinearOp, QuantLinearOp
from asyncllm.kernels.cpu_native import NativeKernels
from asyncllm.kernels.kv_cache import KVCache
from asyncllm.kernels.kv_write import write_kv_cache_reference
from asyncllm.kernels.metadata import AttentionMetadata
from asyncllm.kernels.native_attention import DecodeAttentionPlan
from asyncllm.kernels.native_layer import NativeDecodeLayers
from asyncllm.kernels.rotary import rotate_half_tables
from asyncllm.quant.packed import PackedWeight


def _torch_fits(weights: FusedLayerWeights) -> bool:
    tensors = [weights.input_norm, weights.post_norm]
    for projection in weights.projections:
        tensors.append(projection.qweight if isinstance(projection, PackedWeight) else projection)
    on_cpu = all(t.device.type == "cpu" for t in tensors)
    dense_fp32 = all(t.dtype == torch.float32 for t in tensors if t.is_floating_point())
    return on_cpu and dense_fp32 and weights.head_dim % 2 == 0


class Projection:
    """A projection of either storage: the bundle's dense ``linear`` or its ``quantized_linear``."""

    def __init__(self, linear: LinearOp, quantized: QuantLinearOp) -> None:
        self._linear = linear
        self._quantized = quantized

    def __call__(self, x: torch.Tensor, weight: torch.Tensor | PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(weight, PackedWeight):
            return self._quantized(x, weight, bias)
        return self._linear(x, weight, bias)


DecodeAttention = Callable[[torch.Tensor, KVCache, AttentionMetadata, float], torch.Tensor]
"""The bundle's paged attention over a ``KVCache`` (``paged_attention_cache_cpu``)."""


class CpuFusedDecode:
    """``FusedDecode`` for the CPU bundle: binds the native layer where available, the torch pass always.
    ``linear`` / ``quantized`` and ``attend`` are the bundle's own linears and paged attention."""

    def __init__(self, native: NativeKernels | None, linear: LinearOp, attend: DecodeAttention,
                 quantized: QuantLinearOp) -> None:
        self._native = native
        self._linear = Projection(linear, quantized)
        self._attend = attend

    def bind(self, layers: Sequence[FusedLayerWeights | None]) -> CpuFusedBinding | None:
        torch_layers = tuple(w if w is not None and _torch_fits(w) else None for w in layers)
        if not any(w is not None for w in torch_layers):
            return None
        native = self._native.bind(layers) if self._native is not None else None
        return CpuFusedBinding(torch_layers, native, self._linear, self._attend)


class CpuFusedBinding:
    """A model's fusable layers bound to both passes (``FusedDecodeBinding``)."""

    def __init__(self, layers: tuple[FusedLayerWeights | None, ...], native: NativeDecodeLayers | None,
                 linear: Projection, attend: DecodeAttention) -> None:
        self.layers = layers
        self.native = native
        self._linear = linear
        self._attend = attend

    def begin(
        self, positions: torch.Tensor, cos_sin_cache: torch.Tensor, meta: AttentionMetadata,
        caches: Sequence[KVCache],
    ) -> FusedDecodeStep | None:
        if self.native is not None:
            step = self.native.begin(positions, cos_sin_cache, meta, caches)
            if step is not None:
                return step
        rows = int(positions.shape[0])
        slots = meta.slot_mapping
        if rows == 0 or slots.device.type != "cpu" or int(slots.min()) < 0 or len(caches) != len(self.layers):
            return None
        if any(c.compute_dtype != torch.float32 or c.device.type != "cpu" for c in caches):
            return None
        return TorchDecodeStep(self.layers, self._linear, self._attend, positions, cos_sin_cache, meta, caches)


class TorchDecodeStep:
    """One decode step's fusable layers as flat torch passes (see the module docstring)."""

    def __init__(self, layers: tuple[FusedLayerWeights | None, ...], linear: Projection, attend: DecodeAttention,
                 positions: torch.Tensor, cos_sin_cache: torch.Tensor, meta: AttentionMetadata,
                 caches: Sequence[KVCache]) -> None:
        self._layers = layers
        self._linear = linear
        self._attend = attend
        self._meta = meta
        self._caches = tuple(caches)
        cos, sin = rotate_half_tables(cos_sin_cache, positions, torch.float32)
        self._cos, self._sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [rows, 1, D], shared by every head
        self._slots = meta.slot_mapping.long()
        self._plan = meta.plan if isinstance(meta.plan, DecodeAttentionPlan) else None

    def covers(self, layer: int) -> bool:
        weights = self._layers[layer]
        return weights is not None and weights.head_dim == self._cos.shape[-1] and \
            (self._plan is None or self._plan.num_heads == weights.num_heads)

    def run(self, layer: int, residual: torch.Tensor, cache: KVCache) -> None:
        w = self._layers[layer]
        if w is None:
            raise ValueError(f"layer: {layer} is not fusable")
        if cache is not self._caches[layer] and cache.compute_dtype != torch.float32:
            raise ValueError("cache: expected a float32 cache (plain, or quantized with float32 scales)")
        linear = self._linear
        rows, hidden_size = residual.shape
        heads, kv_heads, head_dim = w.num_heads, w.num_kv_heads, w.head_dim
        qk_width = (heads + kv_heads) * head_dim
        hidden = F.rms_norm(residual, (hidden_size,), w.input_norm, w.eps)
        qkv = linear(hidden, w.qkv, w.qkv_bias)
        qk = qkv[:, :qk_width].view(rows, heads + kv_heads, head_dim)
        # q and k are adjacent in the fused output: rotate both at once (neox rotate-half as a roll)
        rotated = torch.addcmul(qk * self._cos, qk.roll(head_dim // 2, -1), self._sin)
        values = qkv[:, qk_width:].view(rows, kv_heads, head_dim)
        if cache.is_quantized:
            write_kv_cache_reference(rotated[:, heads:], values, cache, self._slots)
        else:
            cache.key.view(-1, kv_heads, head_dim).index_copy_(0, self._slots, rotated[:, heads:])
            cache.value.view(-1, kv_heads, head_dim).index_copy_(0, self._slots, values)
        queries = rotated[:, :heads]
        if self._plan is not None:
            attn = self._plan.run(queries, cache, w.scale)
        else:
            attn = self._attend(queries.contiguous(), cache, self._meta, w.scale)
            attn = attn.reshape(rows, heads * head_dim)
        residual.add_(linear(attn, w.o, w.o_bias))
        hidden = F.rms_norm(residual, (hidden_size,), w.post_norm, w.eps)
        gate_up = linear(hidden, w.gate_up, w.gate_up_bias)
        inter = gate_up.shape[1] // 2
        residual.add_(linear(F.silu(gate_up[:, :inter]).mul_(gate_up[:, inter:]), w.down, w.down_bias))
