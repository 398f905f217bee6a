"""Quantization: the configs that choose each linear layer's method (weight-only formats build on this)."""

from asyncllm.quant.config import UNQUANTIZED, QuantizationConfig, Unquantized

__all__ = ["UNQUANTIZED", "QuantizationConfig", "Unquantized"]
