"""``KernelOps``: the bundle of ops a model may call, one implementation per backend, and its capabilities.

A model receives one bundle at construction and calls only its members; every faster way to run a step
lives here, chosen when the bundle is made (``kernels.dispatch.get_kernel_ops``), never by tests on the
bundle's identity or name. Members with a default are capabilities a backend may leave at the default:

- ``prepare_weight``: the layout a dense weight ``[N, K]`` is stored in after loading (the CPU bundle stores
  some K-major for its split GEMV); the values never change.
- ``plan_attention``: once per step, before the layers run, a backend may attach a per-step plan to the
  attention metadata (``AttentionMetadata.plan``), which its ``paged_attention`` then uses for every layer.
- ``graph_safe``: no op ever synchronises with the host, so the bundle's steps can be recorded as CUDA graphs.
- ``quantized_linear``: ``x @ W.T + bias`` for a weight-only quantized ``PackedWeight`` (the reference
  dequantizes, then multiplies; backends run kernels that read the packed codes).
- ``moe``: the experts of a mixture-of-experts layer over stacked expert weights (``kernels.moe``: the
  reference loops over experts; backends group the tokens by expert).
- ``fused_decode``: whole decoder layers in one call for decode steps of a few rows (``FusedDecode``),
  used only for layers that declare themselves fusable (``FusedLayerWeights``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from asyncllm.kernels.kv_cache import KVCache
from asyncllm.kernels.metadata import AttentionMetadata, AttentionOptions
from asyncllm.kernels.moe import moe_reference
from asyncllm.kernels.quant_linear import quant_linear_reference
from asyncllm.quant.packed import PackedWeight

RmsNorm = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
AddRmsNorm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
Rotary = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
SiluAndMul = Callable[[torch.Tensor], torch.Tensor]
LinearOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
WriteKV = Callable[[torch.Tensor, torch.Tensor, KVCache, torch.Tensor], None]
"""``(k, v, cache, slot_mapping)``: scatter ``[T, Hk, D]`` keys/values into ``cache``; slots ``< 0`` are skipped."""


class PagedAttention(Protocol):
    """``(q, cache, meta, scale, options=None) -> [T, Hq, D]``: causal attention of each sequence's new tokens
    over its context; ``options`` (``AttentionOptions``: a sliding window, soft-capped scores) is a layer's,
    ``None`` for plain causal attention."""

    def __call__(self, q: torch.Tensor, cache: KVCache, meta: AttentionMetadata, scale: float,
                 options: AttentionOptions | None = None, /) -> torch.Tensor: ...


TensorAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float, AttentionOptions | None], torch.Tensor]
"""``(q, k_cache, v_cache, meta, scale, options) -> [T, Hq, D]`` over plain cache tensors."""
PlanAttention = Callable[[AttentionMetadata, KVCache, int], AttentionMetadata]
"""``(meta, first layer's cache, num_heads) -> meta``, possibly with ``plan`` set."""
WeightLayout = Callable[[torch.Tensor], torch.Tensor]
QuantLinearOp = Callable[[torch.Tensor, PackedWeight, torch.Tensor | None], torch.Tensor]
"""``(x [T, K], packed weight [N, K], bias [N] or None) -> [T, N]`` in ``x.dtype``."""
MoeOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(x [T, H], topk_weights [T, K], topk_ids [T, K], w_gate_up [E, 2I, H], w_down [E, H, I]) -> [T, H]``:
each token through its ``K`` experts' SiLU-gated MLPs, weighted and summed (invariants in ``kernels.moe``)."""


@dataclass(frozen=True)
class FusedLayerWeights:
    """One pre-norm decoder layer, as a fused kernel reads it: RMSNorm -> fused QKV -> rotate-half rotary over
    the whole head -> paged GQA attention -> output projection -> residual add -> RMSNorm -> fused gate/up ->
    SiLU(gate) * up -> down projection -> residual add. Each projection is a dense weight ``[N, K]``
    (possibly a strided view) or a weight-only quantized ``PackedWeight`` of that shape; optional biases.
    A layer that computes anything else declares no ``FusedLayerWeights``."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    eps: float
    qkv: torch.Tensor | PackedWeight
    qkv_bias: torch.Tensor | None
    o: torch.Tensor | PackedWeight
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor | PackedWeight
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor | PackedWeight
    down_bias: torch.Tensor | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float

    @property
    def projections(self) -> tuple[torch.Tensor | PackedWeight, ...]:
        """``(qkv, o, gate_up, down)``."""
        return (self.qkv, self.o, self.gate_up, self.down)


class FusedDecodeStep(Protocol):
    """One decode step's shared state (rotary rows, slots, attention plan, scratch)."""

    def covers(self, layer: int) -> bool:
        """Whether layer ``layer`` runs fused in this step."""
        ...

    def run(self, layer: int, residual: torch.Tensor, cache: KVCache) -> None:
        """Advance the residual stream ``[rows, hidden]`` through layer ``layer`` in place, writing its KV."""
        ...


class FusedDecodeBinding(Protocol):
    """A model's fusable layers bound to a fused kernel (weights must stay where they are)."""

    def begin(
        self, positions: torch.Tensor, cos_sin_cache: torch.Tensor, meta: AttentionMetadata,
        caches: Sequence[KVCache],
    ) -> FusedDecodeStep | None:
        """The step's fused state (every layer's cache checked once), or ``None`` when this step does not fit
        the kernel (too many rows, no attention plan, another dtype)."""
        ...


class FusedDecode(Protocol):
    """The capability: bind a model's layers (``None`` for a layer that is not fusable)."""

    def bind(self, layers: Sequence[FusedLayerWeights | None]) -> FusedDecodeBinding | None: ...


def keep_layout(weight: torch.Tensor) -> torch.Tensor:
    return weight


def no_attention_plan(meta: AttentionMetadata, cache: KVCache, num_heads: int) -> AttentionMetadata:
    return meta


@dataclass(frozen=True)
class KernelOps:
    """The ops a model may call (see the module docstring). ``name`` is for logs and reports only."""

    name: str
    rms_norm: RmsNorm
    add_rms_norm: AddRmsNorm
    rotary: Rotary
    silu_and_mul: SiluAndMul
    write_kv: WriteKV
    paged_attention: PagedAttention
    linear: LinearOp = F.linear
    quantized_linear: QuantLinearOp = quant_linear_reference
    prepare_weight: WeightLayout = keep_layout
    plan_attention: PlanAttention = no_attention_plan
    moe: MoeOp = moe_reference
    graph_safe: bool = False
    fused_decode: FusedDecode | None = None


def on_cache(
    backend: str,
    write: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None],
    attend: TensorAttention,
    *,
    write_quantized: WriteKV | None = None,
    attend_quantized: PagedAttention | None = None,
) -> tuple[WriteKV, PagedAttention]:
    """``write_kv`` / ``paged_attention`` members over ``KVCache``: plain caches go to the tensor-level
    kernels ``write`` / ``attend``, quantized ones to ``write_quantized`` / ``attend_quantized``; a backend
    without those refuses a quantized cache by name."""

    def write_kv(k: torch.Tensor, v: torch.Tensor, cache: KVCache, slot_mapping: torch.Tensor) -> None:
        if cache.is_quantized and write_quantized is not None:
            write_quantized(k, v, cache, slot_mapping)
            return
        cache.require_plain(backend)
        write(k, v, cache.key, cache.value, slot_mapping)

    def paged_attention(q: torch.Tensor, cache: KVCache, meta: AttentionMetadata, scale: float,
                        options: AttentionOptions | None = None, /) -> torch.Tensor:
        if cache.is_quantized and attend_quantized is not None:
            return attend_quantized(q, cache, meta, scale, options)
        cache.require_plain(backend)
        return attend(q, cache.key, cache.value, meta, scale, options)

    return write_kv, paged_attention
