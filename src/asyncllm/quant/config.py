"""Quantization configs: which method each linear layer (and the embedding / LM head) of a model gets.

``build_model(..., quantization=...)`` hands the config to the model, which asks it once per layer by the
layer's checkpoint prefix (``model.layers.0.mlp.down_proj``); a merged layer (fused QKV, gate/up) also
names the checkpoint modules it merges (``shards``), since checkpoints quantize those one by one. A
checkpoint may leave some layers dense (``modules_to_not_convert``, ``ignore``, the LM head).

``UNQUANTIZED`` keeps every weight dense. ``WeightOnlyQuantization`` maps checkpoint module prefixes to the
``LayerQuant`` their codes were stored with; every other module stays dense. The formats' own parsers
(AWQ, GPTQ, compressed-tensors, GGUF) build it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

from asyncllm.layers.linear import LinearMethod, UnquantizedLinearMethod
from asyncllm.quant.layer_quant import LayerQuant
from asyncllm.quant.packed_linear import PackedLinearMethod

if TYPE_CHECKING:
    from asyncllm.kernels.bundle import KernelOps


class QuantizationConfig(Protocol):
    """Picks the linear method of every linear layer of a model and the storage of its embeddings."""

    name: str

    def linear_method(self, prefix: str, ops: KernelOps, shards: Sequence[str] = ()) -> LinearMethod:
        """The method for the linear at checkpoint prefix ``prefix`` of a model built on ``ops``; ``shards``
        are the checkpoint prefixes a merged layer stacks (empty for a plain one)."""
        ...

    def embedding_quant(self, prefix: str) -> LayerQuant | None:
        """How the embedding (or untied LM head) at ``prefix`` is stored, ``None`` when dense."""
        ...


@dataclass(frozen=True)
class Unquantized:
    """Dense weights in the model dtype for every layer."""

    name: str = "unquantized"

    def linear_method(self, prefix: str, ops: KernelOps, shards: Sequence[str] = ()) -> LinearMethod:
        return UnquantizedLinearMethod(ops)

    def embedding_quant(self, prefix: str) -> LayerQuant | None:
        return None


UNQUANTIZED = Unquantized()


def merge_layer_quants(prefix: str, quants: Sequence[LayerQuant | None]) -> LayerQuant | None:
    """One storage for a merged layer whose shards were stored as ``quants``: dense when every shard is,
    else the widest code width and the largest group size dividing every shard's (channel-wise when every
    shard is; codes are regrouped on load, which leaves their values unchanged).
    A mix of dense and quantized shards, or of permuted and plain ones, raises ``ValueError``."""
    if all(q is None for q in quants):
        return None
    present = [q for q in quants if q is not None]
    if len(present) != len(quants):
        raise ValueError(f"{prefix}: merges quantized and dense checkpoint modules, which cannot share one weight")
    if len({q.permuted for q in present}) > 1:
        raise ValueError(f"{prefix}: merges modules with and without an input permutation")
    sizes = {q.group_size for q in present if q.group_size is not None}
    group = math.gcd(*sizes) if sizes else None
    if group is not None and group % 16:
        raise ValueError(f"{prefix}: the shards' group sizes {sorted(sizes)} have no common multiple-of-16 divisor")
    return LayerQuant(bits=max(q.bits for q in present), group_size=group, permuted=present[0].permuted)


@dataclass(frozen=True)
class WeightOnlyQuantization:
    """Weight-only quantized checkpoints: ``layers`` maps checkpoint module prefixes (``...q_proj``,
    ``model.embed_tokens``, ``lm_head``) to their ``LayerQuant``; modules not in it are dense. The linear
    methods read the codes the loaders emit (``quant.packed_linear``)."""

    name: str
    layers: Mapping[str, LayerQuant] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", MappingProxyType(dict(self.layers)))

    def linear_method(self, prefix: str, ops: KernelOps, shards: Sequence[str] = ()) -> LinearMethod:
        names = tuple(shards) or (prefix,)
        quant = merge_layer_quants(prefix, [self.layers.get(name) for name in names])
        return UnquantizedLinearMethod(ops) if quant is None else PackedLinearMethod(ops, quant)

    def embedding_quant(self, prefix: str) -> LayerQuant | None:
        return self.layers.get(prefix)
