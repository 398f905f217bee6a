"""``LayerQuant``: how one module's weight codes are stored (code width, groups, input permutation)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerQuant:
    """How one module's weight codes are stored: code width ``bits`` (1..8), ``group_size`` (``None`` for
    one group per output row, i.e. channel-wise), and whether its input channels are permuted
    (``input_perm``, GPTQ act-order)."""

    bits: int
    group_size: int | None
    permuted: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits: must be in [1, 8], got {self.bits}")
        if self.group_size is not None and (self.group_size <= 0 or self.group_size % 16):
            raise ValueError(f"group_size: must be a positive multiple of 16 or None, got {self.group_size}")

    def groups(self, input_size: int) -> int:
        """Groups per output row for an input of ``input_size`` features (``ValueError`` if it does not divide)."""
        size = input_size if self.group_size is None else self.group_size
        if input_size % size:
            raise ValueError(f"group_size: {size} does not divide the input size {input_size}")
        return input_size // size
