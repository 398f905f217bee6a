"""Quantization configs: which ``LinearMethod`` each linear layer of a model gets.

``build_model(..., quantization=...)`` hands the config to the model, which asks it once per linear layer,
by the layer's checkpoint prefix (``model.layers.0.self_attn.qkv_proj``): a checkpoint may leave some layers
dense (``modules_to_not_convert``, ``ignore``, the LM head). The only config so far is ``UNQUANTIZED``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from asyncllm.kernels.bundle import KernelOps
from asyncllm.layers.linear import LinearMethod, UnquantizedLinearMethod


class QuantizationConfig(Protocol):
    """Picks the linear method of every linear layer of a model."""

    name: str

    def linear_method(self, prefix: str, ops: KernelOps) -> LinearMethod:
        """The method for the linear at checkpoint prefix ``prefix`` of a model built on ``ops``."""
        ...


@dataclass(frozen=True)
class Unquantized:
    """Dense weights in the model dtype for every layer."""

    name: str = "unquantized"

    def linear_method(self, prefix: str, ops: KernelOps) -> LinearMethod:
        return UnquantizedLinearMethod(ops)


UNQUANTIZED = Unquantized()
