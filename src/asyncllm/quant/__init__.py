"""Weight-only quantization: the exact codes every format loads into (``quant.packed``), the configs that
choose each linear layer's method (``quant.config``), the packed linear method (``quant.packed_linear``), and
``quantize`` (AWQ / round-to-nearest into a compressed-tensors checkpoint, ``quant.quantize_model``).

This package imports nothing when it is imported, so kernels can depend on ``quant.packed`` without
pulling in the layers: ``quantize`` and ``QuantizeResult`` are resolved on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["QuantizeResult", "quantize"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from asyncllm.quant import quantize_model

        return getattr(quantize_model, name)
    raise AttributeError(f"module 'asyncllm.quant' has no attribute {name!r}")
