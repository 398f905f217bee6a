"""Weight-only quantization: the exact codes every format loads into (``quant.packed``), the configs that
choose each linear layer's method (``quant.config``) and the packed linear method (``quant.packed_linear``).

Import from the submodules: this package imports nothing itself, so kernels can depend on ``quant.packed``
without pulling in the layers.
"""
